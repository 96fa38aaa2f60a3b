"""One LightningDataModule for every dataset: ID train/val/test, OOD test cases, outliers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from mchad.data.augment import BatchTransform, repeat_views
from mchad.data.classes import check_class_lists, resolve_n_classes
from mchad.data.loaders import OutlierExposureLoader, TensorBatchLoader
from mchad.data.sources import ImageArray, Source, data_fingerprint
from mchad.errors import ConfigError

log = logging.getLogger(__name__)


class OODDataModule(pl.LightningDataModule):
    """In-distribution data, a seeded validation hold-out, OOD test cases and optional outliers.

    - ``train``/``test``: sources of the ID training and test sets (labels ``0..n_classes-1``),
      which must name the same classes (:mod:`mchad.data.classes`); ``n_classes=None``: the
      training source's number of classes;
    - ``test_cases``: ``{name: source}`` of OOD sets; each is tested mixed with the ID test set;
    - ``outliers``: optional source for outlier exposure (each training batch then holds
      ``batch_size`` ID and ``outlier_batch_size`` outlier images, the latter labelled -1);
    - validation is a hold-out of ``val_fraction`` of the training set drawn with ``seed``
      (never the test set);
    - ``full_train_set``: train on *all* training images as the published runs did (the last
      batch kept: 391 steps per CIFAR epoch, 392 with outliers, where the shorter loader is
      cycled as Lightning 1.6 did); validation then uses the same seeded ``val_fraction``
      subset, which is part of the training data: it shows the fit, not generalisation;
    - ``outlier_augment``: crop and flip the outliers like the ID images (ours) or not
      (published: outliers got the test transform); ``outlier_fraction``: the share of the
      outlier source used, a seeded subset (published: a 90 % split of TinyImages300k);
    - ``root``: the dataset's folder, for configs whose sources interpolate it (image folders);
    - ``val``: an ID validation set of its own instead of the hold-out (OpenOOD's ``val``
      split); the model then trains on all training images; ``val_unknowns``: the OOD images
      of validation (OpenOOD's ``val_ood``), scored by the validation views and the objective
      instead of the outliers or noise;
    - a test-case source with ``test_sets()`` (:class:`~mchad.data.openood.OpenOODTestSets`)
      becomes one test case per set; a source's ``group`` (near, far) is in
      :attr:`test_case_groups`.

    Images stay uint8 in memory; the batch transform (normalise, and at training time random
    crop and flip) runs on the training device after the transfer. ``data_on_device``:
    ``"auto"`` (default) keeps the uint8 sets on the GPU when training on one and they take
    under half of its free memory, so batches are gathered there (no per-batch transfer);
    ``true``/``false`` force it either way (never on a CPU run).
    """

    #: augmented views per training image, set from the method's train_views (runs/train.py build)
    train_views = 1
    #: whether setup() has loaded the validation unknowns, OOD test cases and outliers
    _ood_loaded = False

    def __init__(
        self,
        name: str,
        n_classes: int | None,
        train: Source,
        test: Source,
        test_cases: dict[str, Source] | None = None,
        outliers: Source | None = None,
        dataset_dir: str = "data",
        mean: list[float] = (0.5, 0.5, 0.5),
        std: list[float] = (0.25, 0.25, 0.25),
        crop_padding: int = 0,
        flip: bool = False,
        batch_size: int = 128,
        outlier_batch_size: int = 256,
        test_batch_size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 0,
        root: str | None = None,
        data_on_device: bool | str = "auto",
        full_train_set: bool = False,
        outlier_augment: bool = True,
        outlier_fraction: float = 1.0,
        val: Source | None = None,
        val_unknowns: Source | None = None,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ConfigError(f"datamodule.val_fraction must be in (0, 1), got {val_fraction}")
        if not 0 < outlier_fraction <= 1:
            raise ConfigError(f"datamodule.outlier_fraction must be in (0, 1], got {outlier_fraction}")
        self.full_train_set = full_train_set
        self.outlier_augment, self.outlier_fraction = outlier_augment, outlier_fraction
        if len(mean) != len(std):
            raise ConfigError(f"datamodule.mean has {len(mean)} channels but std has {len(std)}")
        self.name = name
        self.root = root
        self.n_classes = n_classes
        self.sources = {"train": train, "test": test}
        self.test_case_sources = expand_test_cases(test_cases or {})
        self.val_source, self.val_unknown_source = val, val_unknowns
        #: OOD data of validation (``val_unknowns``), loaded by setup
        self.val_unknowns: ImageArray | None = None
        self.outlier_source = outliers
        self.dataset_dir = Path(dataset_dir)
        self.batch_size = batch_size
        self.outlier_batch_size = outlier_batch_size
        self.test_batch_size = test_batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.transform = BatchTransform(list(mean), list(std), crop_padding, flip)
        if data_on_device not in (True, False, "auto"):
            raise ConfigError(f"datamodule.data_on_device must be true, false or auto, got {data_on_device!r}")
        self.data_on_device = data_on_device
        self.data: dict[str, ImageArray] = {}
        self.test_cases: dict[str, ImageArray] = {}
        self.outliers: ImageArray | None = None
        #: content fingerprint of every data set used, as loaded: id/train (before the validation
        #: split), id/test, ood/<test case>, outliers
        self.fingerprints: dict[str, str] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["train"].images.shape[1:])

    @property
    def test_case_names(self) -> list[str]:
        return list(self.test_case_sources)

    @property
    def test_case_groups(self) -> dict[str, str | None]:
        """``{test case: its group}`` (OpenOOD's ``near``/``far``; None for ungrouped sets)."""
        return {name: getattr(source, "group", None) for name, source in self.test_case_sources.items()}

    def setup(self, stage: str | None = None) -> None:
        """Load every data set, once: the ID splits (:meth:`setup_id_data`), then the validation
        unknowns, the OOD test cases and the outliers."""
        self.setup_id_data()
        if self._ood_loaded:
            return
        shape = self.image_shape
        if self.val_unknown_source is not None:
            source = self.val_unknown_source
            self.val_unknowns = conform(
                self._load(source, "val/unknowns").as_outliers(), shape, f"val_unknowns: {source.describe()}"
            )
        for name, source in self.test_case_sources.items():
            self.test_cases[name] = conform(
                self._load(source, f"ood/{name}").as_outliers(), shape, f"test case {name}: {source.describe()}"
            )
        if self.outlier_source is not None:
            outliers = conform(
                self._load(self.outlier_source, "outliers").as_outliers(),
                shape,
                f"outliers: {self.outlier_source.describe()}",
            )
            if self.outlier_fraction < 1:  # cpu: the seeded subset indexes host data
                keep = torch.randperm(len(outliers), generator=torch.Generator().manual_seed(self.seed + 2))
                outliers = outliers.subset(keep[: max(1, round(len(outliers) * self.outlier_fraction))])
            self.outliers = outliers
        log.info(
            "%s: %d train, %d val, %d test; test cases %s%s",
            self.name,
            len(self.data["train"]),
            len(self.data["val"]),
            len(self.data["test"]),
            {k: len(v) for k, v in self.test_cases.items()},
            f"; {len(self.outliers)} outliers" if self.outliers is not None else "",
        )
        self._ood_loaded = True

    def setup_id_data(self) -> None:
        """Load the ID training and test sets and split off validation, once. A run checks these
        (:func:`mchad.runs.validate.check_training_data`) before :meth:`setup` decodes any OOD set."""
        if self.data:
            return
        # before any decoding: one class list for every split, the number of classes from it
        check_class_lists(self.name, self.sources["train"], self._same_dataset())
        self.n_classes = resolve_n_classes(self.n_classes, self.sources["train"])
        full = self._load(self.sources["train"], "id/train")
        self._check_labels(full, "train")
        self.data["test"] = self._load(self.sources["test"], "id/test")
        self._check_labels(self.data["test"], "test")
        channels = full.images.shape[1]
        if channels != len(self.transform.mean.view(-1)):
            raise ConfigError(
                f"{self.name} has {channels} channels but datamodule.mean/std have {self.transform.mean.numel()}"
            )
        generator = torch.Generator().manual_seed(self.seed)  # cpu: the split is the same on any machine
        order = torch.randperm(len(full), generator=generator)  # cpu: splits host data
        n_val = max(1, round(len(full) * self.val_fraction))
        if self.val_source is not None:  # a validation split of its own: all training images train
            self.data["val"] = self._load(self.val_source, "id/val")
            self._check_labels(self.data["val"], "validation")
            self.data["train"] = full
        else:
            self.data["val"] = full.subset(order[:n_val])
            self.data["train"] = full if self.full_train_set else full.subset(order[n_val:])

    def _same_dataset(self) -> dict[str, Source]:
        """The sources (besides train) of the training data's dataset, which share its classes."""
        return {"test": self.sources["test"]}

    def _load(self, source: Source, name: str) -> ImageArray:
        array = source.load(self.dataset_dir)
        self.fingerprints[name] = data_fingerprint(array)
        return array

    def _check_labels(self, array: ImageArray, split: str) -> None:
        labels = array.labels
        if len(labels) == 0:
            raise ConfigError(f"{self.name} {split} set is empty")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.n_classes:
            raise ConfigError(
                f"{self.name} {split} labels span {low}..{high} but datamodule.n_classes={self.n_classes}"
            )

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _device(self) -> torch.device | None:
        """Where loaders gather batches: the trainer's GPU if the data go there, else None (host)."""
        if self.trainer is None or self.data_on_device is False:
            return None
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            return None
        if self.data_on_device == "auto":
            arrays = [*self.data.values(), *self.test_cases.values()]
            if self.outliers is not None:
                arrays.append(self.outliers)
            needed = sum(a.images.nbytes + a.labels.nbytes for a in arrays)
            free, _ = torch.cuda.mem_get_info(device)
            if needed > free // 2:
                return None
        return device

    def _shard(self) -> dict[str, int]:
        """This process's rank and the number of processes (DDP), from the trainer."""
        if self.trainer is None:
            return {"rank": 0, "world_size": 1}
        return {"rank": self.trainer.global_rank, "world_size": self.trainer.world_size}

    def train_dataloader(self):
        """``batch_size`` and ``outlier_batch_size`` are global: in DDP each of the N processes
        trains on 1/N of every batch (the published effective batch on any number of GPUs)."""
        shard = self._shard()
        for key in ("batch_size", "outlier_batch_size"):
            if getattr(self, key) % shard["world_size"]:
                raise ConfigError(
                    f"datamodule.{key}={getattr(self, key)} is the global batch, split over "
                    f"{shard['world_size']} processes: it must be a multiple of {shard['world_size']}"
                )
        inliers = TensorBatchLoader(
            self.data["train"],
            self.batch_size,
            shuffle=True,
            # the published DataLoader kept the last, smaller batch (391 steps on CIFAR)
            drop_last=not self.full_train_set,
            seed=self.seed,
            epoch=self._epoch,
            device=self._device(),
            **shard,
        )
        if self.outliers is None:
            return inliers
        outliers = TensorBatchLoader(
            self.outliers,
            self.outlier_batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.seed + 1,
            epoch=self._epoch,
            device=self._device(),
            **shard,
        )
        return OutlierExposureLoader(inliers, outliers, cycle_shorter=self.full_train_set)

    def val_dataloader(self, sharded: bool = True):
        """This process's part of the validation set (all of it with ``sharded=False``: the
        validation views and the objective score the same sample in any world size)."""
        shard = self._shard() if sharded else {}
        return TensorBatchLoader(self.data["val"], self.test_batch_size, device=self._device(), split="set", **shard)

    def test_dataloader(self):
        """The ID test set first, then every OOD test case (``dataloader_idx`` 1, 2, ...);
        in DDP this process's contiguous part of each (joined by ``OODModel``)."""
        sets = [self.data["test"], *self.test_cases.values()]
        device, shard = self._device(), self._shard()
        return [TensorBatchLoader(data, self.test_batch_size, device=device, split="set", **shard) for data in sets]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if training:  # the method's augmented views per image (CIDER, PALM: 2)
            images, labels = repeat_views(images, labels, self.train_views)
        return self.batch_transform(images, labels, training), labels

    def batch_transform(self, images: Tensor, labels: Tensor, training: bool) -> Tensor:
        """Normalise; in training also crop/flip (the outliers only with ``outlier_augment``)."""
        # labels may be None (callbacks transform unlabelled images)
        rows = labels >= 0 if training and not self.outlier_augment and labels is not None else None
        return self.transform(images, augment=training, augment_rows=rows)


def expand_test_cases(test_cases: dict[str, Source]) -> dict[str, Source]:
    """The test cases with every entry that has ``test_sets()`` replaced by its sets; a name
    given twice is refused."""
    expanded: dict[str, Source] = {}
    for name, source in test_cases.items():
        parts = source.test_sets() if hasattr(source, "test_sets") else {name: source}
        for part, part_source in parts.items():
            if part in expanded:
                raise ConfigError(f"two test cases are named {part}: remove one of them from datamodule.test_cases")
            expanded[part] = part_source
    return expanded


def conform(array: ImageArray, shape: tuple[int, int, int], what: str = "") -> ImageArray:
    """Bring OOD images to the ID image shape: channels (grey <-> RGB) and size (bilinear);
    a conversion is announced in one warning naming ``what``."""
    images = array.images
    channels, height, width = shape
    if what and tuple(images.shape[1:]) != tuple(shape):
        log.warning(
            "%s: %d images of %s converted to the model's input shape %s",
            what,
            len(images),
            "x".join(map(str, images.shape[1:])),
            "x".join(map(str, shape)),
        )
    if images.shape[1] != channels:
        if channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # cpu: converts host data
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1).contiguous()
        else:
            raise ConfigError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if images.shape[2:] != (height, width):
        images = resize_uint8(images, (height, width))
    return ImageArray(images, array.labels, array.classes)


def resize_uint8(images: Tensor, size: tuple[int, int], chunk: int = 4096) -> Tensor:
    out = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(part.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)
