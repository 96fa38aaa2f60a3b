"""Runs that survive interruption and refuse bad input: resume, checkpoints, NaN guard.

* :func:`locate_resume` finds the run folder and checkpoint of ``resume=<run folder|ckpt>``;
  :func:`resume_config` rebuilds that run's configuration (its saved ``config.yaml`` plus
  the value overrides of the resuming command).
* :class:`RNGState` saves the global random states (torch CPU/CUDA, numpy, Python) in every
  checkpoint and restores them on resume, so that a resumed run draws the same augmentation
  and dropout as an uninterrupted one (Lightning itself does not restore them).
* :func:`load_checkpoint` / :func:`check_fits` turn an unreadable or foreign checkpoint into
  one clear :class:`~mchad.errors.CheckpointError`; :func:`safe_torch_load` reads every
  checkpoint without running code from it (``weights_only=True``) unless the user trusts the
  file (``trust_checkpoint=true``).
* :class:`NonFiniteLossGuard` stops training when the loss becomes NaN/inf and names the step.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins import TorchCheckpointIO

from mchad.errors import CheckpointError, ConfigError, NonFiniteLossError, UnsafeCheckpointError
from mchad.resolvers import locate_resume, project_root

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


# ------------------------------------------------------------------------------- resume


def _existing(path: str | Path) -> Path:
    """``path`` as given (relative to the working directory), else relative to the project root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (Path(project_root()) / p).exists():
        p = Path(project_root()) / p
    return p.resolve()


def _is_group_override(saved: DictConfig, key: str, value: Any) -> bool:
    node = OmegaConf.select(saved, key, default=None)
    return "/" in key or key in ("experiment", "testmodules") or (
        isinstance(node, DictConfig) and not isinstance(value, dict)
    )


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The configuration and checkpoint to resume ``cfg.resume`` with.

    The run's saved ``config.yaml`` is the base; the resuming command's own ``key=value``
    overrides (e.g. ``trainer.max_epochs=40`` to train longer) are applied to it. Config
    groups (``model=...``, ``experiment=...``) cannot change in a resumed run.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    folder, ckpt = locate_resume(cfg.resume)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"resume={cfg.resume}: {folder} is not a run folder (it has no {CONFIG_FILE})")
    if not ckpt.is_file():
        raise CheckpointError(
            f"resume={cfg.resume}: {ckpt} does not exist (the run stopped before its first epoch ended; "
            "start it again without resume=)"
        )
    try:
        saved = OmegaConf.load(folder / CONFIG_FILE)
    except Exception as error:
        raise ConfigError(f"resume={cfg.resume}: cannot read {folder / CONFIG_FILE}: {_short(error)}") from error
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in ("resume", "ckpt_path", TRUST_KEY) or key.startswith("hydra."):
            continue
        if override.is_delete():  # e.g. ~callbacks.<name>: drop a callback from now on
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        value = override.value()
        if _is_group_override(saved, key, value):
            raise ConfigError(
                f"resume: {key}={override.get_value_element_as_str()} would change a config group of the run; "
                "a resumed run keeps its configuration (only values such as trainer.max_epochs=40 can change)"
            )
        if OmegaConf.select(saved, key, default="\0missing") == "\0missing" and not override.is_add():
            raise ConfigError(f"resume: the run's configuration has no key {key}")
        OmegaConf.update(saved, key, value, merge=True, force_add=True)
    # the run folder may have moved since: point every path below the old folder to the new one
    old = str(saved.paths.output_dir)
    if old != str(folder):
        container = OmegaConf.to_container(saved, resolve=False)
        saved = OmegaConf.create(replace_path_prefix(container, old, str(folder)))
    saved.resume = None
    saved.ckpt_path = None
    saved[TRUST_KEY] = bool(cfg.get(TRUST_KEY, False))  # trust is the resuming command's, not the run's
    return saved, ckpt


def replace_path_prefix(value: Any, old: str, new: str) -> Any:
    """``value`` (nested dicts/lists) with every string ``old`` or ``old/...`` starting with ``new``."""
    if isinstance(value, dict):
        return {k: replace_path_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_path_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


# --------------------------------------------------------------------------- checkpoints


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder standing for its ``checkpoints/last.ckpt``."""
    p = _existing(path)
    if p.is_dir():
        p = p / LAST_CHECKPOINT
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


#: the config key that lets a checkpoint be unpickled without restriction
TRUST_KEY = "trust_checkpoint"


def safe_torch_load(path: str | Path, what: str = "checkpoint", trust: bool = False) -> Any:
    """``torch.load`` onto the CPU that runs no code from the file.

    ``weights_only=True``: only tensors, plain containers, numbers and strings are rebuilt,
    which is all this project writes (RNG states included, see :class:`RNGState`). A file
    that needs any other class or function (a pickled object, or a planted payload) is
    refused with :class:`~mchad.errors.UnsafeCheckpointError` naming what it references,
    before anything from it runs. ``trust=True`` (``trust_checkpoint=true``) unpickles fully,
    for files the user made or trusts. Other failures (truncated, not a checkpoint) are raised
    as they come, for the caller to word.
    """
    if trust:
        log.warning("Loading %s %s with full unpickling (%s=true): it can run code from the file", what, path, TRUST_KEY)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, error)
        if not unsafe:
            raise
        more = f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else ""
        raise UnsafeCheckpointError(
            f"{what} {path} was refused: loading it needs arbitrary unpickling (it references "
            f"{', '.join(unsafe[:3])}{more}), which can run code from the file; if you trust the file, "
            f"load it anyway with {TRUST_KEY}=true"
        ) from None


def _unsafe_globals(path: str | Path, error: BaseException) -> list[str]:
    """What the weights-only unpickler refused in ``path``: the classes/functions it references."""
    try:  # reads the pickle's opcodes only (zip-format files, torch >= 2.5)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            return sorted(unsafe)
    except Exception:  # legacy (non-zip) format or no pickle in it: fall back to the message
        pass
    # torch's message names the first refused global ("... unsupported GLOBAL posix.system ...")
    text = f"{error} {error.__context__ or ''}"
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))


def load_checkpoint(path: str | Path, hint: str = "", trust: bool = False) -> dict:
    """The checkpoint's contents (on the CPU); a :class:`CheckpointError` if it is unreadable,
    an :class:`UnsafeCheckpointError` if it needs arbitrary unpickling and ``trust`` is off."""
    p = checkpoint_file(path)
    try:
        ckpt = safe_torch_load(p, "checkpoint", trust)
    except UnsafeCheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"checkpoint {p} is unreadable (truncated or corrupt?): {_short(error)}{hint}") from error
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {p} is not a checkpoint of this project (it has no state_dict)")
    return ckpt


def check_fits(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """Raise a :class:`CheckpointError` unless ``ckpt``'s weights fit ``model`` exactly."""
    own = model.state_dict()
    theirs = ckpt["state_dict"]
    problems = [f"missing {k}" for k in own if k not in theirs]
    problems += [f"unexpected {k}" for k in theirs if k not in own]
    problems += [
        f"{k} is {tuple(v.shape)} there, {tuple(own[k].shape)} here"
        for k, v in theirs.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model: {'; '.join(problems[:3])}{more}; "
            "use the experiment and model overrides it was trained with (see its run's config.yaml)"
        )


def keep_csv_history(loggers: list, global_step: int) -> None:
    """Keep a resumed run's earlier ``metrics.csv`` rows (up to the checkpoint's step).

    Lightning's CSVLogger deletes an existing metrics.csv when it starts; the rows logged
    before the checkpoint are handed to it again, those of the lost part after it dropped.
    """
    import csv

    from pytorch_lightning.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        try:
            with open(path, newline="") as file:
                rows = [
                    {k: v for k, v in row.items() if v not in ("", None)}
                    for row in csv.DictReader(file)
                    if int(float(row.get("step") or 0)) <= global_step
                ]
        except (OSError, ValueError, csv.Error) as error:
            log.warning("Starting a new %s: the previous one is unreadable (%s)", path, _short(error))
            continue
        writer = logger.experiment  # created now: it removes the old file
        writer.metrics = rows + writer.metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it: a run killed while saving
    keeps its previous last.ckpt instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote file systems: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- callbacks


class RNGState(pl.Callback):
    """Saves the global random states in each checkpoint and restores them on resume.

    Lightning restores weights, optimiser, scheduler and loop counters but not the global RNGs;
    the on-device augmentation and dropout draw from them. Checkpoints are written after an
    epoch's validation, so the saved state is the one the next epoch starts from.
    """

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        np_state = np.random.get_state(legacy=False)
        out = {
            "torch": torch.get_rng_state(),
            # plain tensors and tuples only: loadable with torch.load(weights_only=True)
            "numpy": {
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # cpu: RNG state for the file
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "python": (version, state, gauss),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np_state = state_dict["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                "has_gauss": np_state["has_gauss"],
                "gauss": np_state["gauss"],
            }
        )
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        log.info("Restored the random number generators' states from the checkpoint")


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
        sync = loss.device.type == "cpu" if self.sync_every_step is None else self.sync_every_step
        if sync:
            if not torch.isfinite(loss).all():
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
        if self._first_bad is not None and (first := int(self._first_bad)) >= 0:
            self._fail(trainer, first, None)

    @staticmethod
    def _fail(trainer, step: int, value: float | None) -> None:
        what = "NaN" if value is not None and value != value else ("infinite" if value is not None else "NaN or infinite")
        raise NonFiniteLossError(
            f"the training loss became {what} at step {step} (epoch {trainer.current_epoch}); training stopped. "
            "Lower model.optimizer.lr or the loss weights, or check the data"
        )
