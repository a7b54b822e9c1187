"""The interleaved mode's settings (`[interleave]` of a recipe with `[run] mode = "interleaved"`). No torch here.

The rounds follow the student-aware methods (CMI's and Fast-DFKD's training loops): each round
synthesises one batch against the current student and then takes `kd_steps` distillation steps on
batches drawn from every image made so far. The first `warmup_rounds` rounds only synthesise (the
published Fast-DFKD warms its generator up for 20 batches before the student trains).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InterleaveConfig:
    """kd_steps: distillation steps after each round's batch (published Fast-DFKD: 400); warmup_rounds:
    rounds that only synthesise. `[evaluate] every` counts rounds in this mode."""

    kd_steps: int = 400
    warmup_rounds: int = 20

    def __post_init__(self) -> None:
        if self.kd_steps < 1:
            raise ValueError(f"kd_steps must be at least 1 (distillation steps per round), got {self.kd_steps}")
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {self.warmup_rounds}")
