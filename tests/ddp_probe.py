"""A callback the DDP tests add to `python run.py` (tests/ on PYTHONPATH): each rank writes
what it trained on to ``<out>/rank<r>.json``; optionally one rank's batch becomes NaN, or one
rank raises (``fail_rank``/``fail_step``: the rank-failure test).

- ``epochs``: per epoch the hashes of the training rows this rank saw (run without
  augmentation, ``datamodule.crop_padding=0``, so a row is the normalised image);
- ``all_rows`` (rank 0): the hashes of every training image, normalised the same way;
- ``centers``: II's running centres at the end of training (else null).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


def _row_hashes(images: torch.Tensor) -> list[str]:
    rows = images.detach().float().cpu().contiguous().numpy()
    return [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in rows]


class SampleProbe(pl.Callback):
    def __init__(self, out: str, nan_rank: int = -1, nan_step: int = -1, fail_rank: int = -1, fail_step: int = -1):
        self.out = Path(out)
        self.nan_rank, self.nan_step = nan_rank, nan_step
        self.fail_rank, self.fail_step = fail_rank, fail_step
        self.epochs: dict[int, list[str]] = {}
        self.batch_sizes: list[int] = []

    def setup(self, trainer, pl_module, stage):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images, labels = batch
        self.epochs.setdefault(trainer.current_epoch, []).extend(_row_hashes(images))
        self.batch_sizes.append(len(images))
        if trainer.global_rank == self.nan_rank and trainer.global_step == self.nan_step:
            images.fill_(float("nan"))
        if trainer.global_rank == self.fail_rank and trainer.global_step == self.fail_step:
            (self.out / f"failed{trainer.global_rank}.time").write_text(repr(time.time()))
            raise ValueError(f"probe failure on rank {trainer.global_rank} at step {trainer.global_step}")

    def on_train_end(self, trainer, pl_module):
        datamodule = trainer.datamodule
        train = datamodule.data["train"].images
        method = pl_module.method
        centers = method.running.running_centers.tolist() if hasattr(method, "running") else None
        content = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epochs": {str(e): rows for e, rows in self.epochs.items()},
            "batch_sizes": self.batch_sizes,
            "all_rows": _row_hashes(datamodule.transform(train, augment=False)) if trainer.is_global_zero else None,
            "centers": centers,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(content))


class EpochTimer(pl.Callback):
    """Seconds of each training epoch's batches (epoch start to the end of its last training
    step, without validation) and rows trained per epoch on this rank, written to
    ``<out>/timing<rank>.json`` (the DDP measurement in docs/multi-gpu.md)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.seconds: list[float] = []
        self.rows: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()
        self.seconds.append(0.0)
        self.rows.append(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1] += len(batch[1])
        self.seconds[-1] = time.perf_counter() - self._start

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        content = {"world_size": trainer.world_size, "seconds": self.seconds, "rows": self.rows}
        (self.out / f"timing{trainer.global_rank}.json").write_text(json.dumps(content))
