"""dfkd: data-free knowledge distillation with a per-stage carbon ledger.

The Python API (`dfkd.synthesize`, `dfkd.distill`, `dfkd.evaluate`, `dfkd.run`, `dfkd.estimate`,
`dfkd.carbon_report`, `dfkd.audit`, `dfkd.load_model`, `dfkd.export`, `dfkd.benchmark_inference`) is
defined in `dfkd.api` and imported on first use, so `import dfkd` and the CLI's start stay light (no torch
until a function needs it). (`dfkd.report` is the report package, hence `carbon_report`.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dfkd.api import (
        audit,
        benchmark_inference,
        carbon_report,
        distill,
        estimate,
        evaluate,
        export,
        load_model,
        run,
        synthesize,
    )

__all__ = [
    "audit",
    "benchmark_inference",
    "carbon_report",
    "distill",
    "estimate",
    "evaluate",
    "export",
    "load_model",
    "run",
    "synthesize",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dfkd import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
