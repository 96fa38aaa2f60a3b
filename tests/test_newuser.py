"""What a new user met (issue 39): provenance of untracked code, the own-data page offline,
library noise on the console, and one-line messages for a truncated checkpoint, a missing image
folder and a value of the wrong type."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from forked_runs import run_py
from omegaconf import OmegaConf

from mchad.runs import provenance

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_changes_with_an_untracked_module(tmp_path):
    """A method kept in an untracked file (docs/layout-and-extending.md's my_methods.py) is code
    the run imported: editing it gives another code version, also seen from a subfolder."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "src" / "loss.py").write_text("weight = 1\n")
    (repo / ".gitignore").write_text("/logs/\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (repo / "my_methods.py").write_text("weight = 2.0\n")
    first = provenance.code_version(provenance.code_state(repo / "src"))
    (repo / "my_methods.py").write_text("weight = 9.0\n")
    second = provenance.code_version(provenance.code_state(repo / "src"))
    assert ".dirty-" in first and ".dirty-" in second and first != second
    (repo / "logs").mkdir()  # ignored files (a run's outputs) are not code
    (repo / "logs" / "results.csv").write_text("a,b\n")
    assert provenance.code_version(provenance.code_state(repo / "src")) == second


# ----------------------------------------------------------------------------- docs/own-data.md offline

OWN_DATA = ROOT / "docs" / "own-data.md"
#: what makes the page's command quick on a CPU; none of it touches the data sets
QUICK = [
    "model/backbone=convnet",
    "datamodule.batch_size=8",
    "datamodule.val_fraction=0.2",
    "callbacks.validation_views.unknown_samples=50",
    "callbacks.embedding_animation.unknown_samples=50",
    "trainer.max_epochs=1",
    "trainer.min_epochs=1",
]


def own_data_command() -> list[str]:
    """The overrides of the first ``python run.py`` command of own-data.md's '## Image folders'."""
    page = OWN_DATA.read_text(encoding="utf-8")
    section = re.search(r"^## Image folders\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert section is not None, "docs/own-data.md has no '## Image folders'"
    for block in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M):
        for line in block.splitlines():
            if line.startswith("python run.py "):
                return shlex.split(line)[2:]
    raise AssertionError("docs/own-data.md's '## Image folders' has no `python run.py` command")


def test_own_data_command_runs_offline_as_written(tmp_path):
    """The page's command on a tiny image folder, with every download refused (a proxy that
    does not exist): it trains, tests against the noise sets of the size the page sets."""
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "mydata", classes=3, per_class=12)
    command = [a.replace("/path/to/cifar10-jpeg", str(folder)) for a in own_data_command()]
    assert f"datamodule.root={folder}" in command
    offline = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    logs = tmp_path / "logs"
    result = run_py(
        [*command, *QUICK, f"paths.log_dir={logs}", f"dataset_dir={tmp_path / 'd'}"],
        cwd=tmp_path,
        env={**os.environ, **offline, "no_proxy": "", "NO_PROXY": "", "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (run_dir,) = (logs / "runs").glob("*/*")
    frame = pd.read_csv(run_dir / "results.csv")
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    assert frame[["Accuracy", "AUROC"]].notna().all().all()
    saved = OmegaConf.load(run_dir / "config.yaml").datamodule.test_cases
    sizes = {name: saved[name].n for name in saved}
    assert sizes == {"GaussianNoise": 1000, "UniformNoise": 1000}, "the page's +noise_images=1000"
    log = (run_dir / "run.log").read_text()
    assert "test cases {'GaussianNoise': 1000, 'UniformNoise': 1000}" in log  # the sets built


# ----------------------------------------------------------------------------- smaller rough edges


def test_quick_start_console_has_no_slurm_detection_line(piped_run):
    """Lightning warns on every run of a host with `srun` that it is not used: run.log keeps it,
    the console does not show it (a fake `srun` makes the host look like a SLURM node)."""
    assert piped_run.returncode == 0, piped_run.stderr[-3000:]
    console = piped_run.stdout + piped_run.stderr
    assert "srun" not in console and "SLURM" not in console, console
    (run_dir,) = (piped_run.logs / "runs").glob("*/*")
    assert "The `srun` command is available on your system" in (run_dir / "run.log").read_text()


def test_truncated_checkpoint_message_ends_in_a_full_sentence(tmp_path):
    """PyTorch's text for a truncated file runs past 200 characters: the message keeps its
    first full sentences, not a cut one."""
    import torch

    from mchad.checkpoints import load_checkpoint
    from mchad.errors import CheckpointError

    whole = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(truncated)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {truncated} is unreadable (truncated or corrupt?): ")
    assert "\n" not in message and message.endswith("."), message
    cause = message.split("(truncated or corrupt?): ", 1)[1]
    assert cause.startswith("PytorchStreamReader failed reading zip archive"), message


def test_missing_image_folder_is_named_by_its_path(tmp_path):
    """datamodule=imagefolder inherits CIFAR10's config (and its sources' name): a missing
    folder is reported as the image folder it is, not as "CIFAR10 not found"."""
    from conftest import compose_config
    from hydra.utils import instantiate

    from mchad.errors import DataNotFoundError

    missing = tmp_path / "nothere"
    cfg = compose_config(
        ["experiment=cifar10-mchad", "datamodule=imagefolder", f"datamodule.root={missing}", "testmodules=noise"]
    )
    source = instantiate(cfg.datamodule.train)
    with pytest.raises(DataNotFoundError) as raised:
        source.class_names()
    message = str(raised.value)
    assert message.startswith(f"image folder train not found in {missing}."), message
    assert "CIFAR10" not in message
    (missing / "train" / "cat").mkdir(parents=True)
    source = instantiate({**cfg.datamodule.train, "classes": ["cat", "dog"]})
    with pytest.raises(DataNotFoundError, match=rf"^image folder {missing / 'train'}: class folders \['dog'\]"):
        source.class_names()


# ----------------------------------------------------------------------------- values a constructor refuses


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.optimizer.lr=fast", "model.optimizer.lr=fast"),
        ("datamodule=imagefolder datamodule.root=/nonexistent/images", "image folder train not found in /nonexistent"),
    ],
    ids=["text-lr", "missing-image-folder"],
)
def test_a_value_the_optimizer_refuses_is_one_line_and_leaves_no_run(tmp_path, override, named):
    """The optimizer and scheduler are built by Lightning inside fit(): a value they refuse was
    an internal error with a traceback and a half-filled run folder. Now: one `error:` line
    naming the key, exit 1, and of the run folder only FAILED.txt (as for any input error
    found once the config is built, e.g. a missing image folder)."""
    logs = tmp_path / "logs"
    result = run_py(
        [*override.split(), f"paths.log_dir={logs}"], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    left = sorted(str(p.relative_to(logs)) for p in logs.rglob("*") if p.is_file())
    assert len(left) <= 1 and all(p.endswith("/FAILED.txt") for p in left), left
    if left:
        assert (logs / left[0]).read_text().startswith(lines[0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.optimizer.lr=-1"],
            "model.optimizer: torch.optim.Adam refuses its arguments (Invalid learning rate: -1)",
        ),
        (["+model.scheduler.eta_min=low"], "model.scheduler.eta_min=low: torch.optim.lr_scheduler.CosineAnnealingLR"),
        (["model.optimizer.weight_decay=much"], "model.optimizer.weight_decay=much: torch.optim.Adam refuses it"),
    ],
    ids=["negative-lr", "text-scheduler-value", "text-weight-decay"],
)
def test_optimizer_and_scheduler_values_are_tried_when_the_run_starts(overrides, message):
    """The scheduler's eta_min is first used in its second step: the check steps it once."""
    from conftest import compose_config

    from mchad.errors import ConfigError
    from mchad.runs.instantiate import check_factories
    from mchad.runs.train import _instantiate

    check_factories(compose_config([]), _instantiate)  # the defaults pass
    with pytest.raises(ConfigError) as raised:
        check_factories(compose_config(overrides), _instantiate)
    assert str(raised.value).startswith(message), raised.value


def test_only_a_run_that_produced_nothing_is_discarded(tmp_path):
    """Hydra's files, config.yaml and empty logger folders go; a folder holding anything a run
    produced (a checkpoint, logged metrics: a resumed or started run) is left as it is."""
    from mchad.runs.instantiate import discard_unstarted_run

    def folder(name: str, *files: str) -> Path:
        root = tmp_path / name
        for f in (".hydra/config.yaml", "run.log", "config.yaml", *files):
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text("x")
        (root / "tb").mkdir(exist_ok=True)
        return root

    unstarted = folder("unstarted")
    discard_unstarted_run(unstarted)
    assert unstarted.is_dir() and list(unstarted.iterdir()) == []
    for name, produced in (("resumed", "checkpoints/last.ckpt"), ("started", "csv/metrics.csv")):
        started = folder(name, produced)
        before = sorted(p.relative_to(started) for p in started.rglob("*"))
        discard_unstarted_run(started)
        assert sorted(p.relative_to(started) for p in started.rglob("*")) == before
