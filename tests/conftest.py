"""Shared fixtures: composing configs the way run.py does, tiny data made by the tests."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from forked_runs import RUN_PY, run_py
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict
from PIL import Image

import mchad  # noqa: F401  (registers the resolvers)
from mchad.targets import VERSION_BASE_KWARGS

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
ALL_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
#: the paper's <dataset>-<method> experiments (openood-* are OpenOOD v1.5's: tests/test_openood.py)
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if not e.startswith("openood-")]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MCHAD_ROOT", str(ROOT))


#: the shortest CPU benchmark on synthetic data (``python -m mchad.bench``); its figures do not
#: depend on the data's size, and CIFAR's 60,000 synthetic images would take seconds to make
TINY_BENCH_ARGS = "--data synthetic --synthetic-size 2000 --device cpu --steps 2 --warmup 1 --repeats 1".split()

#: composed configs (with their hydra node), pickled, by what composing them depends on; see compose_config
_COMPOSED: dict[tuple, bytes] = {}
#: the folders all of this session's pytest-xdist workers share, "composed" (configs) and "runs"
#: (see shared_run); set by a session fixture, absent before it runs (e.g. while a module is
#: collected: composed configs are then not shared)
_SHARED: dict[str, Path] = {}


def compose_config(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose config/train.yaml with ``overrides`` as ``python run.py <overrides>`` would.

    With ``output_dir``, ``paths.output_dir`` points there (no Hydra run needed). Composing
    takes 0.1-0.2 s and the suite composes the same configs hundreds of times, so each is
    composed once per session, kept pickled, in this process and for the other workers, and
    handed out unpickled: a copy of its own for each test, which may change it (2.4 ms for an
    experiment's config; ``copy.deepcopy`` took 7.9 ms). The key holds
    all that composing reads besides the config files: the overrides, the working directory
    (Hydra's runtime.cwd) and the MCHAD_/HYDRA_ variables.
    """
    cfg = pickle.loads(_composed(tuple(overrides or [])))
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a run: the task sees the job's config only
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg


def _composed(overrides: tuple[str, ...]) -> bytes:
    """The config composed with ``overrides`` (with its hydra node), pickled, made once."""
    key = (
        overrides,
        os.getcwd(),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("MCHAD_", "HYDRA_")))),
    )
    if key not in _COMPOSED:
        _COMPOSED[key] = _shared(key, lambda: pickle.dumps(_compose(list(overrides))))
    return _COMPOSED[key]


def _compose(overrides: list[str]) -> DictConfig:
    """Compose as Hydra does (its ConfigLoaderImpl): the config groups' choices first, then the
    value overrides on top, with Hydra's own function. The groups' part, nearly all the time, is
    then made once for all the lists with the same choices: the 345 lists a run of the suite
    composes (171 sets of choices) took 48.1 s of CPU with Hydra's compose, 26.0 s this way, and
    gave the same configs. test_configs checks that the result is Hydra's to the last node."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    chooses = [_is_group_override(o) for o in parsed]
    values = [o for o, choice in zip(parsed, chooses, strict=True) if not choice]
    if not values or any(o.is_sweep_override() for o in parsed):
        return compose_with_hydra(overrides)
    cfg = pickle.loads(_composed(tuple(o.input_line for o, choice in zip(parsed, chooses, strict=True) if choice)))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    # the record of the command line, as Hydra writes it after applying the value overrides
    # (the hydra.* overrides were composed with the groups: hydra.overrides.hydra holds them)
    cfg.hydra.overrides.task = [o.input_line for o in parsed if not o.is_hydra_override()]
    dirname = cfg.hydra.job.config.override_dirname
    cfg.hydra.job.override_dirname = get_overrides_dirname(
        overrides=[o for o in parsed if not o.is_hydra_override()],
        kv_sep=dirname.kv_sep,
        item_sep=dirname.item_sep,
        exclude_keys=dirname.exclude_keys,
    )
    return cfg


def _is_group_override(override) -> bool:
    """Whether ``override`` decides what is composed: a config group's choice (Hydra's
    DefaultsList's test), or a hydra.* value (hydra.searchpath says where the groups are)."""
    group = override.key_or_group
    is_group = group.startswith("hydra/") or (CONFIG_DIR / group).is_dir()
    return override.is_hydra_override() or (is_group and not isinstance(override.value(), dict))


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """Hydra's ``compose`` of config/train.yaml, its hydra node included."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), **VERSION_BASE_KWARGS):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _shared(key: tuple, make) -> bytes:
    """``make()`` (bytes), or what another worker of this session made for ``key`` (a file,
    replaced atomically: two workers that make the same one at once both write whole files)."""
    folder = _SHARED.get("composed")
    if folder is None:
        return make()
    path = folder / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.pkl"
    if path.is_file():
        return path.read_bytes()
    value = make()
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_bytes(value)
    os.replace(partial, path)
    return value


@pytest.fixture(scope="session", autouse=True)
def _share_across_workers(tmp_path_factory):
    """Composed configs and shared runs go to a folder beside this worker's base temp folder:
    the parent of the workers' ``popen-gw<N>`` folders, new for every session (pytest-xdist's
    way to share)."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "shared"
    for name in ("composed", "runs"):
        _SHARED[name] = shared / name
        _SHARED[name].mkdir(parents=True, exist_ok=True)
    yield
    _SHARED.clear()


def imported_modules(stderr: str) -> set[str]:
    """The modules a ``python -X importtime`` process imported, read from its stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def console_lines(stderr: str) -> list[str]:
    """stderr without ``-X importtime``'s lines: what the user sees."""
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@dataclass(frozen=True)
class SharedRun:
    """A finished ``python run.py`` process: its exit status, output and ``paths.log_dir``."""

    returncode: int
    stdout: str
    stderr: str
    logs: Path

    def console(self) -> str:
        """stderr without ``-X importtime``'s lines: what the user sees."""
        return "\n".join(console_lines(self.stderr))


def shared_run(name: str, args: list[str], env: dict[str, str]) -> SharedRun:
    """``python <args> paths.log_dir=<logs>`` (args: interpreter options, run.py, overrides),
    run once per session for all the tests that read it, whichever worker asks first (the
    others wait on a file lock). A test must not change what is in ``logs``: it copies it."""
    folder = _SHARED["runs"] / name
    record = folder / "completed.json"
    with FileLock(f"{folder}.lock"):
        if not record.is_file():
            folder.mkdir(exist_ok=True)  # a run cut short before (a timeout) leaves its folder
            logs = folder / "logs"
            if args[0] == str(RUN_PY):  # python run.py ...: forked (tests/forked_runs.py)
                result = run_py([*args[1:], f"paths.log_dir={logs}"], cwd=folder, env=env)
            else:  # interpreter options (-X importtime): a real start
                command = [sys.executable, *args, f"paths.log_dir={logs}"]
                result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
            done = {"args": args, "returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
            record.write_text(json.dumps(done))
    done = json.loads(record.read_text())
    assert done.pop("args") == args, f"two tests share the run {name!r} with different arguments"
    return SharedRun(**done, logs=folder / "logs")


#: variables that would place a run started by a test elsewhere: its root, run id and working
#: directory, or a Ray cluster to join
RUN_PLACE_VARIABLES = ("MCHAD_ROOT", "RAY_ADDRESS", "MCHAD_RUN_ID", "MCHAD_CWD")


def _test_env(**extra: str) -> dict[str, str]:
    """This environment without :data:`RUN_PLACE_VARIABLES` and a SLURM job's variables,
    unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_PLACE_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture
def failed_run() -> SharedRun:
    """``python run.py model.margin=-1``, shared by the tests of how a failing single run ends: an
    input mistake found once the data is loaded and the model is built (the method's constructor
    refuses the value); ``-X importtime`` lists the modules it imported."""
    args = ["-X", "importtime", str(ROOT / "run.py"), "model.margin=-1", "trainer.max_epochs=1"]
    return shared_run("failed-run", args, _test_env())


#: the quick-start for a few batches with the callbacks that checkpoint, and its CSV logger
SHORT_RUN = [
    "trainer.max_epochs=3",
    "trainer.min_epochs=3",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
]
SHORT_RUN_CALLBACKS = ("model_checkpoint", "last_checkpoint", "lr_monitor")


def light_overrides(*overrides: str) -> list[str]:
    """Drop the slow view/plot callbacks and TensorBoard (whatever they are called now)."""
    cfg = compose_config(list(overrides))
    drop = [f"~callbacks.{k}" for k in cfg.callbacks if k not in SHORT_RUN_CALLBACKS]
    drop += [f"~logger.{k}" for k in cfg.get("logger", {}) if k != "csv"]
    return drop


@pytest.fixture
def piped_run() -> SharedRun:
    """``python run.py`` (a short quick-start) with its output to pipes, as a batch job has it, on
    a host where ``srun`` is on the PATH (a fake one): shared by the tests of the console."""
    bin_dir = _SHARED["runs"] / "bin"
    with FileLock(f"{bin_dir}.lock"):
        if not (bin_dir / "srun").is_file():
            bin_dir.mkdir(exist_ok=True)
            (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / "srun").chmod(0o755)
    args = [str(ROOT / "run.py"), *SHORT_RUN, *light_overrides(*SHORT_RUN)]
    return shared_run("piped-run", args, _test_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"))


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 12, size: int = 32, splits=("train", "test"), seed: int = 0
) -> Path:
    """Write a small image folder (``root/<split>/<class>/*.png``) whose classes differ in colour,
    so that a model can learn them."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., c % 3] = 200
                image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def pytest_configure(config) -> None:
    """Share the cores among pytest-xdist's workers: each worker, and the runs it starts as
    subprocesses (through the environment), gets its slice of threads instead of all of them.
    xdist's controller runs no test and sets nothing, so its workers do not inherit its count."""
    if config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    gc.disable()  # until the test modules are imported: pytest_collection_finish
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    import torch

    torch.set_num_threads(int(threads))


def pytest_collection_finish(session) -> None:
    """Python's garbage collector starts again, as in ``run.py`` (mchad.runs.collector.gc_after_imports),
    with what the imports made frozen, and collects young objects less often: the tests build
    hundreds of configs, models and trainers. Measured over the 332 tests of test_experiments,
    test_openset, test_device_guard and test_methods (one process, 2 cores): 72.7-73.2 s of CPU
    before, 66.0 s frozen, 63.0 s with the thresholds too."""
    gc.freeze()
    gc.enable()
    gc.set_threshold(20_000, 20, 20)


#: modules whose tests start whole runs, process groups or a Ray cluster, heaviest first: run
#: before the rest so that pytest-xdist's workers finish together instead of one waiting for
#: the other's last long test
HEAVY_FIRST = (
    "test_sweep.py",
    "test_ddp.py",
    "test_bench.py",
    "test_sweep_resume.py",
    "test_run.py",
    "test_device_guard.py",
)


#: the fixtures of a run shared by several tests (shared_run): their tests go first of all, into
#: the first worker's share, so that no worker sits idle waiting for another to finish the run
#: (measured: one worker waited 3.3 s when two reached failed_run at once)
SHARED_RUN_FIXTURES = ("failed_run", "piped_run")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def order(item) -> tuple[bool, int]:
        shares = any(name in SHARED_RUN_FIXTURES for name in getattr(item, "fixturenames", ()))
        return not shares, rank.get(item.path.name, len(rank))

    items.sort(key=order)  # stable: otherwise as collected
