"""Batched augmentation and normalisation on the training device (no per-sample Python).

Equivalent in distribution to torchvision's ``RandomCrop(size, padding)`` +
``RandomHorizontalFlip()`` + ``ToTensor()`` + ``Normalize(mean, std)`` applied per image.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchTransform(nn.Module):
    """uint8 ``B x C x H x W`` batch -> normalised float, with optional random crop and flip.

    ``generator``-free by design: it draws from the device's global RNG, which
    ``seed_everything`` seeds, so runs repeat exactly on the same hardware.
    """

    def __init__(self, mean: list[float], std: list[float], crop_padding: int = 0, flip: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.crop_padding = crop_padding
        self.flip = flip

    def forward(self, images: Tensor, augment: bool = False) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if self.mean.device != images.device:  # moved once, not per batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        mean, std = self.mean, self.std
        x = images.float()
        if augment and self.crop_padding > 0:
            x = random_crop(x, self.crop_padding)
        if augment and self.flip:
            x = random_flip(x)
        return (x - mean) / std


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Zero-pad by ``padding`` and crop back to the input size at a random offset per image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    picked = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w)).view(b, 1, 1, w).expand(b, c, h, w)
    return picked.gather(3, cols)


def random_flip(x: Tensor) -> Tensor:
    """Mirror each image horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
