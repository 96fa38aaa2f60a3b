"""Resuming a run: ``resume=<run folder|ckpt>`` -> that run's configuration and checkpoint.

:func:`resume_config` rebuilds the run's configuration (its saved ``config.yaml`` plus the
value overrides of the resuming command); :func:`keep_csv_history` keeps the resumed run's
earlier ``metrics.csv`` rows. The random states come back with :class:`mchad.runs.rng_state.RNGState`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mchad.checkpoints import TRUST_KEY
from mchad.errors import CheckpointError, ConfigError, first_line
from mchad.resolvers import locate_resume

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def _is_group_override(saved: DictConfig, key: str, value: Any) -> bool:
    node = OmegaConf.select(saved, key, default=None)
    return (
        "/" in key
        or key in ("experiment", "testmodules")
        or (isinstance(node, DictConfig) and not isinstance(value, dict))
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
        raise ConfigError(f"resume={cfg.resume}: cannot read {folder / CONFIG_FILE}: {first_line(error)}") from error
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


#: what identifies a trained model: an eval-only command may not contradict the run's values
MODEL_KEYS = ("name", "method._target_", "backbone._target_", "n_embedding", "semantics")
#: how the model runs, not what was trained: an eval-only command may set these
RUNTIME_MODEL_KEYS = ("compile", "channels_last")


def _touches_model(key: str) -> bool:
    return key in ("model", "experiment") or key.startswith(("model/", "model."))


def eval_config(cfg: DictConfig, ckpt_file: Path, overrides: list[str]) -> tuple[DictConfig, bool]:
    """``train=false ckpt_path=<run>``: a copy of ``cfg`` with the model (method, backbone, n_embedding,
    semantics, ...) and the experiment name of the run that wrote ``ckpt_file``, from its
    saved ``config.yaml`` as ``resume=`` restores them; whether there was one (a checkpoint
    outside a run folder is tested with the configured model).

    A model choice on the command line (``model=``, ``model/backbone=``, ``experiment=``,
    ``model.<key>=``) that contradicts the run's is refused in one line naming both values;
    one that agrees is accepted, and ``model.compile``/``model.channels_last`` may change.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    config = ckpt_file.parent.parent / CONFIG_FILE
    if not config.is_file():
        return cfg, False
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it is
    try:
        saved = OmegaConf.load(config)
    except Exception as error:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: cannot read {config}: {first_line(error)}") from error
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not _touches_model(key) or key.removeprefix("model.") in RUNTIME_MODEL_KEYS:
            continue
        keys = [key] if key.startswith("model.") else [f"model.{k}" for k in MODEL_KEYS]
        for name in keys:
            here = OmegaConf.select(cfg, name, default=None)
            there = OmegaConf.select(saved, name, default=None)
            if here != there:
                given = f"{key}={override.get_value_element_as_str()}"
                detail = "" if name == key else f" ({name} {here} here, {there} there)"
                raise ConfigError(
                    f"{given} contradicts the model of the run being tested, {name}={there} in {config}{detail}; "
                    f"train=false tests the run's own model: drop {given}"
                )
    model = saved.model
    for key in RUNTIME_MODEL_KEYS:
        if key in cfg.model:
            model[key] = cfg.model[key]
    with open_dict(cfg):
        cfg.model = model
        if not any(o.lstrip("+").split("=")[0] == "name" for o in overrides) and "name" in saved:
            cfg.name = saved.name
    return cfg, True


def replace_path_prefix(value: Any, old: str, new: str) -> Any:
    """``value`` (nested dicts/lists) with every string ``old`` or ``old/...`` starting with ``new``."""
    if isinstance(value, dict):
        return {k: replace_path_prefix(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_path_prefix(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def keep_csv_history(loggers: list, global_step: int) -> None:
    """Keep a resumed run's earlier ``metrics.csv`` rows (up to the checkpoint's step).

    Lightning's CSVLogger deletes an existing metrics.csv when it starts; the rows logged
    before the checkpoint are handed to it again, those of the lost part after it dropped.
    """
    import csv
    import warnings

    from pytorch_lightning.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        rows = []
        try:
            if path.is_file():
                with open(path, newline="") as file:
                    rows = [
                        {k: v for k, v in row.items() if v not in ("", None)}
                        for row in csv.DictReader(file)
                        if int(float(row.get("step") or 0)) <= global_step
                    ]
        except (OSError, ValueError, csv.Error) as error:
            log.warning("Starting a new %s: the previous one is unreadable (%s)", path, first_line(error))
        with warnings.catch_warnings():
            # Lightning warns that the folder's earlier logs "will be deleted" (_check_log_dir_exists):
            # false here, the rows up to the checkpoint are handed to the new writer below
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = logger.experiment  # created now: it removes the old file
        writer.metrics = rows + writer.metrics
