"""Checkpoint files: found, read without running code from them, checked, written atomically.

:func:`load_checkpoint` / :func:`check_fits` turn an unreadable or foreign checkpoint into one
clear :class:`~mchad.errors.CheckpointError`; :func:`safe_torch_load` reads every checkpoint
without running code from it (``weights_only=True``) unless the user trusts the file
(``trust_checkpoint=true``); :class:`AtomicCheckpointIO` writes each checkpoint whole or not at all.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from mchad.errors import CheckpointError, UnsafeCheckpointError, first_line
from mchad.resolvers import project_root

log = logging.getLogger(__name__)

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def _existing(path: str | Path) -> Path:
    """``path`` as given (relative to the working directory), else relative to the project root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (Path(project_root()) / p).exists():
        p = Path(project_root()) / p
    return p.resolve()


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
        log.warning(
            "Loading %s %s with full unpickling (%s=true): it can run code from the file", what, path, TRUST_KEY
        )
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
        raise CheckpointError(
            f"checkpoint {p} is unreadable (truncated or corrupt?): {_sentences(error)}{hint}"
        ) from error
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {p} is not a checkpoint of this project (it has no state_dict)")
    return ckpt


def _sentences(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, cut after its last full sentence within ``limit``
    characters (PyTorch's reader errors run to 300 and more)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[: end + 1] if end > 0 else first_line(error)


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
