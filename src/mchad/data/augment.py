"""Batched augmentation and normalisation on the training device (no per-sample Python).

Equivalent in distribution to torchvision's ``RandomCrop(size, padding)`` +
``RandomHorizontalFlip()`` + ``ToTensor()`` + ``Normalize(mean, std)`` applied per image, and
equal to it bit for bit for the same crop offset and flip: crop and flip act on the uint8
images (one gather for both), then ``x / 255``, ``- mean``, ``/ std`` in float32 as
torchvision computes them. Nothing here synchronises with the host.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BatchTransform(nn.Module):
    """uint8 ``B x C x H x W`` batch -> normalised float, with optional random crop and flip.

    ``generator``-free by design: it draws from the device's global RNG, which
    ``seed_everything`` seeds, so runs repeat exactly on the same hardware.
    ``channels_last`` returns the batch in that memory format (set with a channels-last model).
    """

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        crop_padding: int = 0,
        flip: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        # cpu: moved to the batches' device on first use (forward)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        # cpu: as mean
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.crop_padding = crop_padding
        self.flip = flip
        self.channels_last = channels_last

    def forward(self, images: Tensor, augment: bool = False, augment_rows: Tensor | None = None) -> Tensor:
        """``augment_rows`` (bool per image): with ``augment``, only these images are cropped
        and flipped (e.g. not the outliers of a batch)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if self.mean.device != images.device:  # moved once, not per batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        padding = self.crop_padding if augment else 0
        flip = self.flip and augment
        if padding > 0 or flip:
            augmented = crop_flip(images, padding, flip)
            # a select, not indexing: static shapes, no host sync
            images = (
                augmented if augment_rows is None else torch.where(augment_rows.view(-1, 1, 1, 1), augmented, images)
            )
        x = images.float()
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # torchvision's ToTensor (x / 255) and Normalize ((x - mean) / std), in that order
        return x.div_(255).sub_(self.mean).div_(self.std)


def random_offsets(b: int, padding: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Top and left crop offsets in ``[0, 2 * padding]``, uniform (torchvision's RandomCrop)."""
    dy = torch.randint(0, 2 * padding + 1, (b,), device=device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=device)
    return dy, dx


def random_flips(b: int, device: torch.device) -> Tensor:
    """Which images to mirror: each with probability 1/2 (torchvision's RandomHorizontalFlip)."""
    return torch.rand(b, device=device) < 0.5


def crop_flip(
    x: Tensor,
    padding: int,
    flip: bool,
    offsets: tuple[Tensor, Tensor] | None = None,
    flips: Tensor | None = None,
) -> Tensor:
    """Zero-pad by ``padding``, crop back to the input size at a (random) offset per image and
    mirror (randomly) chosen images, as one gather; works on any dtype, keeps it.

    ``offsets`` (``dy``, ``dx`` in ``[0, 2 * padding]``) and ``flips`` (bool per image) fix the
    draw, e.g. to compare with torchvision for the same crop.
    """
    b, c, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    if offsets is None:
        offsets = random_offsets(b, padding, x.device) if padding > 0 else (None, None)
    dy, dx = offsets
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    if flip:
        if flips is None:
            flips = random_flips(b, x.device)
        cols = torch.where(flips.view(b, 1, 1), (w - 1) - cols, cols)
    if dy is not None:
        rows = rows + dy.view(b, 1, 1)
        cols = cols + dx.view(b, 1, 1)
    index = (rows * wp + cols).expand(b, h, w).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


def repeat_views(images: Tensor, labels: Tensor, views: int) -> tuple[Tensor, Tensor]:
    """The batch ``views`` times over, view after view (rows ``[v B, (v + 1) B)`` are view
    ``v``; labels likewise), for methods that train on several augmented views of each image
    (CIDER, PALM: the layout of their code, ``torch.cat([x1, x2])`` and ``labels.repeat(2)``).
    The batch transform then crops and flips every row with its own draw, in one batched call,
    so the views of an image differ."""
    if views == 1:
        return images, labels
    return images.repeat(views, *([1] * (images.ndim - 1))), labels.repeat(views)
