"""Batch loaders over in-memory uint8 tensors: shuffling by permutation, no worker processes.

They are plain iterables with ``__len__``, which Lightning accepts wherever a DataLoader
goes; batches are index gathers from one tensor, moved to the device by Lightning and
augmented there (see :mod:`mchad.data.augment`).
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from mchad.data.sources import ImageArray


class TensorBatchLoader:
    """Yields ``(images_uint8, labels)`` batches of ``data``.

    The order is a permutation seeded by ``(seed, epoch())``, so it is driven by the run's
    seed and the same after resuming at an epoch boundary.
    """

    def __init__(
        self,
        data: ImageArray,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch
        # pinned memory makes the host-to-GPU copy asynchronous
        self.pin = torch.cuda.is_available()

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch())) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(len(self.data), generator=generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.order()
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images, labels = self.data.images[index], self.data.labels[index]
            if self.pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels


class OutlierExposureLoader:
    """Each ID batch concatenated with a batch of outliers (label -1), cycling the outliers.

    The outlier draw is a fresh seeded permutation each time the outlier set is exhausted.
    """

    def __init__(self, inliers: TensorBatchLoader, outliers: TensorBatchLoader):
        self.inliers = inliers
        self.outliers = outliers
        self.base_seed = outliers.seed

    def __len__(self) -> int:
        return len(self.inliers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        outlier_batches = self._cycle()
        for images, labels in self.inliers:
            out_images, _ = next(outlier_batches)
            out_labels = torch.full((len(out_images),), -1, dtype=labels.dtype)
            yield torch.cat([images, out_images]), torch.cat([labels, out_labels])

    def _cycle(self) -> Iterator[tuple[Tensor, Tensor]]:
        rounds = 0
        while True:
            self.outliers.seed = hash((self.base_seed, rounds))
            yield from self.outliers
            rounds += 1
