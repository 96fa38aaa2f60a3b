"""Batch loaders over in-memory uint8 tensors: shuffling by permutation, no worker processes.

They are plain iterables with ``__len__``, which Lightning accepts wherever a DataLoader
goes. A batch is one index gather from one tensor:

- with ``device`` set (the datamodule does so on a GPU when the data fit, see
  ``OODDataModule(data_on_device=...)``), the uint8 images are copied to the device once and
  gathered there: no host-to-device traffic per batch at all;
- otherwise they are gathered on the host, on a GPU machine straight into pinned memory,
  so that Lightning's ``non_blocking`` copy is asynchronous.

The batch transform (normalise, random crop and flip) then runs on the training device (see
:mod:`mchad.data.augment`). Nothing here synchronises the device with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from mchad.data.sources import ImageArray
from mchad.devices import HOST
from mchad.distributed import shard_bounds


def _seed(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process (ints hash to themselves)."""
    return hash(tuple(values)) & 0x7FFF_FFFF_FFFF_FFFF


class TensorBatchLoader:
    """Yields ``(images_uint8, labels)`` batches of ``data``.

    The order is a permutation seeded by ``(seed, epoch())``, so it is driven by the run's
    seed and the same after resuming at an epoch boundary; it does not depend on ``device``.

    In several processes (``world_size > 1``) each rank yields its part only (Lightning's
    DistributedSampler applies to torch DataLoaders, not to this loader):

    - ``split="batch"`` (training): ``batch_size`` is the global batch; each global batch is
      cut into ``world_size`` parts (``torch.tensor_split``) and rank ``rank`` yields part
      ``rank``. The ranks together see every sample once per epoch, in the batches and order
      of a single process, whatever the world size. A last global batch with fewer rows than
      ranks is dropped (no rank may get an empty batch);
    - ``split="set"`` (validation, testing): rank ``rank`` batches its contiguous part of the
      set (:func:`mchad.distributed.shard_bounds`); joined in rank order they are the set.
    """

    def __init__(
        self,
        data: ImageArray,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        split: str = "batch",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if split not in ("batch", "set"):
            raise ValueError(f"split must be batch or set, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size, self.split = rank, world_size, split
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch
        self.device = torch.device(device) if device is not None else None
        # pinned memory makes the host-to-GPU copy asynchronous
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._on_device: tuple[Tensor, Tensor] | None = None

    def _rows(self) -> int:
        """How many samples the batches are drawn from: all, or this rank's part (``split="set"``)."""
        if self.split == "set" and self.world_size > 1:
            start, stop = shard_bounds(len(self.data), self.rank, self.world_size)
            return stop - start
        return len(self.data)

    def __len__(self) -> int:
        n, size = self._rows(), self.batch_size
        if self.drop_last:
            return n // size
        batches = -(-n // size)
        if self.split == "batch" and 0 < n % size < self.world_size:
            batches -= 1  # a last global batch too small to give every rank a row
        return batches

    def order(self) -> Tensor:
        """The global order of the samples (the same for every rank and world size)."""
        if not self.shuffle:
            return torch.arange(len(self.data))  # cpu: moved to the data's device in __iter__
        # cpu: the order does not depend on the device (moved in __iter__)
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch()))
        return torch.randperm(len(self.data), generator=generator)  # cpu: as the generator

    def batch_indices(self, order: Tensor | None = None) -> Iterator[Tensor]:
        """The sample indices of each batch this rank yields."""
        order = self.order() if order is None else order
        size = self.batch_size
        if self.split == "set" and self.world_size > 1:
            start, stop = shard_bounds(len(self.data), self.rank, self.world_size)
            order = order[start:stop]
        for i in range(len(self)):
            index = order[i * size : (i + 1) * size]
            if self.split == "batch" and self.world_size > 1:
                index = torch.tensor_split(index, self.world_size)[self.rank]
            yield index

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Images and labels where batches are gathered: on ``device`` (copied once) or the host."""
        if self.device is None or self.device == HOST:
            return self.data.images, self.data.labels
        if self._on_device is None:
            self._on_device = (
                self.data.images.to(self.device, non_blocking=True),
                self.data.labels.to(self.device, non_blocking=True),
            )
        return self._on_device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.tensors()
        order = self.order().to(images.device, non_blocking=True)
        pin = self.pin and images.device.type == "cpu"
        for index in self.batch_indices(order):
            if pin:  # gather straight into pinned memory: one copy, then an async transfer
                # cpu: a pinned host buffer, for the asynchronous transfer
                batch = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
                yield torch.index_select(images, 0, index, out=batch), labels[index].pin_memory()
            else:
                yield images[index], labels[index]


class OutlierExposureLoader:
    """Each ID batch concatenated with a batch of outliers (label -1), cycling the outliers.

    An epoch has as many steps as the ID loader; with ``cycle_shorter`` as many as the longer
    of the two, the shorter one cycled (Lightning 1.6's ``max_size_cycle``, which the published
    runs used: 391 ID batches cycled to 392 steps by ``limit_train_batches``). Each loader
    draws a fresh seeded permutation every time it is exhausted.
    """

    def __init__(self, inliers: TensorBatchLoader, outliers: TensorBatchLoader, cycle_shorter: bool = False):
        self.inliers = inliers
        self.outliers = outliers
        self.cycle_shorter = cycle_shorter
        self.base_seeds = (inliers.seed, outliers.seed)
        # pinned once after concatenating, not per part
        self.pin = inliers.pin
        inliers.pin = outliers.pin = False

    def __len__(self) -> int:
        return max(len(self.inliers), len(self.outliers)) if self.cycle_shorter else len(self.inliers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        outlier_batches = self._cycle(self.outliers, self.base_seeds[1])
        inlier_batches = self._cycle(self.inliers, self.base_seeds[0]) if self.cycle_shorter else iter(self.inliers)
        for _, (images, labels) in zip(range(len(self)), inlier_batches, strict=False):
            out_images, _ = next(outlier_batches)
            out_labels = torch.full((len(out_images),), -1, dtype=labels.dtype, device=labels.device)
            images, labels = torch.cat([images, out_images]), torch.cat([labels, out_labels])
            if self.pin and images.device.type == "cpu":
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels

    @staticmethod
    def _cycle(loader: TensorBatchLoader, base_seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        rounds = 0
        while True:
            loader.seed = hash((base_seed, rounds))
            yield from loader
            rounds += 1
