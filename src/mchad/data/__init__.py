"""Data: sources decoded once into uint8 tensors, batch loaders, on-device augmentation.

The classes the configs name (``mchad.data.<Class>``) are imported on first use: a process
that only loads a source (a test of a source) does not import Lightning, which the datamodules
need (``import mchad.data.sources``: 1.5 s of CPU instead of 4.3 s, on 2 cores).
``python -m mchad.data.prepare`` does: it builds the run's datamodule to learn its sources.
"""

from __future__ import annotations

import importlib

#: class -> the module of this package that defines it
_MODULES = {
    "ClassSubset": "openset",
    "DigitsSource": "sources",
    "ImageArray": "sources",
    "ImageFolderSource": "sources",
    "NoiseSource": "sources",
    "OODDataModule": "datamodule",
    "OpenOODSource": "openood",
    "OpenOODTestSets": "openood",
    "OpenSetDataModule": "openset",
    "PhotoPatchesSource": "sources",
    "PytorchOODSource": "sources",
    "Source": "sources",
    "TinyImageNetSource": "sources",
    "TinyImages300kSource": "sources",
    "TorchvisionSource": "sources",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
