"""Where the callbacks write: the run folder and the trainer's TensorBoard writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoardLogger, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def run_dir(trainer: pl.Trainer) -> Path:
    """The run folder (the trainer's ``default_root_dir``)."""
    return Path(trainer.default_root_dir)


def image_array(path: Path) -> np.ndarray:
    """A PNG as an RGB array (HWC) for ``SummaryWriter.add_image``."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
