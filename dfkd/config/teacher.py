"""`dfkd teacher train`'s settings: the standard CIFAR recipe for a teacher. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from dfkd.config.overrides import check_finite
from dfkd.models import check_model_name


@dataclass(frozen=True)
class TeacherConfig:
    """SGD (Nesterov, momentum 0.9), cosine schedule, weight decay 5e-4, random crop + flip.

    `lr` is given for a batch of 128 and scaled linearly with `batch_size` (Goyal et al. 2017).
    """

    arch: str = "wrn40_2"
    data: str = ""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 10
    train_subset: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        check_finite(self)
        check_model_name(self.arch)
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.eval_every < 1:
            raise ValueError("epochs, batch_size, eval_every must be >= 1 and lr > 0")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError("warmup_epochs must be within [0, epochs)")
        if self.train_subset < 0:
            raise ValueError("train_subset must be >= 0 (0 = the whole training split)")
        if 0 < self.train_subset < self.batch_size:
            raise ValueError(
                f"train_subset {self.train_subset} is smaller than one batch of {self.batch_size}: lower --batch-size"
            )

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 128
