"""The image generator of CMI and Fast-DFKD: a small DCGAN-style decoder from a latent code to [0, 1] pixels."""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from dfkd.device import Precision
from synthesizers.memory import training_bytes_per_image


def crop_flip_view(image_size: int) -> nn.Module:
    """The generator methods' on-device view: a random crop of the image padded by size/8, and a flip.

    "resample" crops the whole batch with one warp; kornia's default "slice" loops over images in
    Python, which made a 256-image CMI batch twice as slow on an H100.
    """
    size = (image_size, image_size)
    return nn.Sequential(
        K.RandomCrop(size, padding=image_size // 8, cropping_mode="resample"), K.RandomHorizontalFlip()
    )


def check_image_size(image_size: int) -> None:
    """The generator upsamples 4×: a size it cannot make is a ValueError, raised before any batch."""
    if image_size % 4:
        raise ValueError(f"the generator upsamples 4×: image_size must be a multiple of 4, got {image_size}")


def upsampling_stages(image_size: int) -> int:
    """How many ×2 upsamplings make `image_size` from the generator's first feature map: 2 (from s/4, the
    published CIFAR generator), then one more while the map it starts from stays a whole number of pixels
    ≥ 7 — 64 → 8×8 and 3 stages, 96 → 12×12 and 3, 224 → 7×7 and 5 — so a large image is not projected
    from one huge linear layer."""
    stages = 2
    while image_size % 2 ** (stages + 1) == 0 and image_size // 2 ** (stages + 1) >= 7:
        stages += 1
    return stages


class Generator(nn.Module):
    """z -> linear -> 2·ngf × s/2^k × s/2^k -> BN -> (up ×2, conv, BN, LeakyReLU) ×k -> conv -> sigmoid: (3, s, s).

    k = `upsampling_stages(s)`: 2 at CIFAR's 32×32 (the published layout, its parameter names unchanged),
    more for larger images; all but the last stage keep 2·ngf channels, the last halves them.
    """

    def __init__(self, nz: int, ngf: int, image_size: int) -> None:
        super().__init__()
        stages = upsampling_stages(image_size)
        self.init_size = image_size // 2**stages
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        layers: list[nn.Module] = [nn.BatchNorm2d(2 * ngf)]
        for stage in range(stages):
            out = ngf if stage == stages - 1 else 2 * ngf
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * ngf, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
        layers += [nn.Conv2d(ngf, 3, 3, padding=1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.body(out)


def generator_bytes_per_image(config: Any, image_size: int, precision: Precision) -> int:
    """Memory per image of a generator method's step beyond the networks' passes: the generator's forward and
    backward from the latent code, and the fp32 copy of the best image kept so far."""
    generator = Generator(config.nz, config.ngf, image_size)
    return training_bytes_per_image(generator, torch.zeros(1, config.nz), precision) + 4 * 3 * image_size**2
