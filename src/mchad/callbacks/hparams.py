"""After testing: the resolved configuration and the key metrics for TensorBoard's HPARAMS tab."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from mchad.callbacks.outputs import run_dir

log = logging.getLogger(__name__)


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a resolved config) -> ``{"model.weight_center": 10.0, ...}``.

    Lists become strings; ``None`` becomes ``"None"``; the ``hydra`` subtree is dropped.
    """
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if not prefix and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class HyperparameterLogger(Callback):
    """After testing: the flattened, resolved config and key metrics for TensorBoard's HPARAMS tab.

    The config is read from ``config_file`` (the run's ``config.yaml`` written by
    :func:`mchad.runs.train.run`, default ``<run>/config.yaml``). Metrics, logged under ``hp/`` so
    they do not mix with the training curves: ``hp/val_acc`` (last validation),
    ``hp/test_acc`` and, per score, the mean over the test cases of AUROC and FPR95
    (``hp/<score>/AUROC``, ``hp/<score>/FPR95``).
    """

    def __init__(self, config_file: str | None = None):
        self.config_file = config_file
        self.val_acc: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/acc")
        if value is not None:
            self.val_acc = float(value)

    def params(self, trainer: pl.Trainer) -> dict[str, Any]:
        from omegaconf import OmegaConf

        path = Path(self.config_file) if self.config_file else run_dir(trainer) / "config.yaml"
        if not path.is_file():
            log.warning("hparams: no config at %s; only metrics logged", path)
            return {}
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        return flatten_config(cfg)

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.val_acc is not None:
            metrics["hp/val_acc"] = self.val_acc
        rows = getattr(pl_module, "test_results", None) or []
        if rows:
            metrics["hp/test_acc"] = float(rows[0]["Accuracy"])
        by_score: dict[str, list[dict]] = {}
        for row in rows:
            by_score.setdefault(row["score"], []).append(row)
        for score, group in by_score.items():
            for column in ("AUROC", "FPR95"):
                values = [float(r[column]) for r in group if column in r]
                if values:
                    metrics[f"hp/{score}/{column}"] = float(np.mean(values))
        return metrics

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = self.params(trainer)
        metrics = self.metrics(pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if metrics:
                    logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
                else:
                    logger.log_hyperparams(params)
        log.info("hparams: %d parameters, metrics %s", len(params), metrics)
