"""A callback for the SLURM preemption test (tests/test_slurm.py), imported by the trials' jobs
through PYTHONPATH.

:class:`PauseAt`: in the trial whose job number is ``MCHAD_TEST_PAUSE_TRIAL``, at a given epoch and
batch of a job's first start (``SLURM_RESTART_COUNT`` unset or 0), writes the time to the file
``MCHAD_TEST_PAUSE`` names and waits (up to ``wait_s``) until the process received a preemption
signal, so that the test's ``scancel --signal=TERM`` lands mid-training at a known step. It changes
nothing of the training: a paused and an unpaused trial train alike.
"""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl


class PauseAt(pl.Callback):
    def __init__(self, trial: int, epoch: int = 1, batch: int = 1, wait_s: float = 120.0) -> None:
        self.trial, self.epoch, self.batch, self.wait_s = int(trial), epoch, batch, wait_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from mchad.runs.preemption import received

        stamp = os.environ.get("MCHAD_TEST_PAUSE")
        if not stamp or str(self.trial) != os.environ.get("MCHAD_TEST_PAUSE_TRIAL"):
            return
        if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        with open(stamp, "w") as file:
            file.write(repr(time.time()))
        end = time.monotonic() + self.wait_s
        while received() is None and time.monotonic() < end:
            time.sleep(0.05)
