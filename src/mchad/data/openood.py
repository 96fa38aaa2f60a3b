"""OpenOOD v1.5's CIFAR benchmarks (``testmodules=openood``): its own image lists, read through
pytorch-ood's benchmark classes ``CIFAR10_OpenOOD`` / ``CIFAR100_OpenOOD``.

What the benchmark class declares is used as is: the list file of every split (``train``,
``val``, ``test``, the validation OOD set ``val_ood`` and each OOD test set), the near-/far-OOD
groups and the folder of each set; :class:`~pytorch_ood.dataset.img.ImageListDataset` parses
the lists. We do not construct the benchmark object itself, because (pytorch-ood 0.4.0):

- it reads the lists only from ``torch.hub``'s cache dir (not configurable), so a folder made
  by OpenOOD's own download script (``<dir>/benchmark_imglist``, ``<dir>/images_classic``)
  could not be used;
- its constructor downloads every set and parses every split at once, and its datasets
  decode one image per ``__getitem__`` through PIL transforms: here each split is decoded once,
  in parallel threads, into the uint8 cache like every other set (:mod:`mchad.data.sources`).

Where the data is looked up (``root`` = config key ``openood_dir``): the lists in
``<root>/benchmark_imglist/<id>/`` (OpenOOD's layout) or pytorch-ood's cache
``<torch.hub dir>/openood_benchmark_imglist/benchmark_imglist/<id>/``; the images in
``<root>/images_classic/<set>/`` (OpenOOD's layout) or ``<root>/<set>/`` (pytorch-ood's).
Missing data is downloaded with pytorch-ood's downloaders (they need ``gdown``) into a
temporary folder under ``root``, renamed into OpenOOD's layout there once complete, one process
at a time (:mod:`mchad.data.fetch`); offline, a missing list or image folder stops the run
with one line naming it, the folders looked in and how to get it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import PIL
import torch

from mchad.data.fetch import fetch_into, locked
from mchad.data.sources import (
    DECODE_VERSION,
    RESIZE_MODES,
    ImageArray,
    Source,
    _cached,
    _short,
    decode_files,
)
from mchad.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

#: the ID datasets with an OpenOOD v1.5 benchmark in pytorch-ood (datamodule.name -> class)
BENCHMARKS = {"CIFAR10": "CIFAR10_OpenOOD", "CIFAR100": "CIFAR100_OpenOOD"}
#: splits besides the OOD test sets: the benchmark class's attribute holding each list's name
SPLITS = {
    "train": "_train_imglist",
    "val": "_val_id_imglist",
    "test": "_test_id_imglist",
    "val_ood": "_val_ood_imglist",
}
GROUPS = ("near", "far")
IMAGES_FOLDER = "images_classic"  # OpenOOD's folder of the 32x32 benchmarks' images
LISTS_FOLDER = "benchmark_imglist"


def benchmark_class(name: str):
    """pytorch-ood's benchmark class for the ID dataset ``name`` (``CIFAR10``, ``CIFAR100``)."""
    if name not in BENCHMARKS:
        raise ConfigError(f"OpenOOD v1.5 has no benchmark for {name} here; ID datasets: {', '.join(BENCHMARKS)}")
    import pytorch_ood.benchmark as benchmarks

    return getattr(benchmarks, BENCHMARKS[name])


def ood_groups(name: str) -> dict[str, str]:
    """``{OOD test set: near|far}`` of the benchmark for ``name``, in the benchmark's order."""
    cls = benchmark_class(name)
    groups = {**{s: "near" for s in cls._near_ood}, **{s: "far" for s in cls._far_ood}}
    return {set_name: groups[set_name] for set_name, _ in cls._ood_imglists}


def _hub_lists() -> Path:
    # pytorch-ood's own cache of the lists (pytorch_ood.benchmark.img.openood._ensure_imglists)
    return Path(torch.hub.get_dir()) / "openood_benchmark_imglist" / LISTS_FOLDER


def _how_to_get(name: str, root: Path) -> str:
    cls = BENCHMARKS[name]
    return (
        f'Get it where there is internet: pip install gdown, then python -c "from pytorch_ood.benchmark import {cls}; '
        f"{cls}('{root / IMAGES_FOLDER}', None)\" (the lists go to torch.hub's cache), or OpenOOD's "
        "scripts/download/download.py --contents datasets --datasets ood_v1.5 --dataset_mode benchmark --save_dir DIR "
        "DIR2, and set openood_dir=DIR (the folder holding benchmark_imglist/ and images_classic/)"
    )


def _fetch_lists(staging: Path) -> None:
    """pytorch-ood's download of OpenOOD's image lists (into torch.hub's dir, which it alone
    reads) pointed at ``staging``; the lists are left in ``staging/benchmark_imglist``."""
    from pytorch_ood.benchmark.img.openood import _ensure_imglists

    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(staging / ".hub"))
    try:
        os.replace(_ensure_imglists(download=True), staging / LISTS_FOLDER)
    finally:
        torch.hub.set_dir(hub)


class OpenOODSource(Source):
    """One split of OpenOOD v1.5's benchmark for the ID dataset ``name``: ``train``, ``val``
    (1,000 ID images), ``test`` (the ID test split), ``val_ood`` (the validation OOD images,
    TinyImageNet) or an OOD test set by the benchmark's name (``CIFAR100``, ``TinyImageNet``,
    ``MNIST``, ``SVHN``, ``Textures``, ``Places365``; its ``group`` is near or far).

    Labels are the lists' (ID classes; -1 for OOD sets); class names are the ID images' folder
    names. Images are brought to ``size`` like OpenOOD's test transform (``resize=crop``: short
    side resized, centre crop) and RGB (MNIST is grey). Decoded once, cached in
    ``<dataset_dir>/cache/`` under a key covering the list file and the image folder.
    """

    def __init__(
        self,
        name: str,
        split: str,
        root: str | Path = "data/openood",
        download: bool = True,
        size: int = 32,
        resize: str = "crop",
    ):
        cls = benchmark_class(name)
        names = [s for s, _ in cls._ood_imglists]
        if split not in SPLITS and split not in names:
            raise ConfigError(f"OpenOOD {name} has no split {split!r}; choose from {', '.join([*SPLITS, *names])}")
        if resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.benchmark, self.split, self.root = name, split, Path(root)
        self.download, self.size, self.resize = download, size, resize
        self.list_name = getattr(cls, SPLITS[split]) if split in SPLITS else dict(cls._ood_imglists)[split]
        self.group = ood_groups(name).get(split)
        self.name = f"OpenOOD {name} {split}"

    def describe(self) -> str:
        return f"{self.name} ({self.root})"

    def _list_file(self) -> Path:
        relative = Path(benchmark_class(self.benchmark)._subdir) / self.list_name
        places = [self.root / LISTS_FOLDER, _hub_lists()]
        for place in places:
            if (place / relative).is_file():
                return place / relative
        cause = None
        if self.download:
            try:  # into the first place (OpenOOD's layout), once, under a lock (mchad.data.fetch)
                with locked(self.root, "openood-imglists"):
                    if not (places[0] / relative).is_file():
                        fetch_into("OpenOOD image lists", self.root, _fetch_lists, "")
            except Exception as error:  # gdown missing, offline, quota: reported with the places looked in
                cause = error
            if (places[0] / relative).is_file():
                return places[0] / relative
        raise self._missing(f"image list {LISTS_FOLDER}/{relative}", places, cause)

    def _image_root(self, folder: str) -> Path:
        """The folder holding ``<folder>/`` (the set's images): OpenOOD's or pytorch-ood's layout."""
        places = [self.root / IMAGES_FOLDER, self.root]
        for place in places:
            if (place / folder).is_dir() and any(os.scandir(place / folder)):
                return place
        cause = None
        if self.download:
            from pytorch_ood.benchmark.img.openood import _download_openood_dataset

            try:  # pytorch-ood's downloader into a temporary folder, renamed into place when it is complete
                with locked(places[0], f"openood-{folder}"):
                    if not ((places[0] / folder).is_dir() and any(os.scandir(places[0] / folder))):
                        fetch = lambda tmp: _download_openood_dataset(folder, str(tmp))  # noqa: E731
                        fetch_into(f"OpenOOD {folder}", places[0], fetch, "")
            except Exception as error:  # as for the lists
                cause = error
            if (places[0] / folder).is_dir() and any(os.scandir(places[0] / folder)):
                return places[0]
        raise self._missing(f"image folder {folder}/", places, cause)

    def _missing(self, what: str, places: list[Path], cause: BaseException | None) -> DataNotFoundError:
        reason = (
            f" (download failed: {_short(cause)})"
            if cause is not None
            else " (download=false)"
            if not self.download
            else ""
        )
        looked = " or ".join(str(p) for p in places)
        return DataNotFoundError(
            f"OpenOOD v1.5 {self.benchmark} {self.split}: {what} not found in {looked}{reason}. "
            f"{_how_to_get(self.benchmark, self.root)}"
        )

    def load(self, dataset_dir: str | Path) -> ImageArray:
        from pytorch_ood.dataset.img import ImageListDataset

        list_file = self._list_file()
        # the library parses the list; its root (which must exist) only prefixes the paths
        entries = ImageListDataset(str(list_file.parent), str(list_file))
        if not entries.files:
            raise DataNotFoundError(f"OpenOOD v1.5 image list {list_file} lists no images; download it again")
        relative = [os.path.relpath(f, list_file.parent) for f in entries.files]
        folder = Path(relative[0]).parts[0]  # every list names one set's folder, e.g. cifar10/test/...
        image_root = self._image_root(folder)
        files = [os.path.join(image_root, r) for r in relative]
        digest = hashlib.sha256(list_file.read_bytes()).hexdigest()[:16]
        key = (
            f"openood|v{DECODE_VERSION}|{self.benchmark}|{self.split}|{digest}|{image_root.resolve()}|"
            f"{self.size}|{self.resize}|PIL {PIL.__version__}"
        )

        def build() -> ImageArray:
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise DataNotFoundError(
                    f"OpenOOD v1.5 {self.benchmark} {self.split}: {len(absent)} of the {len(files)} images of "
                    f"{list_file.name} "
                    f"are missing in {image_root / folder}, e.g. {absent[0]}. {_how_to_get(self.benchmark, self.root)}"
                )
            images = decode_files(files, self.size, "RGB", desc=f"decoding {self.name}", resize=self.resize)
            labels = torch.tensor(entries.labels, dtype=torch.long)  # cpu: host data
            return ImageArray(images, labels, _class_names(relative, entries.labels))

        return _cached(Path(dataset_dir), key, build)


def _class_names(relative: list[str], labels: list[int]) -> list[str] | None:
    """ID classes by label from the folder names (``cifar10/test/airplane/0001.png 0``); None
    for OOD lists (labels -1) or when a label's folder names disagree."""
    names: dict[int, str] = {}
    for path, label in zip(relative, labels, strict=True):
        if label < 0:
            return None
        name = Path(path).parent.name
        if names.setdefault(label, name) != name:
            return None
    if sorted(names) != list(range(len(names))):
        return None
    return [names[i] for i in range(len(names))]


class OpenOODTestSets(Source):
    """Every near- and far-OOD test set of the benchmark for ``name``, as one test-case entry
    that the data module expands into one test case per set (:meth:`test_sets`)."""

    def __init__(
        self, name: str, root: str | Path = "data/openood", download: bool = True, size: int = 32, resize: str = "crop"
    ):
        benchmark_class(name)
        self.benchmark, self.root, self.download, self.size, self.resize = name, root, download, size, resize
        self.name = f"OpenOOD {name} OOD test sets"

    def test_sets(self) -> dict[str, OpenOODSource]:
        return {
            set_name: OpenOODSource(self.benchmark, set_name, self.root, self.download, self.size, self.resize)
            for set_name in ood_groups(self.benchmark)
        }

    def load(self, dataset_dir: str | Path) -> ImageArray:
        raise TypeError("OpenOODTestSets is expanded into its test sets (test_sets()), not loaded")
