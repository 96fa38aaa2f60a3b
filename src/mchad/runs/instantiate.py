"""Values that reach a constructor only inside ``fit``, tried when the run starts, and the
folder of a run that never started.

The optimizer and the scheduler are ``_partial_`` factories: Lightning calls them in
``configure_optimizers``, inside ``trainer.fit``, so a value they refuse
(``model.optimizer.lr=fast``) surfaced as a bug's traceback from deep inside training, after
the data was loaded and the run folder filled. :func:`check_factories` calls both once on a
one-element parameter before anything is loaded and turns a refusal (``TypeError``,
``ValueError``) into one :class:`~mchad.errors.ConfigError` line naming the key.
:func:`discard_unstarted_run` leaves, of a run stopped by an input error before it produced
anything, only ``FAILED.txt``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mchad.errors import ConfigError, first_line

#: what a run folder holds before the run produced anything: Hydra's files, the saved config,
#: the loggers' still empty folders
_NOT_YET_A_RUN = {".hydra", "run.log", "config.yaml", "tb", "csv"}


def check_factories(cfg: DictConfig, instantiate) -> None:
    """Build ``model.optimizer`` (and ``model.scheduler``, stepped once) on a probe parameter,
    as :meth:`mchad.models.module.OODModel.configure_optimizers` will; ``instantiate(node, what)``
    is the run's allow-listed instantiation."""
    import torch

    from mchad.models.module import make_optimizer

    probe = [torch.nn.Parameter(torch.zeros(1))]
    factory = instantiate(cfg.model.optimizer, "model.optimizer")
    optimizer = _refused_as_config_error(cfg.model.optimizer, "model.optimizer", make_optimizer, factory, probe)
    if cfg.model.get("scheduler"):
        factory = instantiate(cfg.model.scheduler, "model.scheduler")
        period = {} if "T_max" in getattr(factory, "keywords", {}) else {"T_max": 2}
        _refused_as_config_error(cfg.model.scheduler, "model.scheduler", _first_step, factory, optimizer, period)


def _first_step(factory, optimizer, period: dict) -> None:
    """The scheduler and one training step of it: a scheduler's first value may not yet use
    every argument (the cosine schedule's eta_min)."""
    scheduler = factory(optimizer, **period)
    optimizer.step()  # no gradients: nothing changes; keeps PyTorch's step-order warning away
    scheduler.step()


def _refused_as_config_error(node: DictConfig, what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (TypeError, ValueError) as error:
        values = OmegaConf.to_container(node, resolve=True)
        target = values.get("_target_", what)
        texts = [f"{what}.{k}={v}" for k, v in values.items() if not k.startswith("_") and isinstance(v, str)]
        if len(texts) == 1:  # text where a number belongs: the usual mistake, named
            raise ConfigError(f"{texts[0]}: {target} refuses it ({first_line(error)})") from None
        raise ConfigError(f"{what}: {target} refuses its arguments ({first_line(error)})") from None


def discard_unstarted_run(output_dir: str | Path) -> None:
    """Remove the run folder of a run that an input error stopped before it produced anything
    (only Hydra's files, config.yaml and empty logger folders in it); FAILED.txt, written
    next, is then all that is left. A folder with anything else (checkpoints, metrics, a
    resumed run's files) is left as it is."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    entries = list(output_dir.iterdir())
    allowed = _NOT_YET_A_RUN | {f"{Path(sys.argv[0]).stem}.log", "FAILED.txt"}
    if any(p.name not in allowed for p in entries):
        return
    for logger_dir in ("tb", "csv"):  # a logger that already wrote is a run that started
        if any(f.is_file() for f in (output_dir / logger_dir).rglob("*")):
            return
    for entry in entries:  # the folder itself stays: FAILED.txt goes into it (and it may be the cwd)
        if entry.name != "FAILED.txt":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
