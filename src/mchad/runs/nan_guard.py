"""Training stops with one clear error once the loss is NaN or infinite (in any DDP process)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from mchad.devices import HOST
from mchad.errors import NonFiniteLossError


def _world_size(trainer) -> int:
    """The trainer's number of processes (1 for stand-ins without one)."""
    return int(getattr(trainer, "world_size", 1))


class NonFiniteLossGuard(pl.Callback):
    """Stops training with :class:`NonFiniteLossError` once the training loss is NaN or inf.

    On the CPU every step is checked. On an accelerator the first bad step is recorded in a
    device tensor (no host sync) and read every ``trainer.log_every_n_steps`` steps and at
    the end of each epoch, when Lightning synchronises for logging anyway.
    """

    def __init__(self, sync_every_step: bool | None = None) -> None:
        #: check on the host after every step; None: on the CPU only (where it costs nothing)
        self.sync_every_step = sync_every_step
        self._first_bad: torch.Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_bad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        step = trainer.global_step - 1  # the optimiser step this loss belongs to (0-based)
        # the host itself (not any device of type cpu: tests emulate a GPU as cpu:1)
        sync = loss.device == HOST if self.sync_every_step is None else self.sync_every_step
        if sync:
            finite = bool(torch.isfinite(loss).all())
            # DDP: every rank stops when any rank's loss is bad (a rank stopping alone would
            # leave the others waiting in the next gradient all-reduce)
            if _world_size(trainer) > 1 and not trainer.strategy.reduce_boolean_decision(finite, all=True):
                self._fail(trainer, step, float(loss.float().sum()) if not finite else None, elsewhere=finite)
            elif not finite:
                self._fail(trainer, step, float(loss.float().sum()))
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss).all()
        # a Python scalar goes to the kernel as an argument: no host-to-device copy, no sync
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)

    def _check(self, trainer) -> None:
        if self._first_bad is None:
            if _world_size(trainer) == 1:
                return
            # another rank may have recorded a bad step: every rank takes part in the reduction
            self._first_bad = torch.full((), -1, dtype=torch.long, device=trainer.strategy.root_device)
        first = self._first_bad
        if _world_size(trainer) > 1:  # the earliest bad step of any rank (-1 = none) reaches all
            never = torch.iinfo(torch.long).max
            earliest = trainer.strategy.reduce(torch.where(first < 0, never, first), reduce_op="min")
            first = torch.where(earliest == never, -1, earliest)
        if (step := int(first)) >= 0:
            self._fail(trainer, step, None, elsewhere=int(self._first_bad) != step)

    @staticmethod
    def _fail(trainer, step: int, value: float | None, elsewhere: bool = False) -> None:
        what = (
            "NaN" if value is not None and value != value else ("infinite" if value is not None else "NaN or infinite")
        )
        where = " in another process" if elsewhere else ""
        raise NonFiniteLossError(
            f"the training loss became {what}{where} at step {step} (epoch {trainer.current_epoch}); training stopped. "
            "Lower model.optimizer.lr or the loss weights, or check the data"
        )
