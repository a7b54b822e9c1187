"""The image generator of CMI and Fast-DFKD: a small DCGAN-style decoder from a latent code to [0, 1] pixels."""

from __future__ import annotations

import kornia.augmentation as K
from torch import Tensor, nn


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


class Generator(nn.Module):
    """z -> linear -> 2·ngf × s/4 × s/4 -> BN -> (up ×2, conv, BN, LeakyReLU) ×2 -> conv -> sigmoid: (3, s, s)."""

    def __init__(self, nz: int, ngf: int, image_size: int) -> None:
        super().__init__()
        self.init_size = image_size // 4
        self.project = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, 3, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.project(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.body(out)
