"""What ``python run.py`` does: compose -> train -> test -> results.csv in the run folder."""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mchad.checkpoints import checkpoint_file
from mchad.distributed import is_launch_rank_zero
from mchad.errors import ConfigError, Preempted, UserError
from mchad.models.backbones import load_pretrained, output_width
from mchad.models.detectors import DetectorBank, check_detectors
from mchad.models.module import OODModel
from mchad.results.metrics import METRIC_COLUMNS
from mchad.runs.instantiate import check_factories
from mchad.runs.objective import OBJECTIVE_FILE, check_objective, check_objective_score, write_objective
from mchad.runs.provenance import COLUMNS as PROVENANCE_COLUMNS
from mchad.runs.validate import check_config, check_gpu_present, check_outliers, check_test_cases, check_training_data

log = logging.getLogger(__name__)

# evaluated_from: the checkpoint an eval-only run (train=false) tested, empty for a trained run
RESULT_COLUMNS = [
    "experiment",
    "id_dataset",
    "method",
    "test_case",
    "score",
    "seed",
    *METRIC_COLUMNS,
    "evaluated_from",
    *PROVENANCE_COLUMNS,
]


def on_terminal() -> bool:
    """Whether a person watches the output (progress bars are drawn only then)."""
    return sys.stdout.isatty()


def trainer_kwargs(trainer_cfg: DictConfig) -> DictConfig:
    """Map the published ``trainer.gpus=N`` (removed in Lightning 2) to accelerator/devices, and
    ``benchmark=auto`` to cuDNN's benchmark mode unless ``deterministic``."""
    # resolved and detached: Hydra 1.4 instantiates a node that has a parent from that parent's
    # own (unchanged) entry, so a changed copy must stand alone
    cfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=True))
    with open_dict(cfg):
        if cfg.get("benchmark") == "auto":  # cuDNN picks its fastest convolutions, unless told to be deterministic
            cfg.benchmark = None if cfg.get("deterministic") else True
        gpus = cfg.pop("gpus", None)
        if gpus is not None:
            if isinstance(gpus, int) and gpus == 0:
                cfg.accelerator, cfg.devices = "cpu", 1
            else:
                cfg.accelerator, cfg.devices = "gpu", gpus
    return cfg


def _instantiate(node: DictConfig, what: str, **kwargs):
    """``instantiate`` (targets on the allow-list, :mod:`mchad.targets`), with a failing
    constructor reported as one line naming the config node."""
    from mchad.targets import allowed_patterns, instantiate

    root = node._get_root() if isinstance(node, DictConfig) else None
    try:
        return instantiate(node, allowed_patterns(root), **kwargs)
    except UserError:
        raise
    except Exception as error:
        cause = error  # Hydra 1.3 wraps the constructor's error, 1.4 raises it as it is
        while cause.__cause__ is not None and isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from error
        lines = str(cause).strip().splitlines()
        raise ConfigError(f"{what}: {lines[0] if lines else type(cause).__name__}") from error


def with_n_classes(cfg: DictConfig) -> DictConfig:
    """``cfg``, or a copy of it whose ``datamodule.n_classes: null`` (image folders) is the training
    data's number of classes, listed without decoding (a set value is checked against the data by
    the datamodule, :func:`mchad.data.classes.resolve_n_classes`)."""
    if "n_classes" not in cfg.datamodule or cfg.datamodule.n_classes is not None:
        return cfg
    from mchad.data.classes import resolve_n_classes

    cfg = copy.deepcopy(cfg)
    cfg.datamodule.n_classes = resolve_n_classes(None, _instantiate(cfg.datamodule.train, "datamodule.train"))
    return cfg


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, OODModel]:
    """Instantiate and set up the datamodule, then the model that fits its data."""
    cfg = with_n_classes(cfg)
    if (cfg.model.get("weight_oe") or 0) > 0 and cfg.datamodule.get("outliers") is None:
        raise ConfigError(
            f"model.weight_oe={cfg.model.weight_oe} needs outliers: add datamodule/outliers=tinyimages "
            "(or photos on the quick-start, or imagefolder datamodule.outliers.root=/path), or set model.weight_oe=0"
        )
    datamodule = _instantiate(cfg.datamodule, "datamodule")
    datamodule.setup_id_data()
    check_training_data(datamodule)  # before the OOD sets and outliers are decoded
    datamodule.setup("fit")
    check_outliers(datamodule)
    backbone = _instantiate(cfg.model.backbone, "model.backbone")
    width = output_width(backbone, datamodule.image_shape)
    if width != cfg.model.n_embedding:
        raise ConfigError(f"the backbone outputs {width} values but model.n_embedding={cfg.model.n_embedding}")
    if cfg.model.get("pretrained_checkpoint"):
        load_pretrained(backbone, str(cfg.model.pretrained_checkpoint), trust=bool(cfg.get("trust_checkpoint", False)))
    method = _instantiate(cfg.model.method, "model.method")
    datamodule.train_views = getattr(method, "train_views", 1)
    model = OODModel(
        backbone=backbone,
        method=method,
        optimizer=_instantiate(cfg.model.optimizer, "model.optimizer"),
        scheduler=_instantiate(cfg.model.scheduler, "model.scheduler") if cfg.model.get("scheduler") else None,
        test_case_names=datamodule.test_case_names,
        detectors=make_detectors(cfg, method),
    )
    apply_performance_options(cfg, datamodule, model)
    return datamodule, model


def make_detectors(cfg: DictConfig, method) -> DetectorBank:
    """The post-hoc detectors of ``cfg.detectors``, refused here (before training) when unknown
    or not applicable to the method."""
    args = OmegaConf.to_container(cfg.get("detector_args") or {}, resolve=True)
    fit_samples = cfg.get("detector_fit_samples", 10000)
    names = check_detectors(
        cfg.get("detectors"), method, cfg.model.get("name", type(method).__name__), args, fit_samples
    )
    return DetectorBank(names, args, fit_samples, seed=int(cfg.seed))


def _on_gpu(cfg: DictConfig) -> bool:
    """Whether the trainer as configured runs on a CUDA GPU."""
    import torch

    trainer = cfg.get("trainer") or {}
    if trainer.get("gpus") == 0 or str(trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda"):
        return False
    return torch.cuda.is_available()


def apply_performance_options(cfg: DictConfig, datamodule, model: OODModel) -> None:
    """``model.channels_last`` (true, false, auto = on a GPU): the convolutions and the batches
    in channels-last memory format (faster with bf16/fp16 on tensor cores);
    ``model.compile``: the training step's computation compiled whole
    (:meth:`OODModel.compile_step`), see :func:`compile_options`.
    The precision is Lightning's: ``trainer.precision=bf16-mixed`` (methods compute in float32).
    """
    import torch

    channels_last = cfg.model.get("channels_last", False)
    if channels_last == "auto":
        channels_last = _on_gpu(cfg)
    elif not isinstance(channels_last, bool):
        raise ConfigError(f"model.channels_last must be true, false or auto, got {channels_last!r}")
    if channels_last:
        model.to(memory_format=torch.channels_last)
        datamodule.transform.channels_last = True
    options = compile_options(cfg.model.get("compile", False))
    if options is not None:
        try:
            model.compile_step(**options)
        except (RuntimeError, TypeError, ValueError) as error:  # torch.compile checks its arguments here
            raise ConfigError(f"model.compile={cfg.model.compile}: {str(error).strip().splitlines()[0]}") from error


def compile_options(value) -> dict | None:
    """``torch.compile``'s keyword arguments for ``model.compile``: false (None: eager), true
    (torch's defaults), a mode (``reduce-overhead``: CUDA graphs of forward and backward;
    ``max-autotune``, ...) or a mapping of arguments, e.g. ``{mode: reduce-overhead,
    fullgraph: true}`` or ``{backend: aot_eager}``."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, str):
        return {"mode": value}
    if isinstance(value, (dict, DictConfig)):
        options = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else dict(value)
        unknown = set(options) - {"mode", "backend", "fullgraph", "dynamic", "options"}
        if unknown:
            raise ConfigError(f"model.compile: unknown torch.compile argument(s) {', '.join(sorted(unknown))}")
        return options
    raise ConfigError(
        f"model.compile must be false, true, a torch.compile mode or a mapping of its arguments, got {value!r}"
    )


def make_loggers(cfg: DictConfig) -> list:
    return [_instantiate(c, "logger") for c in cfg.get("logger", {}).values()]


def make_trainer(cfg: DictConfig, loggers: list | None = None, extra_callbacks: tuple = (), **overrides) -> pl.Trainer:
    """The trainer of a run: ``cfg.trainer`` (plus ``overrides``) with the configured loggers and
    callbacks, the RNG-state and non-finite-loss callbacks, and atomic checkpoint writes."""
    from mchad.checkpoints import AtomicCheckpointIO
    from mchad.runs.nan_guard import NonFiniteLossGuard
    from mchad.runs.preemption import cluster_plugins
    from mchad.runs.rng_state import RNGState

    callbacks = [*extra_callbacks, *(_instantiate(c, "callbacks") for c in cfg.get("callbacks", {}).values())]
    callbacks += [RNGState(), NonFiniteLossGuard()]
    kwargs = trainer_kwargs(cfg.trainer)
    with open_dict(kwargs):
        kwargs.update(overrides)
        if kwargs.get("enable_progress_bar", "auto") in ("auto", None):  # drawn only for a person watching
            kwargs.enable_progress_bar = on_terminal()
    if not kwargs.get("enable_progress_bar", True):
        # Lightning refuses a configured progress bar next to enable_progress_bar=false
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    # configured plugins replace these (then the SLURM requeue choice is the config's own)
    plugins = {} if kwargs.get("plugins") else {"plugins": [AtomicCheckpointIO(), *cluster_plugins()]}
    loggers = make_loggers(cfg) if loggers is None else loggers
    return _instantiate(kwargs, "trainer", logger=loggers, callbacks=callbacks, **plugins)


class SharedRunFolder(pl.Callback):
    """DDP: stops every process, before any training, when they resolved different run
    folders (each process started by torchrun or srun composes its own; rank 0 writes into
    its folder, so the others' checkpoints to resume from would be elsewhere)."""

    def __init__(self, output_dir: Path):
        self.output_dir = str(Path(output_dir).resolve())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        folder = trainer.strategy.broadcast(self.output_dir, src=0)
        if not trainer.strategy.reduce_boolean_decision(folder == self.output_dir, all=True):
            raise ConfigError(
                f"the {trainer.world_size} processes resolved different run folders (rank 0: {folder}); "
                "give them one with hydra.run.dir=<folder> (see README, Multi-GPU and multi-node)"
            )


class RankFailureWatch(pl.Callback):
    """DDP: starts the watchdog of :mod:`mchad.runs.rank_watch` once the process group exists
    and announces this rank's exception to the others (before Lightning's teardown)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:
            return
        from torch.distributed.distributed_c10d import _get_default_store  # the launch's TCPStore

        from mchad.runs import rank_watch

        rank_watch.start(_get_default_store(), trainer.global_rank, self.output_dir if trainer.is_global_zero else None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from mchad.runs import rank_watch

        if trainer.world_size > 1 and not isinstance(exception, (KeyboardInterrupt, SystemExit)):
            rank_watch.announce(exception)


def result_frame(rows: list[dict]):
    """results.csv's rows as a table: RESULT_COLUMNS, then the data's own (an open-set ``split``)."""
    import pandas as pd  # here, not at start-up (python -m mchad.bench)

    extra = [key for key in (rows[0] if rows else {}) if key not in RESULT_COLUMNS]
    return pd.DataFrame(rows, columns=RESULT_COLUMNS + extra)


def write_results(rows: list[dict], path: Path) -> None:
    """Write results.csv atomically: a reader sees the whole file or none."""
    frame = result_frame(rows)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _command_overrides() -> list[str]:
    """The overrides of the command line (``python run.py <overrides>``), [] outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _save_config(cfg: DictConfig, path: Path) -> None:
    try:
        OmegaConf.save(cfg, path, resolve=True)
    except OmegaConfBaseException as error:  # e.g. a mandatory value (???) left unset
        raise ConfigError(str(error).strip().splitlines()[0]) from error


def _remove_stale_results(output_dir: Path) -> Path:
    """Remove a previous results.csv (and its scores, provenance and objective files) from the
    run folder: a run that fails must leave none."""
    from mchad.results.scores import SCORES_FILE
    from mchad.runs.provenance import PROVENANCE_FILE

    path = output_dir / "results.csv"
    if path.exists():
        log.warning("Removing the previous %s (it is written again when this run ends)", path)
        path.unlink()
    for stale in (SCORES_FILE, PROVENANCE_FILE, OBJECTIVE_FILE):
        (output_dir / stale).unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class Start:
    """What a run starts from (:func:`start`): its config, the checkpoint it loads and its mode."""

    cfg: DictConfig
    ckpt_file: Path | None = None
    training: bool = True
    resuming: bool = False
    #: an evaluation-only run of a run folder keeps that run's experiment name
    named: bool = False


def run(cfg: DictConfig) -> Path:
    """Train and test as configured; returns the path of results.csv.

    - ``resume=<run folder|checkpoint>``: continue that run in its folder with its saved
      configuration (plus this command's value overrides) and its random states;
    - ``train=false ckpt_path=<run folder|checkpoint>``: only test that model;
    - ``ckpt_path=...`` with training: start from that checkpoint's full training state.

    A stale results.csv in the run folder is removed first, so a run that fails leaves none.
    ``cfg`` is not changed: the run's own config is a copy (:func:`run_config`).
    """
    from mchad.checkpoints import check_fits, load_checkpoint
    from mchad.runs import provenance, rank_watch

    code = provenance.code_state()  # now: the code may be edited while the run trains
    begin = start(cfg)
    cfg = run_config(begin)
    output_dir = Path(cfg.paths.output_dir)
    if not begin.resuming:  # a resumed run's folder changes only once its checkpoint is known to fit
        _write_config(cfg, output_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint = None if begin.ckpt_file is None else load_checkpoint(begin.ckpt_file, _hint(begin), _trust(cfg))
    datamodule, model = build(cfg)
    check_test_cases(datamodule)
    if begin.training and cfg.get("objective") is not None:
        check_objective_score(cfg.objective, model.score_names)
    if checkpoint is not None:
        check_fits(model, checkpoint, begin.ckpt_file)
    if begin.resuming:
        _write_config(cfg, output_dir, remove_stale=True)
    trainer = _make_run_trainer(cfg, begin, checkpoint, output_dir)
    with _lightning_stops(trainer):
        if begin.training:
            fit(cfg, trainer, model, datamodule, begin.ckpt_file)
        else:
            model.load_state_dict(checkpoint["state_dict"])
            log.info("Testing %s (no training)", begin.ckpt_file)
        del checkpoint
        trainer.test(model, datamodule=datamodule, verbose=False)
        rank_watch.finish()  # past the last collective
    if not trainer.is_global_zero:  # DDP: its scores are in rank 0's results
        return output_dir / "results.csv"
    return write_run_results(cfg, begin, code, datamodule, model, trainer)


# ----------------------------------------------------------------------------- the run's modes


def start(cfg: DictConfig) -> Start:
    """The run's mode: resume a run, only test a model, train from a checkpoint, or train afresh."""
    if cfg.get("resume"):
        return _resume(cfg)
    if is_launch_rank_zero():  # DDP: rank 0 alone writes files (the others only compute)
        _remove_stale_results(Path(cfg.paths.output_dir))
    if not cfg.get("train", True):
        return _evaluation_only(cfg)
    _check_objective(cfg)
    return Start(cfg, checkpoint_file(cfg.ckpt_path) if cfg.get("ckpt_path") else None)


def _resume(cfg: DictConfig) -> Start:
    """``resume=<run>``: the run's saved config plus the command's value overrides, its last checkpoint."""
    from mchad.runs.resume import resume_config

    if not cfg.get("train", True):
        raise ConfigError("resume= continues training; to only test a run use train=false ckpt_path=<run folder>")
    cfg, ckpt_file = resume_config(cfg, _command_overrides())
    log.info("Resuming %s from %s", cfg.paths.output_dir, ckpt_file)
    _check_objective(cfg)
    return Start(cfg, ckpt_file, resuming=True)


def _evaluation_only(cfg: DictConfig) -> Start:
    """``train=false ckpt_path=<run>``: the model (and experiment name) of the run that wrote the checkpoint."""
    from mchad.runs.resume import eval_config

    if not cfg.get("ckpt_path"):
        raise ConfigError("train=false only tests a trained model: give it with ckpt_path=<run folder or .ckpt file>")
    ckpt_file = checkpoint_file(cfg.ckpt_path)
    cfg, named = eval_config(cfg, ckpt_file, _command_overrides())
    return Start(cfg, ckpt_file, training=False, named=named)


def _check_objective(cfg: DictConfig) -> None:
    if cfg.get("objective") is not None:
        check_objective(cfg.objective)


def run_config(begin: Start) -> DictConfig:
    """The config the run uses, checked: the data's number of classes filled in and, unless the
    run keeps its own, the experiment name set (in a copy: ``begin.cfg`` stays as it is)."""
    cfg = with_n_classes(begin.cfg)
    check_config(cfg)
    check_gpu_present(cfg)
    check_factories(cfg, _instantiate)  # the optimizer's values, before the data is loaded
    if begin.resuming or begin.named:
        return cfg
    name = experiment_name(cfg)
    cfg = copy.deepcopy(cfg) if cfg is begin.cfg else cfg
    cfg.name = name
    return cfg


def _trust(cfg: DictConfig) -> bool:
    """Whether checkpoints are unpickled fully (they may run code), ``trust_checkpoint``."""
    return bool(cfg.get("trust_checkpoint", False))


def _hint(begin: Start) -> str:
    """What a resumed run whose checkpoint is unreadable can do."""
    return (
        "; resume from another of its checkpoints: resume=<run folder>/checkpoints/<name>.ckpt"
        if begin.resuming
        else ""
    )


def _write_config(cfg: DictConfig, output_dir: Path, remove_stale: bool = False) -> None:
    """Global rank zero: the run folder with the run's config.yaml (``remove_stale``: a resumed
    run's previous results removed first)."""
    if not is_launch_rank_zero():
        return
    if remove_stale:
        _remove_stale_results(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _save_config(cfg, output_dir / "config.yaml")


def _make_run_trainer(cfg: DictConfig, begin: Start, checkpoint: dict | None, output_dir: Path) -> pl.Trainer:
    """The run's trainer: its loggers (continued from a checkpoint, metrics.csv keeps the rows up
    to it) and the DDP callbacks (one run folder; a failing rank stops the others at once)."""
    from mchad.runs.resume import keep_csv_history

    loggers = make_loggers(cfg)
    if begin.training and checkpoint is not None and is_launch_rank_zero():
        keep_csv_history(loggers, int(checkpoint.get("global_step", 0)))
    return make_trainer(cfg, loggers, extra_callbacks=(SharedRunFolder(output_dir), RankFailureWatch(output_dir)))


def fit(cfg: DictConfig, trainer: pl.Trainer, model: OODModel, datamodule, ckpt_file: Path | None) -> None:
    """Train (from ``ckpt_file``'s full training state if given), then write the sweep objective."""
    # Lightning loads the file again: explicitly weights-only too (its None means torch's default)
    ckpt_path = None if ckpt_file is None else str(ckpt_file)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not _trust(cfg))
    # validation data only, before any test set is scored; rank 0 alone (DDP)
    if cfg.get("objective") is not None and trainer.is_global_zero:
        write_objective(cfg.objective, trainer, model, Path(cfg.paths.output_dir))


@contextmanager
def _lightning_stops(trainer: pl.Trainer) -> Iterator[None]:
    """Lightning ends ``fit``/``test`` with SystemExit on a preemption and on Ctrl-C: turned back
    into :class:`~mchad.errors.Preempted` and KeyboardInterrupt (:mod:`mchad.task` ends the run)."""
    try:
        yield
    except SystemExit as stop:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        from mchad.runs.preemption import received

        if isinstance(stop, SIGTERMException):  # Lightning stopped at a batch boundary (mchad.runs.preemption)
            raise Preempted(received() or "SIGTERM") from None
        if trainer.interrupted:  # Lightning turns Ctrl-C into SystemExit(1)
            raise KeyboardInterrupt from None
        raise


def write_run_results(cfg: DictConfig, begin: Start, code, datamodule, model: OODModel, trainer) -> Path:
    """Global rank zero: the per-sample scores, then results.csv (written last: it marks a finished
    run) with the run's provenance; returns results.csv's path."""
    from mchad.results.scores import SCORES_FILE, save_scores
    from mchad.runs import provenance

    output_dir, ckpt_file = Path(cfg.paths.output_dir), begin.ckpt_file
    # an eval-only run's rows belong to the model it tested: that run's seed
    seed, evaluated_from = (cfg.seed, "") if begin.training else (checkpoint_seed(ckpt_file), str(ckpt_file))
    meta = {"experiment": cfg.name, "id_dataset": datamodule.name, "method": cfg.model.name, "seed": seed}
    extra = getattr(datamodule, "result_columns", {})  # e.g. the open-set split
    rows = [{**meta, **extra, **row, "evaluated_from": evaluated_from} for row in model.test_results]
    groups = getattr(datamodule, "test_case_groups", {})
    if any(groups.values()):  # OpenOOD's near/far per test case (empty for the other sets)
        rows = [{**row, "group": groups.get(row["test_case"]) or ""} for row in rows]
    rows = provenance.record(cfg, code, datamodule, trainer, rows, output_dir, ckpt_file)
    save_scores(model.test_outputs, model.score_names, meta, output_dir / SCORES_FILE)
    path = output_dir / "results.csv"
    write_results(rows, path)
    log.info("Results: %s\n%s", path, result_frame(rows).to_string(index=False))  # every column of results.csv
    return path


def experiment_name(cfg: DictConfig) -> str:
    """results.csv's ``experiment``: ``name=`` when given on the command line, else
    ``<datamodule>-<model>`` of the config groups that ran (``digits-cac`` for
    ``model=cac``; an image folder by its folder's name: ``cifar10-jpeg-mchad``; OpenOOD's
    protocol, ``testmodules=openood``: ``openood-cifar10-mchad``); an open-set
    experiment keeps its name (``osr-<setting>-<method>``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or any(o.lstrip("+").split("=")[0] == "name" for o in _command_overrides()):
        return cfg.name
    if cfg.get("osr") is not None:  # open set: the setting is the data, wherever its images come from
        return cfg.name
    choices = HydraConfig.get().runtime.choices
    data, model = choices.get("datamodule"), choices.get("model")
    if data == "imagefolder" and cfg.datamodule.get("root"):
        data = Path(str(cfg.datamodule.root)).name  # the user's folder, e.g. cifar10-jpeg
    if data and "openood" in str(choices.get("testmodules")):  # OpenOOD's splits, not the paper's
        data = f"openood-{data}"
    return f"{data}-{model}" if data and model else cfg.name


def checkpoint_seed(ckpt_file: Path) -> int | None:
    """The seed of the run that wrote ``<run>/checkpoints/<name>.ckpt`` (its config.yaml), None if unknown."""
    config = ckpt_file.parent.parent / "config.yaml"
    seed = OmegaConf.select(OmegaConf.load(config), "seed", default=None) if config.is_file() else None
    if not isinstance(seed, int):
        log.warning("The seed of %s is unknown (no config.yaml of its run): the seed column is left empty", ckpt_file)
        return None
    return seed
