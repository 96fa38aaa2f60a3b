"""Data: sources decoded once into uint8 tensors, batch loaders, on-device augmentation."""

from mchad.data.datamodule import OODDataModule
from mchad.data.openood import OpenOODSource, OpenOODTestSets
from mchad.data.openset import ClassSubset, OpenSetDataModule
from mchad.data.sources import (
    DigitsSource,
    ImageArray,
    ImageFolderSource,
    NoiseSource,
    PhotoPatchesSource,
    PytorchOODSource,
    Source,
    TinyImageNetSource,
    TinyImages300kSource,
    TorchvisionSource,
)

__all__ = [
    "ClassSubset",
    "DigitsSource",
    "ImageArray",
    "ImageFolderSource",
    "NoiseSource",
    "OODDataModule",
    "OpenOODSource",
    "OpenOODTestSets",
    "OpenSetDataModule",
    "PhotoPatchesSource",
    "PytorchOODSource",
    "Source",
    "TinyImageNetSource",
    "TinyImages300kSource",
    "TorchvisionSource",
]
