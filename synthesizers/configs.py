"""Each method's settings, with the published CIFAR defaults and their range checks. No torch here,
so a recipe's method settings are validated without loading the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from dfkd.config.overrides import check_finite


class MethodConfig(Protocol):
    """The fields every method's config has besides its own hyper-parameters (read-only: configs are frozen).

    A config may also name, in a `student_only` class attribute, the settings that act only when a
    student is given (the adversarial term): without one they cannot change the images.
    """

    @property
    def iterations(self) -> int: ...

    @property
    def amp(self) -> bool: ...

    @property
    def compile(self) -> bool: ...

    @property
    def log_every(self) -> int: ...


def check_ranges(
    config: Any,
    at_least_one: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    unit_interval: tuple[str, ...] = (),
) -> None:
    """The range checks every method's config shares; a value out of range is a ValueError naming it.

    Both methods weigh a BN-statistics and a cross-entropy term: with both at 0 nothing ties the
    images to the teacher, so that is refused here too.
    """
    check_finite(config)
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    for name in non_negative:
        if not getattr(config, name) >= 0.0:
            raise ValueError(f"{name} must be non-negative, got {getattr(config, name)}")
    for name in unit_interval:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(config, name)}")
    if config.bn_weight == config.ce_weight == 0.0:
        raise ValueError("bn_weight and ce_weight cannot both be 0: nothing would tie the images to the teacher")


@dataclass(frozen=True)
class CMIConfig:
    """CMI's hyper-parameters; the defaults are the published CIFAR-10 ones.

    `head_lr` is the projection head's learning rate, separate from the generator's `lr` so that
    raising the generator's for short runs leaves the persistent head's training as published.
    `adv_weight` (published 0.5) applies only when a student is given.
    """

    student_only: ClassVar[tuple[str, ...]] = ("adv_weight",)

    iterations: int = 200
    lr: float = 1e-3
    head_lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = 256
    ngf: int = 64
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    contrastive_weight: float = 0.8
    temperature: float = 0.1
    bank_size: int = 40960
    num_negatives: int = 4096
    head_dim: int = 256
    adv_weight: float = 0.5
    amp: bool = True
    compile: bool = False
    log_every: int = 50

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least_one=("iterations", "nz", "ngf", "head_dim", "bank_size", "log_every"),
            positive=("lr", "head_lr", "temperature"),
            non_negative=("bn_weight", "ce_weight", "contrastive_weight", "adv_weight"),
            unit_interval=("beta1", "beta2"),
        )
        if not 0 <= self.num_negatives <= self.bank_size:
            raise ValueError(f"num_negatives must lie in [0, bank_size={self.bank_size}], got {self.num_negatives}")


@dataclass(frozen=True)
class DeepInversionConfig:
    """DeepInversion's hyper-parameters; the defaults are the published CIFAR-10 ones (2,000 steps).

    `lr` acts on normalised pixels, as published. `competition_weight` and `competition_temperature`
    (Adaptive DeepInversion's competition term; 0.01 at softening temperature 3 in the public code) apply only
    when a student is given.
    """

    student_only: ClassVar[tuple[str, ...]] = ("competition_weight", "competition_temperature")

    iterations: int = 2000
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.99
    bn_weight: float = 10.0
    ce_weight: float = 1.0
    tv_weight: float = 1e-3
    l2_weight: float = 0.0
    jitter: float = 0.125
    flip: bool = True
    competition_weight: float = 0.01
    competition_temperature: float = 3.0
    amp: bool = True
    compile: bool = False
    log_every: int = 50

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least_one=("iterations", "log_every"),
            positive=("lr", "competition_temperature"),
            non_negative=("bn_weight", "ce_weight", "tv_weight", "l2_weight", "competition_weight"),
            unit_interval=("beta1", "beta2"),
        )
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(f"jitter must lie in [0, 0.5) (a fraction of the image size), got {self.jitter}")


@dataclass(frozen=True)
class FastConfig:
    """Fast-DFKD's hyper-parameters; the defaults are the published CIFAR-10 "Fast-10" ones.

    `iterations` is the paper's g_steps (2, 5 or 10; published lr / lr_z 5e-3 / 0.015, 3e-3 / 0.01,
    2e-3 / 0.01). The meta (Reptile) step on the shared generator uses Adam at lr × iterations, as
    published. `adv_weight` applies only when a student is given, after `warmup_batches` batches.
    """

    student_only: ClassVar[tuple[str, ...]] = ("adv_weight", "warmup_batches")

    iterations: int = 10
    lr: float = 2e-3
    lr_z: float = 0.01
    beta1: float = 0.5
    beta2: float = 0.999
    nz: int = 256
    ngf: int = 64
    bn_weight: float = 10.0
    bn_momentum: float = 0.9
    ce_weight: float = 0.4
    adv_weight: float = 1.1
    warmup_batches: int = 20
    amp: bool = True
    compile: bool = False
    log_every: int = 5

    def __post_init__(self) -> None:
        check_ranges(
            self,
            at_least_one=("iterations", "nz", "ngf", "log_every"),
            positive=("lr", "lr_z"),
            non_negative=("bn_weight", "ce_weight", "adv_weight"),
            unit_interval=("beta1", "beta2", "bn_momentum"),
        )
        if self.warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {self.warmup_batches}")
