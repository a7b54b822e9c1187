"""What every benchmark's JSON carries besides its rows: when, on what machine, with which command."""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def write_results(
    out: str, device: torch.device, argv: list[str] | None, rows: list[dict[str, Any]], **inputs: Any
) -> None:
    """Write `{date, machine, torch, command, **inputs, rows}` as JSON to `out`."""
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        **inputs,
        "rows": rows,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
