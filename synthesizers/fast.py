"""Fast-DFKD (Fang et al., "Up to 100× Faster Data-Free Knowledge Distillation", AAAI 2022).

CMI and DeepInversion optimise every batch from scratch, for hundreds or thousands of steps. Fast-DFKD
keeps one generator G_θ for the whole run and learns its initialisation θ so that a few steps adapt it
to any new batch. For each batch, with fresh latent codes z and targets y:

    inner loop (g_steps = `iterations`, Adam: lr on θ', lr_z on z, betas 0.5/0.999), from θ' = θ:
        x = G_θ'(z);  x̃ = crop(pad size/8) + flip of x, on the device
        L = α_BN·R̂_BN(x̃) + α_CE·CE(f(x̃), y) [+ α_adv·L_adv(x̃) with a student, after the warm-up]
    meta step (Reptile): θ ← θ − η·(θ − θ'), Adam at η = lr × g_steps

R̂_BN matches the teacher's BN statistics with a momentum blend (0.9) of this batch's statistics and
their moving average over earlier batches (see `bn_stats`), so the set, not each small batch, carries
them. L_adv (`base.adversarial_term`) is −KL(p_t ‖ p_s) on the images where teacher and student agree:
it steers synthesis to where the current student is still wrong in distribution.

Each image keeps its lowest-loss iterate; the returned logits come from a final no-grad fp32 forward
of the kept, un-augmented images, which also updates the BN moving averages.
State across batches (saved by `state_dict`): θ, the meta optimiser's Adam state, the BN moving
averages and the number of batches made (which ends the warm-up).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dfkd.collective import all_sum
from dfkd.device import Precision
from dfkd.optim import load_optimizer_tensors, optimizer_tensors
from synthesizers.base import (
    Progress,
    SynthesisBatch,
    Synthesizer,
    SynthesizerState,
    adversarial_term,
    frozen_student,
    keep_lowest,
)
from synthesizers.configs import FastConfig
from synthesizers.generator import Generator, check_image_size, crop_flip_view, generator_bytes_per_image
from synthesizers.registry import register


@register
class Fast(Synthesizer):
    """A meta-learned generator shared across batches, adapted to each batch in a few steps."""

    name: ClassVar[str] = "fast"
    config_class: ClassVar[type] = FastConfig
    config: FastConfig

    @classmethod
    def own_bytes_per_image(cls, config: FastConfig, image_size: int, precision: Precision) -> int:
        return generator_bytes_per_image(config, image_size, precision)

    def __init__(
        self,
        teacher: nn.Module,
        config: FastConfig,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        image_size: int = 32,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(teacher, config, device, mean, std, num_classes, image_size, precision)
        check_image_size(image_size)
        self.generator = Generator(config.nz, config.ngf, image_size).to(self.device)
        self.generator = self.generator.to(memory_format=self.memory_format)
        self.meta_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=config.lr * config.iterations, betas=(config.beta1, config.beta2)
        )
        self.batches = 0
        self.view = crop_flip_view(image_size)

    def synthesize(
        self, targets: Tensor, progress: Progress | None = None, student: nn.Module | None = None
    ) -> SynthesisBatch:
        cfg = self.config
        targets = self.check_targets(targets)
        n = targets.numel()
        adapted = copy.deepcopy(self.generator)  # θ' starts at the shared initialisation θ
        z = torch.randn(n, cfg.nz, device=self.device, requires_grad=True)
        groups: list[dict[str, Any]] = [
            {"params": adapted.parameters(), "lr": cfg.lr},
            {"params": [z], "lr": cfg.lr_z},
        ]
        optimizer = torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2))
        adversarial = student is not None and cfg.adv_weight > 0 and self.batches >= cfg.warmup_batches
        best_images = torch.zeros(n, 3, self.image_size, self.image_size, device=self.device)
        best_losses = torch.full((n,), float("inf"), device=self.device)
        for step in range(cfg.iterations):
            with self.autocast():
                images = adapted(z).float()
            view = self.view(images)
            with self.autocast():
                logits = self.teacher_logits(view)
            per_image = cfg.ce_weight * F.cross_entropy(logits.float(), targets, reduction="none")
            per_image = per_image + cfg.bn_weight * self.statistics.loss()
            if adversarial and student is not None:
                with frozen_student(student), self.autocast():
                    per_image = per_image + cfg.adv_weight * adversarial_term(
                        self.student_logits(student, view), logits
                    )
            loss = per_image.mean()
            with torch.no_grad():
                improved = per_image < best_losses
                best_images = keep_lowest(best_images, images, improved)
                best_losses = torch.where(improved, per_image, best_losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None and (step + 1) % cfg.log_every == 0:
                progress(step + 1, loss.detach())
        self.meta_step(adapted)
        logits = self.clean_logits(best_images)
        self.statistics.update_momentum()
        self.batches += 1
        return SynthesisBatch(best_images, best_losses, logits)

    def meta_step(self, adapted: nn.Module) -> None:
        """Reptile: move the shared initialisation toward the batch's adapted weights (grad = θ − θ')."""
        self.meta_optimizer.zero_grad(set_to_none=True)
        for shared, own in zip(self.generator.parameters(), adapted.parameters()):
            shared.grad = shared.detach() - own.detach()
        self.meta_optimizer.step()

    def merge_round(self, made: bool) -> None:
        """The generator, its meta-optimiser's moments and the BN averages are averaged over the ranks that made
        a batch (`Synthesizer.merge_round`); the count of batches seen is the round's total."""
        before = self.batches - int(made)
        super().merge_round(made)
        self.batches = before + all_sum(int(made), self.device)

    def state_dict(self) -> SynthesizerState:
        """tensors: "generator.<name>", "meta_optimizer.<i>.<slot>", "bn_mean.<l>", "bn_var.<l>";
        scalars: method, batches, nz, ngf, image_size, bn_layers."""
        tensors = {f"generator.{key}": value for key, value in self.generator.state_dict().items()}
        tensors.update(optimizer_tensors(self.meta_optimizer, "meta_optimizer"))
        for layer, (mean, var) in enumerate(self.statistics.averages):
            tensors[f"bn_mean.{layer}"], tensors[f"bn_var.{layer}"] = mean, var
        scalars = {
            "method": self.name,
            "batches": self.batches,
            "nz": self.config.nz,
            "ngf": self.config.ngf,
            "image_size": self.image_size,
            "bn_layers": len(self.statistics.averages),
        }
        return {
            "tensors": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
            "scalars": scalars,
        }

    def load_state_dict(self, state: SynthesizerState) -> None:
        self.check_method(state)
        tensors, scalars = state["tensors"], state["scalars"]
        for key, value in {"nz": self.config.nz, "ngf": self.config.ngf, "image_size": self.image_size}.items():
            if scalars.get(key) != value:
                raise ValueError(
                    f"state has {key}={scalars.get(key)}, this generator has {value}: resume with the same config"
                )
        self.generator.load_state_dict(
            {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
        )
        load_optimizer_tensors(self.meta_optimizer, tensors, "meta_optimizer")
        self.statistics.averages = [
            (tensors[f"bn_mean.{layer}"].to(self.device), tensors[f"bn_var.{layer}"].to(self.device))
            for layer in range(int(scalars["bn_layers"]))
        ]
        self.batches = int(scalars["batches"])
