"""DeepInversion (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020).

The pixels themselves are optimised, from Gaussian noise, so that a frozen teacher assigns them to
the target classes while the statistics at its BN inputs match the stored running ones:

    min_x  α_BN·R_BN(x̃) + α_CE·CE(f(x̃), y) + α_TV·R_TV(x) + α_l2·R_l2(x)

with x̃ = flip(roll(x, δ)) a random jitter (δ uniform in ±jitter·size pixels, wrapping around, one
offset per batch) and a random horizontal flip (p = 0.5, per batch) drawn anew every step. The priors
are per image: R_TV(x_i) = ‖∂_h x_i‖₂ + ‖∂_w x_i‖₂ (ℓ2 norms of the vertical and horizontal
finite differences) and R_l2(x_i) = ‖x_i‖₂. R_BN (see `bn_stats`) is a batch term.
As in the published method, x lives in the teacher's normalised input space ((pixel − mean) / std):
Adam (lr 0.1, betas 0.5/0.99) updates it there, and after every step it is clamped to the range that
maps back to pixels in [0, 1]. (The same lr on [0, 1] pixels would take steps about 1/std ≈ 5× as
large; measured on an H100 at 2,000 steps that left the BN loss at 52 instead of 6.7.)

Given a student (`synthesize(..., student=)`, the interleaved mode), Adaptive DeepInversion's
competition term is added: α_comp·(1 − JS(p_t ‖ p_s)) per image, with both distributions softened by
`competition_temperature` (`base.competition_term`). It rewards images on which teacher and student
disagree, so the next distillation steps learn from them. In the two-stage pipeline no student exists
while images are synthesised, so the term is off and the images are those of plain DeepInversion.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dfkd.device import Precision
from synthesizers.base import (
    Progress,
    SynthesisBatch,
    Synthesizer,
    SynthesizerState,
    competition_term,
    frozen_student,
    keep_lowest,
)
from synthesizers.configs import DeepInversionConfig
from synthesizers.registry import register


def total_variation(images: Tensor) -> Tensor:
    """Per-image R_TV = ‖∂_h x‖₂ + ‖∂_w x‖₂ over channels and positions: (N,)."""
    dh = (images[:, :, 1:, :] - images[:, :, :-1, :]).flatten(1)
    dw = (images[:, :, :, 1:] - images[:, :, :, :-1]).flatten(1)
    return torch.linalg.vector_norm(dh, dim=1) + torch.linalg.vector_norm(dw, dim=1)


@register
class DeepInversion(Synthesizer):
    """Per-batch pixel optimisation; each image keeps its lowest-loss iterate.

    An image's loss at a step is α_CE·CE_i + α_TV·R_TV,i + α_l2·R_l2,i + α_BN·R_BN of the batch at that
    step; the image as it was forwarded (before the step, un-jittered) is kept when this loss is its
    lowest so far. The returned logits come from a final no-grad fp32 forward of the kept, un-jittered
    images (the losses were measured on jittered views). DeepInversion has no state across batches.
    """

    name: ClassVar[str] = "deepinversion"
    config_class: ClassVar[type] = DeepInversionConfig
    config: DeepInversionConfig

    @classmethod
    def own_bytes_per_image(cls, config: DeepInversionConfig, image_size: int, precision: Precision) -> int:
        """The optimised fp32 pixels, their gradient, Adam's two moments and the best iterate kept."""
        return 5 * 4 * 3 * image_size**2

    def synthesize(
        self, targets: Tensor, progress: Progress | None = None, student: nn.Module | None = None
    ) -> SynthesisBatch:
        cfg = self.config
        targets = self.check_targets(targets)
        n, size = targets.numel(), self.image_size
        shift = round(cfg.jitter * size)
        low, high = (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std
        inputs = torch.randn(n, 3, size, size, device=self.device).clamp_(low, high)
        inputs = inputs.contiguous(memory_format=self.memory_format).requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        best_images = (inputs.detach() * self.std + self.mean).clamp_(0.0, 1.0)
        best_losses = torch.full((n,), float("inf"), device=self.device)
        for step in range(cfg.iterations):
            # Offsets come from the CPU generator: drawing them costs no device sync.
            dy, dx = torch.randint(-shift, shift + 1, (2,)).tolist()
            flip = cfg.flip and bool(torch.rand(()) < 0.5)
            view = torch.roll(inputs, shifts=(dy, dx), dims=(2, 3))
            if flip:
                view = view.flip(3)
            with self.autocast():
                logits = self.teacher_normalised(view)
            per_image = cfg.ce_weight * F.cross_entropy(logits.float(), targets, reduction="none")
            per_image = per_image + cfg.bn_weight * self.statistics.loss()
            if cfg.tv_weight > 0:
                per_image = per_image + cfg.tv_weight * total_variation(inputs)
            if cfg.l2_weight > 0:
                per_image = per_image + cfg.l2_weight * torch.linalg.vector_norm(inputs.flatten(1), dim=1)
            if student is not None and cfg.competition_weight > 0:
                with frozen_student(student), self.autocast():
                    student_logits = student(view.contiguous(memory_format=self.memory_format))
                per_image = per_image + cfg.competition_weight * competition_term(
                    student_logits, logits, cfg.competition_temperature
                )
            loss = per_image.mean()
            with torch.no_grad():
                improved = per_image < best_losses
                best_images = keep_lowest(best_images, (inputs * self.std + self.mean).clamp_(0.0, 1.0), improved)
                best_losses = torch.where(improved, per_image, best_losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                inputs.copy_(torch.maximum(torch.minimum(inputs, high), low))
            if progress is not None and (step + 1) % cfg.log_every == 0:
                progress(step + 1, loss.detach())
        return SynthesisBatch(best_images, best_losses, self.clean_logits(best_images))

    def state_dict(self) -> SynthesizerState:
        return {"tensors": {}, "scalars": {"method": self.name}}

    def merge_round(self, made: bool) -> None:
        """Nothing to merge: every batch starts from its own seed alone."""

    def load_state_dict(self, state: SynthesizerState) -> None:
        self.check_method(state)
        if state.get("tensors"):
            raise ValueError(f"deepinversion keeps no tensors, but the state holds {sorted(state['tensors'])}")
