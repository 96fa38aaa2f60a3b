"""Batch loaders, the datamodule's data path and the uint8 cache (fast: tiny tensors)."""

from pathlib import Path

import pytest
import torch

from mchad.data import sources
from mchad.data.loaders import OutlierExposureLoader, TensorBatchLoader
from mchad.data.sources import ImageArray, ImageFolderSource


def array(n: int = 50, label: int | None = None) -> ImageArray:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n) % 5 if label is None else torch.full((n,), label)
    return ImageArray(images, labels)


def test_shuffled_epoch_is_a_permutation_driven_by_seed_and_epoch():
    data = array(50)
    epoch = [0]
    loader = TensorBatchLoader(data, 8, shuffle=True, drop_last=False, seed=3, epoch=lambda: epoch[0])
    batches = list(loader)
    assert len(batches) == len(loader) == 7
    seen = torch.cat([b[0][:, 0, 0, 0] for b in batches]).long()
    assert sorted(seen.tolist()) == list(range(50))
    # images and labels stay paired
    for images, labels in batches:
        assert torch.equal(images[:, 0, 0, 0].long() % 5, labels)
    again = torch.cat([b[0][:, 0, 0, 0] for b in loader]).long()
    assert torch.equal(seen, again)
    epoch[0] = 1
    other = torch.cat([b[0][:, 0, 0, 0] for b in loader]).long()
    assert not torch.equal(seen, other)
    assert not torch.equal(seen, torch.arange(50))


def test_drop_last_and_order_without_shuffle():
    loader = TensorBatchLoader(array(50), 8, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(len(b[0]) == 8 for b in batches)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(48) % 5)


def test_outlier_exposure_batches():
    inliers = TensorBatchLoader(array(40), 8, shuffle=True, drop_last=True, seed=1)
    outliers = TensorBatchLoader(array(12, label=-1), 6, shuffle=True, drop_last=True, seed=2)
    loader = OutlierExposureLoader(inliers, outliers)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for images, labels in batches:
        assert images.shape == (14, 3, 4, 4)
        assert (labels[:8] >= 0).all() and (labels[8:] == -1).all()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.gpu
@needs_gpu
def test_pinned_batches_when_asked():
    loader = TensorBatchLoader(array(20), 8, shuffle=True, pin_memory=True)
    images, labels = next(iter(loader))
    assert images.is_pinned() and labels.is_pinned()


@pytest.mark.gpu
@needs_gpu
def test_gathered_on_the_gpu_when_the_data_live_there():
    data = array(20)
    loader = TensorBatchLoader(data, 8, shuffle=True, seed=0, device="cuda")
    on_gpu = [(images.cpu(), labels.cpu()) for images, labels in loader]
    on_host = list(TensorBatchLoader(data, 8, shuffle=True, seed=0, pin_memory=False))
    for (a, b), (c, d) in zip(on_gpu, on_host, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_image_folder_is_decoded_once_then_cached(image_folder: Path, tmp_path: Path):
    source = ImageFolderSource(str(image_folder), split="train", size=32)
    decoded = sources.DECODED_IMAGES
    first = source.load(tmp_path / "data")
    assert sources.DECODED_IMAGES == decoded + len(first)
    assert list((tmp_path / "data" / "cache").glob("*.pt"))
    loads = sources.CACHE_LOADS
    second = source.load(tmp_path / "data")
    assert sources.DECODED_IMAGES == decoded + len(first)  # nothing decoded again
    assert sources.CACHE_LOADS == loads + 1
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.images.dtype == torch.uint8 and second.images.shape[1:] == (3, 32, 32)


def _rewrite_image(path: Path, value: int) -> None:
    """Overwrite an image file with a plain image of ``value`` (same name, same size: 32x32 PNG)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def test_any_changed_image_rebuilds_the_cache(image_folder: Path, tmp_path: Path):
    """Guards the cache key: replacing one image in the middle of the folder (or only touching
    it, or adding one) decodes again and gives the new pixels; an unchanged folder does not."""
    import os

    source = ImageFolderSource(str(image_folder), split="train", size=32)
    files = sources.image_files(image_folder / "train")
    middle = Path(files[len(files) // 2])
    first = source.load(tmp_path)
    decoded = sources.DECODED_IMAGES

    _rewrite_image(middle, 7)
    changed = source.load(tmp_path)
    assert sources.DECODED_IMAGES == decoded + len(files)
    index = files.index(str(middle))
    assert (changed.images[index] == 7).all() and not torch.equal(changed.images, first.images)
    assert torch.equal(changed.images[:index], first.images[:index])
    assert changed.fingerprint != first.fingerprint

    stat = middle.stat()
    os.utime(middle, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new time
    source.load(tmp_path)
    assert sources.DECODED_IMAGES == decoded + 2 * len(files)
    (image_folder / "train" / "class1" / "extra.png").write_bytes(middle.read_bytes())
    assert len(source.load(tmp_path)) == len(files) + 1
    again = sources.DECODED_IMAGES
    source.load(tmp_path)
    assert sources.DECODED_IMAGES == again  # unchanged: from the cache


def test_decode_settings_are_part_of_the_cache_key(image_folder: Path, tmp_path: Path):
    """Guards the key's decode settings: another size or colour mode is another cache entry."""
    rgb = ImageFolderSource(str(image_folder), split="train", size=32).load(tmp_path)
    small = ImageFolderSource(str(image_folder), split="train", size=16).load(tmp_path)
    grey = ImageFolderSource(str(image_folder), split="train", size=32, grayscale=True).load(tmp_path)
    assert small.images.shape[2:] == (16, 16) and grey.images.shape[1] == 1 and rgb.images.shape[1] == 3
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    assert len({rgb.fingerprint, small.fingerprint, grey.fingerprint}) == 3


def test_data_fingerprint_is_the_content(image_folder: Path, tmp_path: Path):
    """Guards the provenance fingerprint: the same images in another folder (another cache entry)
    give the same fingerprint; the cached one equals a fresh hash of the loaded tensors."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    a = ImageFolderSource(str(image_folder), split="train", size=32).load(tmp_path / "data")
    b = ImageFolderSource(str(copy), split="train", size=32).load(tmp_path / "data")
    assert len(list((tmp_path / "data" / "cache").glob("*.pt"))) == 2
    assert a.fingerprint == b.fingerprint
    fresh = sources.data_fingerprint(sources.ImageArray(a.images.clone(), a.labels.clone(), a.classes))
    assert fresh == a.fingerprint


def test_digits_without_scikit_learn_import_match_scikit_learn():
    import numpy as np
    from sklearn.datasets import load_digits

    pixels, target = sources._load_digits()
    digits = load_digits()
    assert np.array_equal(pixels, digits.data) and np.array_equal(target, digits.target)


def test_performance_options_and_bf16_autocast(tmp_path: Path):
    """model.channels_last puts convolutions and batches in that format; under bf16 autocast the
    method still computes distances and losses in float32."""
    from conftest import compose_config

    from mchad.runs.train import build

    cfg = compose_config(["model.channels_last=true"], output_dir=tmp_path)
    datamodule, model = build(cfg)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = next(iter(datamodule.train_dataloader()))
    x = datamodule.transform(images, augment=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = model._loss(out, labels)
    assert out.distances.dtype == torch.float32
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()


def test_data_stay_on_the_host_without_a_gpu(tmp_path: Path):
    from conftest import compose_config
    from hydra.utils import instantiate

    cfg = compose_config([], output_dir=tmp_path)
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    assert datamodule._device() is None  # no trainer, or a CPU trainer: gather on the host
    with pytest.raises(Exception, match="data_on_device"):
        instantiate(cfg.datamodule, data_on_device="sometimes")


def test_noise_sets_are_cached_with_the_same_values(tmp_path: Path):
    from mchad.data.sources import NoiseSource

    for kind in NoiseSource.KINDS:
        source = NoiseSource(kind, n=400, size=32, seed=3)
        drawn = source._draw()
        loads = sources.CACHE_LOADS
        first, second = source.load(tmp_path), source.load(tmp_path)
        assert sources.CACHE_LOADS == loads + 1
        for array in (first, second):
            assert torch.equal(array.images, drawn.images) and (array.labels == -1).all()


def test_image_files_are_listed_in_path_order(tmp_path: Path):
    """The fast listing keeps ``sorted(Path.rglob)``'s order (components compared in turn, so
    ``a/z`` before ``a-b/a``), skips non-images and does not descend when told not to."""
    names = ["a/z.png", "a-b/a.png", "a/b/c.JPG", "a/b.png", "b.jpeg", "notes.txt", "a/readme.md", "a0/x.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = [str(p) for p in sorted(tmp_path.rglob("*")) if p.suffix.lower() in sources.IMAGE_SUFFIXES]
    assert sources.image_files(tmp_path) == expected
    assert expected.index(str(tmp_path / "a/z.png")) < expected.index(str(tmp_path / "a-b/a.png"))
    assert sources.image_files(tmp_path, recursive=False) == [str(tmp_path / "b.jpeg")]


def test_decoding_says_how_far_it_is_and_a_cache_hit_says_so(image_folder: Path, tmp_path: Path, caplog, monkeypatch):
    """Issue 32: decoding CIFAR-10's 60,000 files took ~38 s without a line off a terminal.
    Off a terminal (as here: pytest captures stderr) a line at the start, every LOG_EVERY_S
    seconds (0 here: after every file) and at the end, each with files done, total and rate;
    a cache hit is one line."""
    import logging
    import re
    import sys

    from mchad.data import decode

    assert not sys.stderr.isatty()
    monkeypatch.setattr(decode, "LOG_EVERY_S", 0.0)
    source = ImageFolderSource(str(image_folder), split="train", size=32)
    folder = image_folder / "train"
    with caplog.at_level(logging.INFO, logger="mchad"):
        first = source.load(tmp_path / "data")
    lines = [r.getMessage() for r in caplog.records if r.name == "mchad.data.decode"]
    total = len(first)
    assert lines[0] == f"decoding {folder}: {total} files (decoded once, then loaded from the cache)"
    assert re.fullmatch(rf"decoding {re.escape(str(folder))}: 1/{total} files \(\d+ files/s\)", lines[1]), lines[1]
    assert len(lines) == total + 1  # start, after files 1..total-1, and the last line
    assert re.fullmatch(
        rf"decoding {re.escape(str(folder))}: {total}/{total} files in [\d.]+ s \(\d+ files/s\)", lines[-1]
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mchad"):
        source.load(tmp_path / "data")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{folder}: loaded {total} images from cache {tmp_path / 'data' / 'cache'}")
