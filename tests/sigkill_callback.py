"""A callback for the sweep tests (imported by Ray workers through PYTHONPATH): the trial whose
seed is ``kill_seed`` SIGKILLs its own process when training starts, as the kernel's
out-of-memory killer would; the other trials train normally."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillOnSeed(pl.Callback):
    def __init__(self, seed: int, kill_seed: int) -> None:
        self.kill = seed == kill_seed

    def on_train_start(self, trainer, pl_module) -> None:
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
