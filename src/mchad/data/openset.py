"""Open-set recognition data: the known classes of one dataset as ID data, the test images of
the unknown classes as the test case ``Unknown`` (splits: :mod:`mchad.data.osr`)."""

from __future__ import annotations

from pathlib import Path

import torch

from mchad.data.datamodule import OODDataModule
from mchad.data.osr import CLASS_NAMES, SplitError, class_split
from mchad.data.sources import ImageArray, Source
from mchad.errors import ConfigError, DataError
from mchad.registry import OSR_SETTINGS

UNKNOWN = "Unknown"


class ClassSubset(Source):
    """The images of ``classes`` of another source, relabelled ``0..k-1`` in the given order
    (or ``-1`` with ``outlier=True``).

    ``dataset`` and ``n_classes`` say what the source must hold (e.g. CIFAR10, 10): labels
    must lie in ``0..n_classes-1``, every selected class must have images, and class names,
    when the source has them and the dataset's are known, must be the dataset's in label
    order, so that an image folder's sorted class folders map to the published indices.
    """

    def __init__(self, source: Source, classes: list[int], dataset: str, n_classes: int, outlier: bool = False):
        self.source = source
        self.classes = [int(c) for c in classes]
        self.dataset = dataset
        self.n_classes = n_classes
        self.outlier = outlier
        self.name = f"{source.name}[{len(self.classes)} classes]"

    def class_names(self) -> list[str] | None:
        """The whole dataset's class names (the known/unknown lists index them)."""
        return self.source.class_names()

    def class_count(self) -> int | None:
        return None if self.outlier else len(self.classes)

    def load(self, dataset_dir: str | Path) -> ImageArray:
        self._check_names(self.source.class_names())  # before decoding
        array = self.source.load(dataset_dir)
        self._check(array)
        labels = array.labels
        # cpu: a data source's labels live in host memory until the datamodule places them
        keep = torch.isin(labels, torch.tensor(self.classes))
        index = keep.nonzero().squeeze(1)
        if self.outlier:
            new_labels = torch.full((len(index),), -1, dtype=torch.long)  # cpu: as above
        else:
            relabel = torch.full((self.n_classes,), -1, dtype=torch.long)  # cpu: as above
            # cpu: as above
            relabel[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            new_labels = relabel[labels[index]]
        names = [array.classes[c] for c in self.classes] if array.classes else None
        return ImageArray(array.images[index], new_labels, names)

    def _where(self) -> str:
        folder = getattr(self.source, "root", None)
        return f"{self.source.name}{f' in {folder}' if folder else ''} (open-set {self.dataset})"

    def _check_names(self, classes: list[str] | None) -> None:
        if classes is None:
            return
        expected = CLASS_NAMES.get(self.dataset)
        if len(classes) != self.n_classes:
            raise DataError(f"{self._where()} has {len(classes)} classes, the published splits need {self.n_classes}")
        if expected is not None and [c.lower() for c in classes] != expected:
            raise DataError(
                f"{self._where()}: class folders {classes[:4]}... are not {self.dataset}'s "
                f"{expected[:4]}...; the published splits index the classes in this order"
            )

    def _check(self, array: ImageArray) -> None:
        where = self._where()
        self._check_names(array.classes)
        labels = array.labels
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise DataError(
                f"{where}: labels span {int(labels.min())}..{int(labels.max())}, expected 0..{self.n_classes - 1}"
            )
        present = set(torch.unique(labels).tolist())
        empty = [c for c in self.classes if c not in present]
        if empty:
            raise DataError(f"{where}: no images of class(es) {empty}")


class OpenSetDataModule(OODDataModule):
    """:class:`OODDataModule` for one open-set split: training, validation (a held-out part of
    the training images) and ID test use the known classes only, relabelled ``0..k-1``; the
    test case ``Unknown`` holds the test images of the unknown classes, taken from ``unknown``
    (CIFAR+N: CIFAR-100's test set) or else from ``test``. Each results.csv row gets the
    ``split``. Other test cases (``test_cases``) are tested as well."""

    def __init__(
        self,
        setting: str,
        split: int,
        train: Source,
        test: Source,
        n_classes: int,
        protocol: str = "neal",
        unknown: Source | None = None,
        test_cases: dict[str, Source] | None = None,
        **kwargs,
    ):
        try:
            known_classes, unknown_classes = class_split(setting, split, protocol)
        except SplitError as error:
            raise ConfigError(f"osr: {error}") from error
        if n_classes != len(known_classes):
            raise ConfigError(f"datamodule.n_classes={n_classes} but {setting} has {len(known_classes)} known classes")
        known_dataset, n_known_total, unknown_dataset, n_unknown_total, _ = OSR_SETTINGS[setting]
        cases = {UNKNOWN: ClassSubset(unknown or test, unknown_classes, unknown_dataset, n_unknown_total, outlier=True)}
        cases.update(test_cases or {})
        super().__init__(
            train=ClassSubset(train, known_classes, known_dataset, n_known_total),
            test=ClassSubset(test, known_classes, known_dataset, n_known_total),
            test_cases=cases,
            n_classes=n_classes,
            **kwargs,
        )
        self.setting, self.split, self.protocol = setting, split, protocol
        self.known_classes, self.unknown_classes = known_classes, unknown_classes

    @property
    def result_columns(self) -> dict[str, int]:
        """Extra results.csv columns of this data: which split."""
        return {"split": self.split}
