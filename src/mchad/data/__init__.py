"""Data: sources decoded once into uint8 tensors, batch loaders, on-device augmentation."""

from mchad.data.datamodule import OODDataModule
from mchad.data.sources import (
    DigitsSource,
    ImageArray,
    ImageFolderSource,
    NoiseSource,
    PhotoPatchesSource,
    PytorchOODSource,
    Source,
    TinyImages300kSource,
    TorchvisionSource,
)

__all__ = [
    "DigitsSource",
    "ImageArray",
    "ImageFolderSource",
    "NoiseSource",
    "OODDataModule",
    "PhotoPatchesSource",
    "PytorchOODSource",
    "Source",
    "TinyImages300kSource",
    "TorchvisionSource",
]
