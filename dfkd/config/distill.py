"""Stage 2's settings (`dfkd distill`, `[distill]` of a recipe) and the identity of a student. No torch here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from dfkd.config.overrides import check_finite, config_dict
from dfkd.config.tau import TauSpec, parse_tau
from dfkd.models import check_model_name


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings. `lr` is for a batch of 256 and scaled linearly with `batch_size`.

    `train_subset` trains on a class-balanced slice of N images of the source (0 = all of it), so the
    real-data baseline can be tried without a full pass over 50k images.
    """

    student: str = "wrn16_1"
    teacher: str = ""
    tau: str = "stochastic"
    tau_range: tuple[float, ...] = (2.0, 20.0)
    tau_per: Literal["batch", "sample"] = "batch"
    loss: Literal["hkd", "cmc", "dml"] = "hkd"
    alpha: float = 0.95
    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    data: str = ""
    eval_data: str = ""
    val_data: str = ""
    eval_every: int = 0
    holdout: float = 0.1
    val_size: int = 5_000
    compile: bool = False
    train_subset: int = 0

    def __post_init__(self) -> None:
        check_finite(self)
        check_model_name(self.student)
        mode = parse_tau(self.tau).mode
        if mode != "stochastic" and self.tau_per == "sample":
            raise ValueError(f"--tau-per sample needs --tau stochastic: a {mode} tau is the same for every image")
        if len(self.tau_range) != 2 or not 1.0 <= self.tau_range[0] < self.tau_range[1]:
            raise ValueError(f"tau_range must be two values low,high with 1 <= low < high, got {self.tau_range}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.eval_every < 0:
            raise ValueError("epochs and batch_size must be >= 1, lr > 0, eval_every >= 0")
        if not 0.0 < self.holdout < 0.5:
            raise ValueError(f"holdout must be within (0, 0.5), got {self.holdout}")
        if self.val_size < 10:
            raise ValueError("val_size must be at least 10")
        if self.train_subset < 0:
            raise ValueError("train_subset must be >= 0 (0 = the whole source)")

    @property
    def tau_spec(self) -> TauSpec:
        return parse_tau(self.tau)

    @property
    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256

    def identity(self, source: str, teacher_path: str | None = None) -> str:
        """Hash of what changes the trained weights (settings and the `source` images/teacher, not where
        they are evaluated), to refuse resuming a student on other data or settings.

        The teacher enters through `source` (its sha256), not its path, so a teacher named by another path
        trains the same student. Runs recorded before hashed the path as given: `teacher_path` recomputes
        their identity.
        """
        ignored = ("eval_data", "eval_every", "device", "compile", *(("teacher",) if teacher_path is None else ()))
        fields = {k: v for k, v in config_dict(self).items() if k not in ignored}
        if teacher_path is not None:
            fields["teacher"] = teacher_path
        return hashlib.sha256(json.dumps({**fields, "source": source}, sort_keys=True).encode()).hexdigest()
