"""Callbacks for the sweep and preemption tests (imported by Ray workers through PYTHONPATH).

- :class:`KillOnSeed`: the trial whose seed is ``kill_seed`` SIGKILLs its own process when
  training starts, as the kernel's out-of-memory killer would; the other trials train normally.
- :class:`SignalAt`: sends itself a signal at a given training batch when the environment
  variable ``MCHAD_TEST_SIGNAL`` says so (``SIGKILL:seed=2:epoch=1:batch=1``), so that the same
  config runs once interrupted and once not (a sweep re-run compares the configs); writes the
  time it sent the signal to ``<stamp>``.
"""

from __future__ import annotations

import os
import signal
import time

import pytorch_lightning as pl


class KillOnSeed(pl.Callback):
    def __init__(self, seed: int, kill_seed: int) -> None:
        self.kill = seed == kill_seed

    def on_train_start(self, trainer, pl_module) -> None:
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(pl.Callback):
    def __init__(self, seed: int, stamp: str = "") -> None:
        self.seed, self.stamp = seed, stamp

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        spec = os.environ.get("MCHAD_TEST_SIGNAL")
        if not spec:
            return
        name, *fields = spec.split(":")
        at = {key: int(value) for key, value in (field.split("=") for field in fields)}
        if at.get("seed", self.seed) != self.seed or at.get("rank", 0) != trainer.global_rank:
            return
        if trainer.current_epoch == at.get("epoch", 0) and batch_idx == at.get("batch", 0):
            if self.stamp:
                with open(self.stamp, "w") as file:
                    file.write(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, name))
