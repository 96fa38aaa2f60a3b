"""Input checks of a run, in one place: each mistake becomes one :class:`~mchad.errors.UserError`
line before any work (or, for the data, before any training step).

* :func:`check_config`: typed keys (``seed`` an integer, sizes positive integers), the
  embedding's dimension, a writable run folder -- right after the configuration is final;
* :func:`check_training_data`: every training class has images and the training set fills
  at least one batch -- once the ID data is loaded, before any OOD set; :func:`check_outliers`:
  the outliers fill one batch -- once they are loaded, before the model is built;
* :func:`check_test_cases`: a run has an OOD test case to write results for -- before training;
* :func:`explain_config_error`: Hydra's composition errors (unknown key, unknown option of a
  config group, unparsable override) as one line with the closest valid names.

This module is imported by ``run.py`` before torch: it must not import torch or Lightning at
module level.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from mchad.errors import ConfigError, DataError
from mchad.models.settings import check_model_keys
from mchad.targets import check_targets

log = logging.getLogger(__name__)

# integer keys and their smallest allowed value (None: any integer)
INTEGER_KEYS = {
    "seed": 0,
    "model.n_embedding": 1,
    "datamodule.n_classes": 2,
    "datamodule.batch_size": 1,
    "datamodule.outlier_batch_size": 1,
    "datamodule.test_batch_size": 1,
    "trainer.max_epochs": None,  # -1 = no limit (Lightning)
    "trainer.min_epochs": None,
}
SEED_MAX = 2**32 - 1  # numpy's and Lightning's range


def check_config(cfg: DictConfig) -> None:
    """Refuse a configuration that would run but give meaningless results (or crash later),
    or that names code off the allow-list (a resumed run's saved config included)."""
    check_targets(cfg)
    check_model_keys(cfg)
    for key, low in INTEGER_KEYS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if cfg.seed > SEED_MAX:
        raise ConfigError(f"seed must be at most {SEED_MAX}, got {cfg.seed}")
    _check_embedding(cfg)
    _check_writable(Path(cfg.paths.output_dir), "the run folder", "set paths.log_dir=<a writable folder>")


def _check_embedding(cfg: DictConfig) -> None:
    # CAC's anchors are the scaled unit vectors of an embedding with one dimension per class
    target = str(OmegaConf.select(cfg, "model.method._target_", default=""))
    n_embedding = OmegaConf.select(cfg, "model.n_embedding", default=None)
    n_classes = OmegaConf.select(cfg, "datamodule.n_classes", default=None)
    if target.rsplit(".", 1)[-1] == "CAC" and None not in (n_embedding, n_classes) and n_embedding != n_classes:
        raise ConfigError(
            f"{cfg.model.name} needs model.n_embedding = datamodule.n_classes = {n_classes}, got {n_embedding}"
        )


def check_gpu_present(cfg: DictConfig) -> None:
    """``trainer.gpus=N`` (N > 0) or ``trainer.accelerator=gpu|cuda`` on a machine without a GPU:
    one line saying so and how to run on the CPU (Lightning's own: "No supported gpu backend found!")."""
    trainer = cfg.get("trainer") or {}
    gpus, accelerator = trainer.get("gpus"), str(trainer.get("accelerator", "auto"))
    if gpus in (None, 0, "0") and accelerator not in ("gpu", "cuda"):
        return
    import torch

    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's gpu on Apple silicon
    if torch.cuda.is_available() or mps:
        return
    asked, drop = (
        (f"trainer.gpus={gpus}", "drop trainer.gpus or set trainer.gpus=0")
        if gpus not in (None, 0, "0")
        else (f"trainer.accelerator={accelerator}", "set trainer.accelerator=cpu (or auto)")
    )
    raise ConfigError(
        f"{asked} asks for a GPU, but no GPU was found (torch.cuda.is_available() is false); to run on the CPU {drop}"
    )


def _check_writable(folder: Path, what: str, how: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write {what} {folder}: {error.strerror or error}; {how}") from error


def check_training_data(datamodule) -> None:
    """Every class the training source lists has images, and the training set (after the
    validation hold-out) fills at least one batch; logs how many steps an epoch has. Needs the
    ID data only (``datamodule.setup_id_data()``): a training set that cannot train is refused
    before any OOD set or outlier is loaded."""
    train = datamodule.data["train"]
    # the classes the source lists (an image folder: its class folders, empty ones included)
    classes = train.classes or []
    present = set(train.labels.unique().tolist()) | set(datamodule.data["val"].labels.unique().tolist())
    absent = [name for label, name in enumerate(classes) if label not in present]
    if absent:
        raise DataError(
            f"{datamodule.name}: the training set has no images of class(es) {', '.join(absent)}; "
            "add images or remove the class folder"
        )
    steps = len(train) // datamodule.batch_size  # the training loader drops the last partial batch
    if steps == 0:
        raise DataError(
            f"{datamodule.name}: {len(train)} training images (after holding out {len(datamodule.data['val'])} for "
            f"validation) do not fill one batch of datamodule.batch_size={datamodule.batch_size}: an epoch would "
            f"train nothing; lower datamodule.batch_size (at most {len(train)}) or add images"
        )
    log.info("%s: %d training steps per epoch (batch size %d)", datamodule.name, steps, datamodule.batch_size)


def check_outliers(datamodule) -> None:
    """The outlier-exposure set, once loaded (``datamodule.setup()``), fills one outlier batch."""
    outliers = datamodule.outliers
    if outliers is not None and len(outliers) < datamodule.outlier_batch_size:
        raise DataError(
            f"{len(outliers)} outlier images do not fill one batch of datamodule.outlier_batch_size="
            f"{datamodule.outlier_batch_size}; lower it (at most {len(outliers)}) or add images"
        )


# ------------------------------------------------------------------- Hydra's config errors


def explain_config_error(error: BaseException, config_dir: str | Path, overrides: list[str]) -> str | None:
    """One line for a Hydra composition error (with the closest valid names), None for any
    other exception."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = str(error.missing_cfg_file).rpartition("/")
        options = list(error.options or [])
        if not group:
            return f"no config {name!r} in {config_dir}"
        return f"no {group} {name!r}{_did_you_mean(name, options, group + '=')}; options: {', '.join(options)}"
    if isinstance(error, OverrideParseException):
        lines = [line for line in str(error).splitlines() if line and not line.startswith("See https")]
        return f"cannot parse the command line: {'; '.join(lines)} (overrides are key=value)"
    if isinstance(error, ConfigCompositionException):
        message = str(error)
        if message.startswith("Could not override '") or "does not exist" in message:
            key = message.split("'")[1]
            value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "...")
            keys = _config_keys(config_dir, overrides)
            return f"unknown key {key}{_did_you_mean(key, keys)}; to add a new key write +{key}={value}"
        return " ".join(message.split())
    return None


def _did_you_mean(name: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.7)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


def _config_keys(config_dir: str | Path, overrides: list[str]) -> list[str]:
    """Every dotted key of the configuration composed with the group choices of ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mchad.targets import VERSION_BASE_KWARGS

    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and not o.startswith(("+", "~"))]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), **VERSION_BASE_KWARGS):
            try:
                cfg = compose("train", overrides=choices)
            except Exception:  # noqa: BLE001 - another mistake among the choices: the defaults then
                cfg = compose("train")
    except Exception:  # noqa: BLE001 - no suggestions rather than a second error
        return []
    finally:
        GlobalHydra.instance().clear()
    return _flatten(cfg)


def _flatten(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
                keys += _flatten(child, path + ".")
    return keys


def check_test_cases(datamodule) -> None:
    """A run tests against at least one OOD test case: without one, results.csv would be empty.
    (Not part of :func:`check_training_data`: the benchmark builds training-only data modules.)"""
    if not datamodule.test_case_names:  # e.g. testmodules=none, or a test-case config in the wrong package
        raise ConfigError(
            f"{datamodule.name}: no OOD test cases (datamodule.test_cases is empty): the run would write an empty "
            "results.csv; choose testmodules=noise, cifar, openood, digits or imagefolder"
        )
