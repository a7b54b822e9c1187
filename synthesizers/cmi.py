"""Contrastive Model Inversion (Fang et al., "Contrastive Model Inversion for Data-Free Knowledge
Distillation", IJCAI 2021), as the first stage of a two-stage pipeline.

For every batch a fresh generator G and latent codes z are optimised together (Adam, lr 1e-3, betas
0.5/0.999, 200 steps) so that the images x = G(z) minimise

    α_BN·R_BN(v₁) + α_CE·CE(f(v₁), y) + α_cr·L_cr(v₁, v₂)

where v₁ (random crop, padding size/8, + horizontal flip) and v₂ (random resized crop, scale 0.25–1,
+ flip) are two views of x made on the device with kornia, R_BN is DeepInversion's BN-statistics
prior (see `bn_stats`) and L_cr is InfoNCE between instance embeddings. An image's instance feature is
the spatial mean of every teacher BN input, concatenated; a persistent MLP head h (its own Adam)
maps it to a unit vector. For the anchor h(v₁ of image i) the positive is h(v₂ of image i), and the
negatives are every other view in the batch plus `num_negatives` features drawn at random from a
memory bank of past synthetic images (their raw, un-projected features, projected by the current h):

    ℓ(a, p) = −log [ exp(a·p / τ) / Σ_{k ≠ a} exp(a·k / τ) ],   L_cr,i = ½ (ℓ(v₁ᵢ, v₂ᵢ) + ℓ(v₂ᵢ, v₁ᵢ))

Making instances easy to tell apart from each other and from earlier batches is what gives CMI its
diversity. Given a student (`synthesize(..., student=)`), the paper's adversarial term is added on the
first view: α_adv·L_adv with L_adv = −KL(p_t ‖ p_s) where teacher and student agree (`base.adversarial_term`,
α_adv 0.5 published). The paper also lowers the CE weight to 0.5 in that phase: set `ce_weight` for
that. In the two-stage pipeline no student exists while images are synthesised, so the term is off.

Keeping: like DeepInversion here, each image keeps its lowest-loss iterate, where an image's loss is
α_CE·CE_i + α_cr·L_cr,i (+ α_adv·L_adv,i) + α_BN·R_BN of the batch. The returned logits and the features that enter the
bank come from a final no-grad fp32 forward of the kept, un-augmented images.
"""

from __future__ import annotations

from typing import Any, ClassVar

import kornia.augmentation as K
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dfkd.collective import gather_rows, mean_state
from dfkd.device import Precision
from dfkd.distributed import current_world
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
from synthesizers.bn_stats import batchnorm_layers
from synthesizers.configs import CMIConfig
from synthesizers.generator import Generator, check_image_size, crop_flip_view, generator_bytes_per_image
from synthesizers.registry import register


def info_nce(view1: Tensor, view2: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Per-image InfoNCE (the module docstring's L_cr,i) of unit embeddings: (N,).

    Each of the 2N anchors is scored against the other 2N − 1 batch views and the K extra `negatives`.
    """
    n = view1.shape[0]
    anchors = torch.cat([view1, view2])
    similarity = anchors @ torch.cat([anchors, negatives]).T / temperature
    own = torch.eye(2 * n, similarity.shape[1], dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(own, float("-inf"))
    positives = torch.arange(2 * n, device=similarity.device).roll(n)
    per_anchor = F.cross_entropy(similarity, positives, reduction="none")
    return (per_anchor[:n] + per_anchor[n:]) / 2


@register
class CMI(Synthesizer):
    """Per-batch generator inversion with a contrastive memory bank that persists across batches.

    State across batches (saved by `state_dict`): the bank (a ring buffer of `bank_size` raw instance
    features on the device, its write pointer and fill count), the head's weights and its Adam state.
    The bank holds bank_size × Σ_l C_l fp32 numbers: 443 MB for a WRN-40-2 at the published 40,960.
    """

    name: ClassVar[str] = "cmi"
    config_class: ClassVar[type] = CMIConfig
    instance_features: ClassVar[bool] = True
    teacher_views: ClassVar[int] = 2  # the local and the global view, forwarded as one batch
    config: CMIConfig

    def __init__(
        self,
        teacher: nn.Module,
        config: CMIConfig,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int,
        image_size: int = 32,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(teacher, config, device, mean, std, num_classes, image_size, precision)
        check_image_size(image_size)
        dim = self.statistics.feature_dim
        self.head = nn.Sequential(
            nn.Linear(dim, config.head_dim), nn.ReLU(), nn.Linear(config.head_dim, config.head_dim)
        ).to(self.device)
        self.head_optimizer = torch.optim.Adam(
            self.head.parameters(), lr=config.head_lr, betas=(config.beta1, config.beta2)
        )
        self.bank = torch.zeros(config.bank_size, dim, device=self.device)
        self.bank_pointer = 0
        self.bank_count = 0
        # The last features written, and the pointer and count before them (a torchrun round merges from there).
        self.remembered: tuple[Tensor, int, int] | None = None
        self.local_view = crop_flip_view(image_size)
        size = (image_size, image_size)  # resampled in one warp, as crop_flip_view explains
        self.global_view = nn.Sequential(
            K.RandomResizedCrop(size, scale=(0.25, 1.0), cropping_mode="resample"), K.RandomHorizontalFlip()
        )

    @classmethod
    def own_bytes_per_image(cls, config: CMIConfig, image_size: int, precision: Precision) -> int:
        return generator_bytes_per_image(config, image_size, precision)

    @classmethod
    def persistent_memory(cls, config: CMIConfig, teacher: nn.Module) -> tuple[int, str]:
        features = sum(layer.num_features for layer in batchnorm_layers(teacher))
        return config.bank_size * features * 4, f"CMI's memory bank (bank_size {config.bank_size} x {features} fp32)"

    def embed(self, features: Tensor) -> Tensor:
        """Unit-length head embeddings of raw instance features, in fp32."""
        with torch.autocast(self.device.type, enabled=False):
            return F.normalize(self.head(features.float()), dim=1)

    def negatives(self) -> Tensor:
        """Up to `num_negatives` raw bank features drawn without replacement (none while the bank is empty)."""
        k = min(self.config.num_negatives, self.bank_count)
        picks = torch.randperm(self.bank_count, device=self.device)[:k]
        return self.bank[picks]

    def synthesize(
        self, targets: Tensor, progress: Progress | None = None, student: nn.Module | None = None
    ) -> SynthesisBatch:
        cfg = self.config
        targets = self.check_targets(targets)
        n = targets.numel()
        generator = Generator(cfg.nz, cfg.ngf, self.image_size).to(self.device).to(memory_format=self.memory_format)
        z = torch.randn(n, cfg.nz, device=self.device, requires_grad=True)
        groups: list[dict[str, Any]] = [{"params": generator.parameters()}, {"params": [z]}]
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        best_images = torch.zeros(n, 3, self.image_size, self.image_size, device=self.device)
        best_losses = torch.full((n,), float("inf"), device=self.device)
        for step in range(cfg.iterations):
            with self.autocast():
                # A bf16 sigmoid output is as fine-grained as 8-bit pixels, which is all an image keeps.
                images = generator(z).float()
            views = torch.cat([self.local_view(images), self.global_view(images)])
            with self.autocast():
                logits = self.teacher_logits(views, stat_rows=n)
            per_image = cfg.ce_weight * F.cross_entropy(logits[:n].float(), targets, reduction="none")
            per_image = per_image + cfg.bn_weight * self.statistics.loss()
            if student is not None and cfg.adv_weight > 0:
                with frozen_student(student), self.autocast():
                    adversarial = adversarial_term(self.student_logits(student, views[:n]), logits[:n])
                per_image = per_image + cfg.adv_weight * adversarial
            if cfg.contrastive_weight > 0:
                embedded = self.embed(self.statistics.features())
                contrastive = info_nce(embedded[:n], embedded[n:], self.embed(self.negatives()), cfg.temperature)
                per_image = per_image + cfg.contrastive_weight * contrastive
            loss = per_image.mean()
            with torch.no_grad():
                improved = per_image < best_losses
                best_images = keep_lowest(best_images, images, improved)
                best_losses = torch.where(improved, per_image, best_losses)
            optimizer.zero_grad(set_to_none=True)
            self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.head_optimizer.step()
            if progress is not None and (step + 1) % cfg.log_every == 0:
                progress(step + 1, loss.detach())
        logits = self.clean_logits(best_images)
        self.remember(self.statistics.features())
        return SynthesisBatch(best_images, best_losses, logits)

    @torch.no_grad()
    def remember(self, features: Tensor) -> None:
        """Write `features` into the ring buffer, overwriting the oldest entries once it is full."""
        size = self.config.bank_size
        self.remembered = (features, self.bank_pointer, self.bank_count)
        features = features[-size:]
        rows = (self.bank_pointer + torch.arange(features.shape[0], device=self.device)) % size
        self.bank[rows] = features
        self.bank_pointer = (self.bank_pointer + features.shape[0]) % size
        self.bank_count = min(self.bank_count + features.shape[0], size)

    @torch.no_grad()
    def merge_round(self, made: bool) -> None:
        """Every rank's bank gets every rank's new features, in rank order (= shard order), from where the round
        began, so the banks stay equal and hold the whole set's features; the head and its optimiser's moments
        are averaged over the ranks that made a batch."""
        if not current_world().several:
            return
        own = self.remembered if made else None
        everyone = gather_rows(own[0].contiguous() if own else self.bank.new_zeros((0, self.bank.shape[1])))
        if own:  # undo this rank's own write: the merged one starts where the round began
            self.bank_pointer, self.bank_count = own[1], own[2]
        self.remember(everyone)
        head = {f"head.{key}": value.detach().cpu() for key, value in self.head.state_dict().items()}
        merged = mean_state({**head, **optimizer_tensors(self.head_optimizer, "head_optimizer")}, made)
        self.head.load_state_dict({k.removeprefix("head."): v for k, v in merged.items() if k.startswith("head.")})
        load_optimizer_tensors(self.head_optimizer, merged, "head_optimizer")

    def state_dict(self) -> SynthesizerState:
        """tensors: "bank" (the filled rows, in buffer order), "head.<param>", "head_optimizer.<i>.<key>";
        scalars: method, bank_pointer, bank_count, bank_size, feature_dim, head_dim."""
        tensors = {"bank": self.bank[: self.bank_count]}
        tensors.update({f"head.{key}": value for key, value in self.head.state_dict().items()})
        tensors.update(optimizer_tensors(self.head_optimizer, "head_optimizer"))
        scalars = {
            "method": self.name,
            "bank_pointer": self.bank_pointer,
            "bank_count": self.bank_count,
            "bank_size": self.config.bank_size,
            "feature_dim": self.statistics.feature_dim,
            "head_dim": self.config.head_dim,
        }
        return {"tensors": {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, "scalars": scalars}

    def load_state_dict(self, state: SynthesizerState) -> None:
        self.check_method(state)
        tensors, scalars = state["tensors"], state["scalars"]
        expected = {
            "bank_size": self.config.bank_size,
            "feature_dim": self.statistics.feature_dim,
            "head_dim": self.config.head_dim,
        }
        for key, value in expected.items():
            if scalars.get(key) != value:
                raise ValueError(
                    f"state has {key}={scalars.get(key)}, this CMI has {value}: resume with the same config and teacher"
                )
        count, pointer = int(scalars["bank_count"]), int(scalars["bank_pointer"])
        bank = tensors["bank"]
        if bank.shape != (count, self.statistics.feature_dim) or not 0 <= pointer < self.config.bank_size:
            raise ValueError(f"state's bank {tuple(bank.shape)} does not match its count {count} / pointer {pointer}")
        self.head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")})
        load_optimizer_tensors(self.head_optimizer, tensors, "head_optimizer")
        self.bank.zero_()
        self.bank[:count] = bank.to(self.device)
        self.bank_pointer, self.bank_count = pointer, count
