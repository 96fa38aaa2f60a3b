"""Shared fixtures: composing configs the way run.py does, tiny data made by the tests."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
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

#: composed configs (with their hydra node), by what composing them depends on; see compose_config
_COMPOSED: dict[tuple, DictConfig] = {}


def compose_config(overrides: list[str] | None = None, output_dir: Path | None = None) -> DictConfig:
    """Compose config/train.yaml with ``overrides`` as ``python run.py <overrides>`` would.

    With ``output_dir``, ``paths.output_dir`` points there (no Hydra run needed). Composing
    takes about 0.1 s and the suite composes the same configs hundreds of times, so each is
    composed once per process and handed out as a deep copy (a test may change its own). The
    key holds all that composing reads besides the config files: the overrides, the working
    directory (Hydra's runtime.cwd) and the MCHAD_/HYDRA_ variables.
    """
    key = (
        tuple(overrides or []),
        os.getcwd(),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("MCHAD_", "HYDRA_")))),
    )
    if key not in _COMPOSED:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), **VERSION_BASE_KWARGS):
            _COMPOSED[key] = compose("train", overrides=list(key[0]), return_hydra_config=True)
    cfg = copy.deepcopy(_COMPOSED[key])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a run: the task sees the job's config only
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg


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
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    import torch

    torch.set_num_threads(int(threads))


#: modules whose tests start whole runs, process groups or a Ray cluster, heaviest first: run
#: before the rest so that pytest-xdist's workers finish together instead of one waiting for
#: the other's last long test
HEAVY_FIRST = ("test_sweep.py", "test_ddp.py", "test_bench.py", "test_sweep_resume.py", "test_run.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: otherwise as collected
