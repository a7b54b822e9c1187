"""Stage 1's settings (`dfkd synthesize`, `[synthesize]` of a recipe). No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SynthesisConfig:
    """Stage settings; the method's own settings come from `method_settings` (`--set key=value`)."""

    method: str = "cmi"
    teacher: str = ""
    num_images: int = 50_000
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    method_settings: dict[str, str] = field(default_factory=dict)
    quality_sample: int = 2_000

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.quality_sample < 2:
            raise ValueError("quality_sample must be at least 2")
