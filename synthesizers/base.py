"""The interface every synthesis method implements, and the name -> class registry.

A synthesizer inverts a frozen, BatchNorm-equipped teacher: given target classes it returns images
in [0, 1] that the teacher's BN statistics and classifier find plausible (model inversion, Yin et al.
2020; Fang et al. 2021). Everything of a step stays on the device: the step loops call no `.item()`,
copy nothing to the host and touch no file, so a GPU never waits on Python.

Reproducibility: the methods draw every random number (initial pixels or generator weights, latent
codes, augmentation parameters, jitter offsets, memory-bank samples) from torch's global generators,
so a caller that runs `torch.manual_seed(seed)` first gets the same images again on the same
hardware and software.

State for resume: `state_dict()` returns `{"tensors": {name: Tensor}, "scalars": {name: int | float |
str}}`; tensors are detached CPU copies ready for safetensors, scalars are JSON-ready. The scalar
"method" names the synthesizer, and `load_state_dict` refuses a state saved by another.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from dfkd.collective import mean_state
from dfkd.device import Precision, autocast, default_precision, uses_channels_last
from dfkd.distributed import current_world
from synthesizers.bn_stats import BatchNormStatistics
from synthesizers.configs import MethodConfig
from synthesizers.memory import training_bytes_per_image

Progress = Callable[[int, Tensor], None]
SynthesizerState = dict[str, dict[str, Any]]


@dataclass
class SynthesisBatch:
    """One synthesised batch, all on the synthesizer's device.

    images: (N, 3, H, W) float in [0, 1]; losses: (N,) each image's loss at its kept iterate;
    logits: (N, C) fp32 teacher logits of the kept images.
    """

    images: Tensor
    losses: Tensor
    logits: Tensor


class Synthesizer(ABC):
    """A model-inversion method: `synthesize(targets)` -> images the teacher assigns to `targets`.

    The synthesizer works on its own frozen copy of `teacher` (eval mode, no parameter gradients,
    hooks on its BN layers), so the caller's model is left as it was. The copy sees normalised inputs
    (x − mean) / std. It computes in `precision`: by default bf16 autocast when `config.amp` and the
    device computes bf16 natively (CUDA; CPUs with AMX or AVX512-BF16; see `default_precision`);
    channels_last on CUDA and under bf16; compiled when `config.compile` on CUDA.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    instance_features: ClassVar[bool] = False
    # How many augmented views of each image one step forwards through the teacher (CMI: two at once).
    teacher_views: ClassVar[int] = 1

    def __init__(
        self,
        teacher: nn.Module,
        config: MethodConfig,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        image_size: int = 32,
        precision: Precision | None = None,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean} / {std}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.config = config
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.image_size = image_size
        self.on_cuda = self.device.type == "cuda"
        if precision is None:
            precision = default_precision(self.device) if config.amp else "fp32"
        self.precision: Precision = precision
        channels_last = uses_channels_last(self.device, precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        frozen = copy.deepcopy(teacher).to(self.device).to(memory_format=self.memory_format).eval()
        frozen.requires_grad_(False)
        # A config with a `bn_momentum` (Fast-DFKD) matches a moving average of the batches' statistics.
        momentum = getattr(config, "bn_momentum", None)
        self.statistics = BatchNormStatistics(frozen, instance_features=self.instance_features, momentum=momentum)
        # Hooks go on before compiling so that the compiled graph contains them.
        self.teacher = cast(nn.Module, torch.compile(frozen)) if config.compile and self.on_cuda else frozen
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def autocast(self) -> AbstractContextManager[None]:
        """bf16 autocast when the synthesizer computes in bf16; a no-op in fp32."""
        return autocast(self.device, self.precision)

    def teacher_logits(self, images: Tensor, stat_rows: int | None = None) -> Tensor:
        """Teacher logits of [0, 1] images; the hooks record R_BN (over `stat_rows` rows) meanwhile."""
        return self.teacher_normalised((images - self.mean) / self.std, stat_rows)

    def teacher_normalised(self, inputs: Tensor, stat_rows: int | None = None) -> Tensor:
        """Teacher logits of already normalised inputs ((pixel − mean) / std), recording R_BN meanwhile."""
        self.statistics.reset()
        self.statistics.stat_rows = stat_rows
        return self.teacher(inputs.contiguous(memory_format=self.memory_format))

    def student_logits(self, student: nn.Module, images: Tensor) -> Tensor:
        """The student's logits of [0, 1] images, normalised as the teacher's (the student learns its inputs)."""
        return student(((images - self.mean) / self.std).contiguous(memory_format=self.memory_format))

    @torch.no_grad()
    def clean_logits(self, images: Tensor) -> Tensor:
        """fp32 logits of the kept images, un-augmented and without autocast: the student's KD targets."""
        with torch.autocast(self.device.type, enabled=False):
            return self.teacher_logits(images).float()

    def check_targets(self, targets: Tensor) -> Tensor:
        """`targets` as a 1-d int64 tensor on the device; a wrong shape or out-of-range class is a ValueError."""
        if targets.dim() != 1 or targets.numel() == 0 or targets.dtype.is_floating_point:
            raise ValueError(f"targets must be a non-empty 1-d integer tensor, got shape {tuple(targets.shape)}")
        targets = targets.to(self.device, torch.long)
        if bool((targets < 0).any()) or bool((targets >= self.num_classes).any()):
            raise ValueError(f"targets must lie in [0, {self.num_classes - 1}]")
        return targets

    def check_method(self, state: SynthesizerState) -> None:
        """Refuse a state saved by another method."""
        method = state.get("scalars", {}).get("method")
        if method != self.name:
            raise ValueError(f"state was saved by synthesizer {method!r}, not {self.name!r}")

    @classmethod
    def persistent_memory(cls, config: Any, teacher: nn.Module) -> tuple[int, str]:
        """Bytes the method keeps across batches on its device, and what they are (checked before a run)."""
        return 0, "nothing"

    @classmethod
    def bytes_per_image(
        cls,
        config: Any,
        teacher: nn.Module,
        image_size: int,
        precision: Precision,
        student: nn.Module | None = None,
    ) -> int:
        """Estimated device memory one image of a batch takes during a step (`synthesizers.memory`): the
        teacher's forward and backward over every view, the student's when the step is student-aware, and
        what the method itself adds (`own_bytes_per_image`)."""
        image = torch.zeros(1, 3, image_size, image_size)
        total = cls.teacher_views * training_bytes_per_image(teacher, image, precision)
        if student is not None:
            total += training_bytes_per_image(student, image, precision)
        return total + cls.own_bytes_per_image(config, image_size, precision)

    @classmethod
    def own_bytes_per_image(cls, config: Any, image_size: int, precision: Precision) -> int:
        """Memory per image the method holds beyond the teacher's and student's passes (a generator, pixels)."""
        return 0

    @abstractmethod
    def synthesize(
        self, targets: Tensor, progress: Progress | None = None, student: nn.Module | None = None
    ) -> SynthesisBatch:
        """Synthesise one image per entry of `targets`.

        `progress(step, loss)` is called every `config.log_every` steps with the number of steps done
        and the batch loss as a device tensor; converting it to a number (a device sync) is the
        caller's choice. `student` (the interleaved mode) adds the method's student-aware term against the
        current student: the adversarial term (`adversarial_term`) or the competition (`competition_term`).
        """

    @abstractmethod
    def state_dict(self) -> SynthesizerState:
        """What a resumed run needs to continue the same algorithm (layout in the module docstring)."""

    @abstractmethod
    def load_state_dict(self, state: SynthesizerState) -> None:
        """Restore what `state_dict()` returned."""

    def merge_round(self, made: bool) -> None:
        """Under torchrun, after a round in which every rank made at most one batch (`made`) from the same
        state: leave every rank with the same state again. Here, each tensor of the state becomes its mean
        over the ranks that made a batch (for a shared generator, the batched form of the Reptile update:
        θ + ε · mean_r(θ'_r − θ)); a method whose state is not an average overrides this. A state without
        tensors (DeepInversion) overrides this with nothing to do, and a single process returns at once. Every
        rank takes part whatever its own state holds, since a rank that made no batch yet may hold less."""
        if not current_world().several:
            return
        state = self.state_dict()
        self.load_state_dict({"tensors": mean_state(state["tensors"], made), "scalars": state["scalars"]})


def adversarial_term(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per image, −KL(p_teacher ‖ p_student) where both pick the same class, else 0: (N,).

    The adversarial term of CMI and Fast-DFKD. Minimised by the synthesizer, it seeks images on which
    the student still agrees with the teacher's decision but not yet with its distribution: the
    student's blind spots, which the next distillation steps then close. Where the two already
    disagree the image teaches the student anyway, so the term leaves it alone.
    """
    teacher, student = teacher_logits.float(), student_logits.float()
    divergence = (teacher.softmax(1) * (teacher.log_softmax(1) - student.log_softmax(1))).sum(1)
    agree = (teacher.argmax(1) == student.argmax(1)).to(divergence.dtype)
    return -divergence * agree


def competition_term(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per image, 1 − JS(p_teacher ‖ p_student) of the distributions softened by `temperature`: (N,).

    Adaptive DeepInversion's competition term (Yin et al. 2020, eq. 8). JS (natural log) lies in
    [0, ln 2]; minimised by the synthesizer, the term seeks images the two classify differently.
    """
    teacher = (teacher_logits.float() / temperature).softmax(1)
    student = (student_logits.float() / temperature).softmax(1)
    middle = ((teacher + student) / 2).clamp_min(1e-12)
    divergence = (teacher * (teacher.clamp_min(1e-12) / middle).log()).sum(1)
    divergence = divergence + (student * (student.clamp_min(1e-12) / middle).log()).sum(1)
    return 1.0 - (divergence / 2).clamp(0.0, 1.0)


@contextmanager
def frozen_student(student: nn.Module) -> Iterator[nn.Module]:
    """The student in eval mode with no parameter gradients while images are synthesised against it;
    its mode and `requires_grad` flags are restored afterwards, so distillation goes on as before."""
    training, flags = student.training, [p.requires_grad for p in student.parameters()]
    student.eval().requires_grad_(False)
    try:
        yield student
    finally:
        student.train(training)
        for parameter, flag in zip(student.parameters(), flags):
            parameter.requires_grad_(flag)


def keep_lowest(best: Tensor, candidate: Tensor, improved: Tensor) -> Tensor:
    """Per row, `candidate` where `improved` else `best`: the lowest-loss iterate kept on the device."""
    return torch.where(improved.view(-1, *([1] * (candidate.dim() - 1))), candidate, best)
