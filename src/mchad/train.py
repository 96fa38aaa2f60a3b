"""What ``python run.py`` does: compose -> train -> test -> results.csv in the run folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mchad.backbones import output_width
from mchad.errors import ConfigError, UserError
from mchad.module import METRIC_KEYS, OODModel

log = logging.getLogger(__name__)

RESULT_COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed", "Accuracy", *METRIC_KEYS]


def trainer_kwargs(trainer_cfg: DictConfig) -> DictConfig:
    """Map the published ``trainer.gpus=N`` (removed in Lightning 2) to accelerator/devices."""
    cfg = trainer_cfg.copy()
    with open_dict(cfg):
        gpus = cfg.pop("gpus", None)
        if gpus is not None:
            if isinstance(gpus, int) and gpus == 0:
                cfg.accelerator, cfg.devices = "cpu", 1
            else:
                cfg.accelerator, cfg.devices = "gpu", gpus
    return cfg


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, OODModel]:
    """Instantiate and set up the datamodule, then the model that fits its data."""
    datamodule = instantiate(cfg.datamodule)
    datamodule.setup("fit")
    backbone = instantiate(cfg.model.backbone)
    width = output_width(backbone, datamodule.image_shape)
    if width != cfg.model.n_embedding:
        raise ConfigError(
            f"the backbone outputs {width} values but model.n_embedding={cfg.model.n_embedding}"
        )
    try:
        method = instantiate(cfg.model.method)
    except Exception as error:  # e.g. a negative weight: instantiate wraps the ValueError
        cause = error.__cause__ if isinstance(error.__cause__, ValueError) else error
        raise ConfigError(f"model.method: {cause}") from error
    model = OODModel(
        backbone=backbone,
        method=method,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        test_case_names=datamodule.test_case_names,
    )
    return datamodule, model


def write_results(rows: list[dict], path: Path) -> None:
    """Write results.csv atomically: a reader sees the whole file or none."""
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def run(cfg: DictConfig) -> Path:
    """Train and test as configured; returns the path of results.csv."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule, model = build(cfg)
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values()]
    trainer: pl.Trainer = instantiate(trainer_kwargs(cfg.trainer), logger=loggers, callbacks=callbacks)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    trainer.test(model, datamodule=datamodule, verbose=False)

    rows = [
        {"experiment": cfg.name, "id_dataset": datamodule.name, "method": cfg.model.name, "seed": cfg.seed, **row}
        for row in model.test_results
    ]
    path = output_dir / "results.csv"
    write_results(rows, path)
    log.info("Results: %s\n%s", path, pd.DataFrame(rows, columns=RESULT_COLUMNS).to_string(index=False))
    return path


def main(cfg: DictConfig) -> None:
    """Hydra task: a user error ends the process with one line and exit status 1."""
    try:
        run(cfg)
    except UserError as error:
        log.error("%s", error)
        raise SystemExit(f"error: {error}") from None
