"""Which synthesis methods exist: name -> settings class and the module of its implementation.

No torch here: `method_config_class` lets a recipe validate a method's settings without loading the
method; `get_synthesizer` imports the implementation (torch, kornia) only when one is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synthesizers.configs import CMIConfig, DeepInversionConfig, FastConfig

if TYPE_CHECKING:
    from synthesizers.base import Synthesizer


@dataclass(frozen=True)
class MethodEntry:
    """A method: its settings class, the module that implements it, what it is, and its student-aware
    term (what it adds given the current student in the interleaved mode; empty: it cannot take one)."""

    config_class: type
    module: str
    description: str
    student_term: str = ""


METHODS: dict[str, MethodEntry] = {
    "cmi": MethodEntry(
        CMIConfig,
        "synthesizers.cmi",
        "Contrastive Model Inversion (Fang et al., IJCAI 2021)",
        "adversarial: -KL(teacher || student) where they agree (adv_weight)",
    ),
    "deepinversion": MethodEntry(
        DeepInversionConfig,
        "synthesizers.deepinversion",
        "DeepInversion (Yin et al., CVPR 2020)",
        "competition: 1 - JS(teacher || student) (competition_weight)",
    ),
    "fast": MethodEntry(
        FastConfig,
        "synthesizers.fast",
        "Fast-DFKD: a meta-learned shared generator (Fang et al., AAAI 2022)",
        "adversarial: -KL(teacher || student) where they agree (adv_weight, after warmup_batches)",
    ),
}
_IMPLEMENTATIONS: dict[str, type[Synthesizer]] = {}


def list_synthesizers() -> list[str]:
    """The method names, sorted."""
    return sorted(METHODS)


def _entry(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown synthesizer {name!r}: choose one of {', '.join(list_synthesizers())}") from None


def method_config_class(name: str) -> type:
    """The settings class of method `name`; an unknown name is a ValueError listing the valid ones."""
    return _entry(name).config_class


def student_term(name: str) -> str:
    """What method `name` adds against the current student in the interleaved mode ("" if nothing)."""
    return _entry(name).student_term


def register(cls: type[Synthesizer]) -> type[Synthesizer]:
    """Class decorator of an implementation: it must be the one `METHODS` names, with that settings class."""
    entry = _entry(cls.name)
    if cls.config_class is not entry.config_class or cls.__module__ != entry.module:
        raise ValueError(f"synthesizer {cls.name!r} does not match its METHODS entry")
    if cls.name in _IMPLEMENTATIONS:
        raise ValueError(f"synthesizer {cls.name!r} is registered twice")
    _IMPLEMENTATIONS[cls.name] = cls
    return cls


def get_synthesizer(name: str) -> type[Synthesizer]:
    """The class of method `name`, imported on first use; an unknown name is a ValueError."""
    importlib.import_module(_entry(name).module)
    return _IMPLEMENTATIONS[name]
