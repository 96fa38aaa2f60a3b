"""Decoding one image file (resized as configured) and the progress of decoding many.

A data source decodes a folder once (then it is cached, :mod:`mchad.data.sources`); for a
large folder that takes a while, so :func:`progress` says how far it is: a tqdm bar on a
terminal, else a log line when it starts, every :data:`LOG_EVERY_S` seconds and when done,
each with the files done, the total and the rate.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from mchad.errors import DataError, first_line

log = logging.getLogger(__name__)

#: seconds between two progress lines when the output is not a terminal (a log file, a pipe)
LOG_EVERY_S = 5.0
T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` (``total`` decoded files) passed through while their progress is shown."""
    start = last = time.monotonic()
    done = 0
    if sys.stderr.isatty():  # a person watches: tqdm's bar shows done/total and the rate
        items = tqdm(items, total=total, desc=desc, unit="file", leave=False)
    else:
        log.info("%s: %d files (decoded once, then loaded from the cache)", desc, total)
    for item in items:
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S and done < total and not isinstance(items, tqdm):
            log.info("%s: %d/%d files (%.0f files/s)", desc, done, total, done / (now - start))
            last = now
        yield item
    elapsed = time.monotonic() - start
    log.info("%s: %d/%d files in %.1f s (%.0f files/s)", desc, done, total, elapsed, done / max(elapsed, 1e-6))


#: how images of another size are brought to ``size x size``: ``crop`` = short side resized
#: (antialiased) and the centre cropped (ours); ``squash`` = the whole image resized to
#: ``size x size``, aspect not kept, bilinear without antialiasing, as the published test sets
#: were (a tensor ``Resize((32, 32))`` of torchvision 0.12 after ``ToTensor``)
RESIZE_MODES = ("crop", "squash")


def decode_image(path: str, size: int | None, mode: str, resize: str = "crop") -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size, size):
                return fit_image(image, size, resize)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: unidentified, truncated, broken files
        raise DataError(f"cannot read the image {path} ({first_line(error)}); remove or replace the file") from error


def fit_image(image: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """``image`` as a uint8 ``size x size`` array, resized by ``resize`` (see RESIZE_MODES)."""
    if resize == "crop":
        return np.asarray(_resize_center_crop(image, size), dtype=np.uint8)
    if resize != "squash":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    array = torch.from_numpy(np.asarray(image, dtype=np.float32))  # cpu: decoding into host memory
    x = (array.unsqueeze(-1) if array.ndim == 2 else array).permute(2, 0, 1).unsqueeze(0) / 255
    # torchvision 0.12's tensor Resize: interpolate(bilinear, align_corners=False), no antialiasing;
    # the result is stored as uint8 (rounded: at most 0.5/255 from the published floats)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    out = (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out[..., 0] if array.ndim == 2 else out


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and crop the centre (torchvision's Resize + CenterCrop)."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
