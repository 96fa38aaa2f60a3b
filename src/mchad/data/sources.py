"""Dataset sources: each loads a whole dataset as a uint8 ``N x C x H x W`` tensor plus labels.

Decoding happens once; image folders and pytorch-ood's file-based sets are cached as a
tensor file under ``<dataset_dir>/cache/`` so that later runs start in a second. An image
folder's cache key covers every file (relative name, size, modification time) and the decode
settings, so a changed, added or removed file anywhere means a rebuild. Every array carries a
fingerprint of its content (:func:`data_fingerprint`) that runs record as provenance. Every
source raises :class:`~mchad.errors.DataNotFoundError` with the dataset, the folder looked in
and how to provide the data when it is missing offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor

from mchad.data.decode import RESIZE_MODES, decode_image, fit_image, progress  # noqa: F401 (fit_image: part of this API)
from mchad.data.fetch import constructor, library_files, locked, obtain
from mchad.errors import DataNotFoundError

log = logging.getLogger(__name__)

#: counters for the benchmark's start-up check (python -m mchad.bench): images decoded from
#: files and uint8 cache files loaded by this process
DECODED_IMAGES = 0
CACHE_LOADS = 0

IMAGE_FOLDER_INSTEAD = "use an image folder: datamodule=imagefolder datamodule.root=/path/to/folder"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
#: part of every image folder's cache key: raise it when decoding (_decode, resizing) changes
DECODE_VERSION = 2


@dataclass
class ImageArray:
    """Images as uint8 ``N x C x H x W`` and int64 labels (``< 0`` = outlier)."""

    images: Tensor
    labels: Tensor
    classes: list[str] | None = None
    #: content hash of the data as its source loaded it (see :func:`data_fingerprint`)
    fingerprint: str | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Tensor) -> ImageArray:
        return ImageArray(self.images[index], self.labels[index], self.classes)

    def as_outliers(self) -> ImageArray:
        # the same data, relabelled: it keeps the fingerprint of what was loaded
        return ImageArray(self.images, torch.full_like(self.labels, -1), self.classes, self.fingerprint)


def data_fingerprint(array: ImageArray) -> str:
    """A short hash of ``array``'s content (pixels, shape, labels, class names), computed once.

    Cached arrays carry the one computed when the cache was built (no cost at start-up); it
    identifies the data itself, so two copies of a dataset in different folders agree.
    """
    if array.fingerprint is None:
        digest = hashlib.sha256(f"{tuple(array.images.shape)}|{array.classes}|".encode())
        for tensor in (array.images, array.labels):
            digest.update(memoryview(tensor.detach().cpu().contiguous().numpy()).cast("B"))
        array.fingerprint = digest.hexdigest()[:16]
    return array.fingerprint


class Source:
    """Something that can load an :class:`ImageArray` from ``dataset_dir``."""

    name: str = "dataset"

    def load(self, dataset_dir: str | Path) -> ImageArray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def describe(self) -> str:
        """How messages name this data (an image folder: its path)."""
        return self.name

    def class_names(self) -> list[str] | None:
        """The dataset's class names in label order, known without decoding (None: unknown)."""
        return None

    def class_count(self) -> int | None:
        """How many classes the labels number, known without decoding (None: unknown)."""
        names = self.class_names()
        return None if names is None else len(names)


def _missing(name: str, folder: Path | str, how: str, cause: BaseException | str | None = None) -> DataNotFoundError:
    reason = f" ({_short(cause)})" if cause else ""
    return DataNotFoundError(f"{name} not found in {folder}{reason}. {how}")


def _short(cause: BaseException | str) -> str:
    text = str(cause).strip().splitlines()
    text = text[0] if text else type(cause).__name__
    return text[:160]


def _how(call: str, root: Path | str, instead: str) -> str:
    """How to get a library's dataset by hand (the end of its not-found line)."""
    return (
        f"Download it where there is internet (python -m mchad.data.prepare experiment=..., or {call}) and copy it "
        f"into {root}, or set dataset_dir=/path/holding/it, or {instead}."
    )


def _to_uint8_nchw(images: np.ndarray, channels_last: bool = True) -> Tensor:
    array = np.ascontiguousarray(images)
    if array.ndim == 3:
        array = array[..., None] if channels_last else array[:, None]
    tensor = torch.from_numpy(array)  # cpu: data sets live in host memory (mchad.devices)
    return tensor.permute(0, 3, 1, 2).contiguous() if channels_last else tensor.contiguous()


def _cache_file(dataset_dir: Path, key: str) -> Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return dataset_dir / "cache" / f"{digest}.pt"


def _read_cache(path: Path, key: str, what: str) -> ImageArray | None:
    """The array cached in ``path`` for ``key``, None if there is none (or it is unreadable)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if data.get("key", key) != key:
            raise ValueError("it was built for other data")
        array = ImageArray(data["images"], data["labels"], data.get("classes"), data.get("fingerprint"))
    except Exception as error:  # a truncated or foreign cache file is rebuilt, not fatal
        log.warning("Ignoring unreadable cache %s: %s", path, _short(error))
        return None
    global CACHE_LOADS
    CACHE_LOADS += 1
    log.info("%sloaded %d images from cache %s", f"{what}: " if what else "", len(array), path)
    return array


def _cached(dataset_dir: Path, key: str, build, what: str = "") -> ImageArray:
    """Load ``key`` from the cache, or build it and write it atomically. Building (fetch and
    decode) holds the cache file's lock (:func:`mchad.data.fetch.locked`): a second process
    waits for the first and then loads its cache instead of decoding too."""
    path = _cache_file(Path(dataset_dir), key)
    if (array := _read_cache(path, key, what)) is not None:
        return array
    with locked(path.parent, path.stem):
        if (array := _read_cache(path, key, what)) is not None:  # built by another process meanwhile
            return array
        array = build()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            content = {"images": array.images, "labels": array.labels, "classes": array.classes}
            torch.save({**content, "key": key, "fingerprint": data_fingerprint(array)}, tmp)
            os.replace(tmp, path)
        except OSError as error:  # a read-only dataset_dir only costs decoding again next time
            log.warning("Could not write cache %s: %s", path, _short(error))
    return array


def decode_files(
    files: list[str], size: int | None, mode: str = "RGB", desc: str = "decoding", resize: str = "crop"
) -> Tensor:
    """Decode image files in parallel threads (PIL releases the GIL) into uint8 N x C x H x W,
    images of another size brought to ``size`` by ``resize`` (see RESIZE_MODES)."""
    if not files:
        raise ValueError("no image files to decode")
    global DECODED_IMAGES
    DECODED_IMAGES += len(files)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(
            progress(pool.map(lambda f: decode_image(f, size, mode, resize), files, chunksize=256), len(files), desc)
        )
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size {sorted(shapes)[:3]}...; set a size to resize them to")
    return _to_uint8_nchw(np.stack(arrays))


def image_files(folder: Path | str, recursive: bool = True, skipped: list[str] | None = None) -> list[str]:
    """Image files under ``folder`` in ``sorted(Path.rglob(...))`` order (path components
    compared in turn), as strings. ``os.walk`` and string keys instead of ``Path`` objects:
    listing CIFAR-10's 50,000 training files takes 0.14 s instead of 0.31 s on every start.
    Other files (not hidden ones) are appended to ``skipped`` when given."""
    files = []
    for directory, _subdirs, names in os.walk(folder):
        files += [os.path.join(directory, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
        if skipped is not None:
            skipped += [
                os.path.join(directory, n)
                for n in names
                if not n.startswith(".") and os.path.splitext(n)[1].lower() not in IMAGE_SUFFIXES
            ]
        if not recursive:
            break
    return sorted(files, key=lambda f: f.split(os.sep))


def files_signature(folder: str | Path, files: list[str]) -> str:
    """A hash of every file's name relative to ``folder``, size and modification time (ns).

    Part of an image folder's cache key: a file replaced, edited, added, removed or renamed
    anywhere changes it. One ``stat`` per file: about 0.3 s for CIFAR-10's 60,000 files on a
    2-core machine, at every start (see docs/reliability.md). A file rewritten with the same
    size and its old modification time restored (``touch -d``) is not noticed.
    """
    skip = len(os.path.join(str(folder), ""))
    rows = []
    for name in files:
        stat = os.stat(name)
        rows.append(f"{name[skip:]}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
    return hashlib.sha256("".join(rows).encode()).hexdigest()


class ImageFolderSource(Source):
    """Images in ``root/[split/]<class>/*`` (torchvision's ImageFolder layout); classes sorted.

    With ``classes`` given, only those class folders are read, in that order. With
    ``outlier=True`` every label is -1 (an OOD test set or an outlier-exposure source;
    class folders are then optional: images directly under the folder are read too).
    """

    def __init__(
        self,
        root: str,
        split: str | None = None,
        size: int | None = None,
        grayscale: bool = False,
        classes: list[str] | None = None,
        outlier: bool = False,
        name: str | None = None,
    ):
        self.root = Path(root).expanduser()
        self.split = split
        self.size = size
        self.grayscale = grayscale
        self.classes = list(classes) if classes else None
        self.outlier = outlier
        self.name = name or (self.root.name + (f"/{split}" if split else ""))

    def describe(self) -> str:
        return str(self.root / self.split if self.split else self.root)

    def _folder(self) -> Path:
        folder = self.root / self.split if self.split else self.root
        if not folder.is_dir():  # named by its path: an image folder's config may inherit a dataset's name
            raise _missing(
                f"image folder {folder.name}",
                folder.parent,
                "Point the config at a folder in image-folder layout (<root>/<split>/<class>/<image>).",
            )
        return folder

    def _classes(self, folder: Path) -> list[str]:
        subdirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        classes = self.classes or subdirs
        missing = [c for c in classes if c not in subdirs]
        if missing:
            raise DataNotFoundError(f"image folder {folder}: class folders {missing} are missing.")
        return classes

    def class_names(self) -> list[str] | None:
        """The class folders (sorted, or ``classes``), listed without decoding; None for outliers."""
        return None if self.outlier else self._classes(self._folder())

    def _files(self, folder: Path) -> tuple[list[str], list[int], list[str]]:
        classes = self._classes(folder)
        files, labels, skipped, empty = [], [], [], []
        for label, cls in enumerate(classes):
            found = image_files(folder / cls, skipped=skipped)
            files += found
            labels += [label] * len(found)
            if not found:
                empty.append(cls)
        if self.outlier:
            files += image_files(folder, recursive=False, skipped=skipped)
            labels += [0] * (len(files) - len(labels))
        if skipped:
            log.warning(
                "%s: skipped %d file(s) that are not images (%s), e.g. %s",
                folder,
                len(skipped),
                " ".join(sorted(IMAGE_SUFFIXES)),
                os.path.relpath(skipped[0], folder),
            )
        if empty:
            log.warning("%s: class folder(s) %s hold no images and are skipped", folder, ", ".join(empty))
        return files, labels, classes

    def load(self, dataset_dir: str | Path) -> ImageArray:
        folder = self._folder()
        files, labels, classes = self._files(folder)
        if not files:
            raise _missing(self.name, folder, f"The folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        mode = "L" if self.grayscale else "RGB"
        key = (
            f"folder|v{DECODE_VERSION}|{folder.resolve()}|{len(files)}|{files_signature(folder, files)}|"
            f"{self.size}|{mode}|{classes}|{self.outlier}|PIL {PIL.__version__}"
        )

        def build() -> ImageArray:
            images = decode_files(files, self.size, mode, desc=f"decoding {folder}")
            return ImageArray(images, torch.tensor(labels, dtype=torch.long), classes)  # cpu: host data

        array = _cached(Path(dataset_dir), key, build, str(folder))
        return array.as_outliers() if self.outlier else array


class TorchvisionSource(Source):
    """CIFAR10, CIFAR100 or SVHN from torchvision, downloaded into ``dataset_dir`` if missing."""

    SPLITS = {"CIFAR10": ("train", "test"), "CIFAR100": ("train", "test"), "SVHN": ("train", "test", "extra")}

    def __init__(self, name: str, split: str = "train", download: bool = True):
        if name not in self.SPLITS:
            raise ValueError(f"unknown torchvision dataset {name!r}; choose from {sorted(self.SPLITS)}")
        if split not in self.SPLITS[name]:
            raise ValueError(f"{name} has no split {split!r}; choose from {self.SPLITS[name]}")
        self.name = name
        self.split = split
        self.download = download

    def class_names(self) -> list[str]:
        from mchad.data.osr import CLASS_NAMES

        return list(CLASS_NAMES.get(self.name, [str(digit) for digit in range(10)]))  # SVHN: digit d is label d

    def library_files(self) -> dict[str, str | None]:
        """The files torchvision keeps for this split in ``dataset_dir`` and their MD5 sums."""
        import torchvision.datasets as tvd

        if self.name == "SVHN":
            return dict([tvd.SVHN.split_list[self.split][1:]])
        cls = getattr(tvd, self.name)
        batches = cls.train_list if self.split == "train" else cls.test_list
        return {
            cls.filename: cls.tgz_md5,
            **{f"{cls.base_folder}/{name}": md5 for name, md5 in batches},
            f"{cls.base_folder}/{cls.meta['filename']}": cls.meta["md5"],
        }

    def load(self, dataset_dir: str | Path) -> ImageArray:
        import torchvision.datasets as tvd

        root, cls = Path(dataset_dir), getattr(tvd, self.name)
        split = {"split": self.split} if self.name == "SVHN" else {"train": self.split == "train"}
        how = _how(f"torchvision's {self.name} with download=True", root, IMAGE_FOLDER_INSTEAD)
        name, files = f"{self.name} ({self.split})", self.library_files()  # one lock for all splits: one archive
        data = obtain(name, root, constructor(cls, **split), self.download, how, files, lock=self.name)
        if self.name == "SVHN":
            images, labels, classes = _to_uint8_nchw(data.data, channels_last=False), data.labels, None
        else:
            images, labels, classes = _to_uint8_nchw(data.data), data.targets, list(data.classes)
        # torchvision verified the files' MD5 sums while loading: they identify the content for free
        checked = list(files.values()) if self.name == "SVHN" else list(files.values())[1:-1]  # the split's batches
        fingerprint = hashlib.sha256(f"torchvision|{self.name}|{self.split}|{checked}".encode()).hexdigest()[:16]
        # cpu: a data source decodes into host memory (mchad.devices)
        return ImageArray(images, torch.as_tensor(labels).long(), classes, fingerprint)


class PytorchOODSource(Source):
    """An OOD dataset from pytorch-ood (``Textures``, ``TinyImageNetCrop``, ``TinyImageNetResize``,
    ``LSUNCrop``, ``LSUNResize``, ...), downloaded into ``dataset_dir``, resized to ``size`` and
    decoded once into the cache. All labels are -1. ``resize``: how images of another size
    (Textures) are fitted, ``crop`` or ``squash`` (published), see ``RESIZE_MODES``."""

    def __init__(self, name: str, size: int = 32, download: bool = True, resize: str = "crop"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.name = name
        self.size = size
        self.download = download
        self.resize = resize

    def load(self, dataset_dir: str | Path) -> ImageArray:
        import pytorch_ood.dataset.img as datasets

        cls = getattr(datasets, self.name, None)
        if cls is None:
            raise ValueError(f"pytorch-ood has no image dataset {self.name!r}")
        root = Path(dataset_dir)
        key = f"pytorch-ood|{self.name}|{root.resolve()}|{self.size}" + (
            "" if self.resize == "crop" else f"|{self.resize}"
        )
        path = _cache_file(root, key)

        def build() -> ImageArray:
            call = f"pytorch_ood.dataset.img.{self.name}(root, download=True)"
            how = _how(call, root, "use any image folder as a test case (see config/testmodules/)")
            dataset = obtain(self.name, root, constructor(cls), self.download, how, library_files(cls))
            # the file-based sets list their files; decode them in parallel instead of via __getitem__
            files = [os.path.join(dataset.basedir, f) for f in getattr(dataset, "files", [])]
            if files:
                images = decode_files(files, self.size, desc=f"decoding {self.name}", resize=self.resize)
            else:
                images = _to_uint8_nchw(
                    np.stack(
                        [fit_image(dataset[i][0].convert("RGB"), self.size, self.resize) for i in range(len(dataset))]
                    )
                )
            return ImageArray(images, torch.full((len(images),), -1, dtype=torch.long))  # cpu: host data

        if not path.exists():
            log.info("Preparing %s (decoded once, cached in %s)", self.name, path)
        return _cached(root, key, build, self.name)


class TinyImageNetSource(Source):
    """TinyImageNet's labelled ``train`` or ``val`` images (pytorch-ood, downloaded into
    ``dataset_dir``), labels = index of the WordNet id in sorted order, resized to ``size``
    and cached. Used by the open-set setting TinyImageNet 20/180 (``val`` as its test set)."""

    def __init__(self, split: str = "train", size: int = 32, download: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"TinyImageNet split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.download = split, size, download
        self.name = f"TinyImageNet/{split}"

    def class_count(self) -> int:
        return 200

    def load(self, dataset_dir: str | Path) -> ImageArray:
        from pytorch_ood.dataset.img import TinyImageNet

        root = Path(dataset_dir)
        how = _how("pytorch_ood.dataset.img.TinyImageNet(root, download=True)", root, IMAGE_FOLDER_INSTEAD)
        construct = constructor(TinyImageNet, subset=self.split)
        data = obtain(self.name, root, construct, self.download, how, library_files(TinyImageNet), "TinyImageNet")
        key = f"tinyimagenet|{self.split}|{root.resolve()}|{len(data.paths)}|{self.size}"
        classes = sorted(data.class_map, key=data.class_map.get)

        def build() -> ImageArray:
            images = decode_files(list(data.paths), self.size, desc=f"decoding {self.name}")
            # cpu: a data source decodes into host memory (mchad.devices)
            return ImageArray(images, torch.tensor(data.labels, dtype=torch.long), classes)

        return _cached(root, key, build, self.name)


class TinyImages300kSource(Source):
    """Hendrycks' 300K random TinyImages (outlier exposure), downloaded into ``dataset_dir``."""

    name = "TinyImages300k"

    def __init__(self, download: bool = True):
        self.download = download

    def load(self, dataset_dir: str | Path) -> ImageArray:
        from pytorch_ood.dataset.img import TinyImages300k

        instead = "use any image folder as outliers: datamodule/outliers=imagefolder datamodule.outliers.root=/path"
        how = _how(f"{TinyImages300k.url} into the folder", dataset_dir, instead)
        construct, files = constructor(TinyImages300k), library_files(TinyImages300k)
        data = obtain(self.name, Path(dataset_dir), construct, self.download, how, files).data
        images = _to_uint8_nchw(data)
        return ImageArray(images, torch.full((len(images),), -1, dtype=torch.long))  # cpu: host data


class NoiseSource(Source):
    """Gaussian (mean 128, std 128, clipped) or uniform [0, 255] noise images, fixed by ``seed``.

    Same distributions as pytorch-ood's ``GaussianNoise``/``UniformNoise``, but drawn as one
    array: theirs draw per item from a shared generator, so the images depend on access order.
    """

    KINDS = ("gaussian", "uniform")

    def __init__(
        self, kind: str, n: int = 10000, size: int = 32, channels: int = 3, seed: int = 0, name: str | None = None
    ):
        if kind not in self.KINDS:
            raise ValueError(f"noise kind must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.n, self.size, self.channels, self.seed = kind, n, size, channels, seed
        self.name = name or f"{kind.capitalize()}Noise"

    def load(self, dataset_dir: str | Path | None = None) -> ImageArray:
        if dataset_dir is None or self.n * self.channels * self.size**2 < 1_000_000:
            return self._draw()
        # drawing 10,000 CIFAR-sized images takes ~1 s per set: cached like decoded data
        key = f"noise|v1|{self.kind}|{self.n}|{self.channels}|{self.size}|{self.seed}"
        return _cached(Path(dataset_dir), key, self._draw)

    def _draw(self) -> ImageArray:
        rng = np.random.default_rng(self.seed)
        shape = (self.n, self.channels, self.size, self.size)
        if self.kind == "gaussian":
            values = np.clip(rng.normal(128, 128, size=shape), 0, 255)
        else:
            values = rng.uniform(0, 255, size=shape)
        # cpu: host data, like every source
        return ImageArray(torch.from_numpy(values.astype(np.uint8)), torch.full((self.n,), -1, dtype=torch.long))


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (pixels 0..16, labels), read from its CSV file without importing
    scikit-learn (seconds of start-up), else through ``sklearn.datasets.load_digits``."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
        if path.exists():
            data = np.loadtxt(path, delimiter=",")
            if data.ndim == 2 and data.shape[1] == 65:
                return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


class DigitsSource(Source):
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

    A fixed, stratified two-thirds/one-third train/test split (independent of the run's seed).
    ``classes`` selects digits; they are relabelled 0..k-1 in the given order, or -1 with
    ``outlier=True`` (the open-set test case of the quick-start).
    """

    def __init__(
        self, split: str = "train", classes: list[int] | None = None, outlier: bool = False, name: str | None = None
    ):
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.classes = list(classes) if classes is not None else list(range(10))
        self.outlier = outlier
        self.name = name or f"Digits{''.join(map(str, self.classes))}"

    def class_names(self) -> list[str] | None:
        return None if self.outlier else [str(c) for c in self.classes]

    def load(self, dataset_dir: str | Path | None = None) -> ImageArray:
        pixels, target = _load_digits()
        # values 0..16 -> 0..255
        images = np.round(pixels.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
        rng = np.random.default_rng(0)
        in_test = np.zeros(len(target), dtype=bool)
        for digit in range(10):
            idx = np.flatnonzero(target == digit)
            in_test[rng.permutation(idx)[: len(idx) // 3]] = True
        keep = (in_test if self.split == "test" else ~in_test) & np.isin(target, self.classes)
        relabel = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([-1 if self.outlier else relabel[t] for t in target[keep]], dtype=np.int64)
        labels = torch.from_numpy(labels)  # cpu: host data
        return ImageArray(_to_uint8_nchw(images[keep]), labels, [str(c) for c in self.classes])


class PhotoPatchesSource(Source):
    """Random square patches of the two photos scikit-learn ships (``load_sample_images``:
    a temple in China and a flower), fixed by ``seed``; all labels -1. Real images that are not
    digits: the offline outlier-exposure source of the quick-start."""

    def __init__(
        self, n: int = 10000, size: int = 8, grayscale: bool = True, seed: int = 0, name: str = "PhotoPatches"
    ):
        if n < 1 or size < 1:
            raise ValueError(f"n and size must be >= 1, got n={n}, size={size}")
        self.n, self.size, self.grayscale, self.seed, self.name = n, size, grayscale, seed, name

    def load(self, dataset_dir: str | Path | None = None) -> ImageArray:
        from sklearn.datasets import load_sample_images

        photos = [Image.fromarray(p) for p in load_sample_images().images]
        if self.grayscale:
            photos = [p.convert("L") for p in photos]
        photos = [np.asarray(p, dtype=np.uint8) for p in photos]
        rng = np.random.default_rng(self.seed)
        which = rng.integers(0, len(photos), self.n)
        patches = []
        for index in which:
            photo = photos[index]
            top = rng.integers(0, photo.shape[0] - self.size + 1)
            left = rng.integers(0, photo.shape[1] - self.size + 1)
            patches.append(photo[top : top + self.size, left : left + self.size])
        images = _to_uint8_nchw(np.stack(patches))
        return ImageArray(images, torch.full((self.n,), -1, dtype=torch.long))  # cpu: host data
