"""The replication scripts bash/run-*.sh: the commands they generate (dry run), and one real
tiny run on the quick-start."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import EXPERIMENTS, ROOT
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mchad import registry

BASH = ROOT / "bash"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("EXPERIMENTS", "EXPERIMENT", "DATASETS", "METHODS", "SEEDS", "RADII", "PARAMETERS", "PRETRAINED")
    }
    full_env.update(PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(BASH / name), *args], env=full_env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def _sweep(value: str) -> list[str]:
    """Values of a Hydra sweep override (``a,b`` or ``range(...)``)."""
    override = OverridesParser.create().parse_override(f"k={value}")
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [value]


def _overrides(command: list[str]) -> dict[str, str]:
    assert command[:3] == [sys.executable, str(ROOT / "run.py"), "-m"]
    return dict(arg.split("=", 1) for arg in command[3:])


def test_run_experiments_dry_run_sweeps_all_existing_experiments_and_seeds():
    (command,) = _commands(_script("run-experiments.sh", "--dry-run", "dataset_dir=/data", "trainer.gpus=1"))
    args = _overrides(command)
    expected = registry.experiments("paper")  # every dataset x method of the registry, in table order
    assert set(EXPERIMENTS) <= set(expected)
    assert "cifar10-mchad" in expected
    assert _sweep(args["experiment"]) == expected
    assert _sweep(args["seed"]) == [str(s) for s in range(1, 21)]
    assert command[-2:] == ["dataset_dir=/data", "trainer.gpus=1"]  # passed through, last


def test_run_experiments_starts_from_the_pretrained_checkpoint(tmp_path):
    """Every published run started from Hendrycks' ImageNet WRN: the dry run shows it (from
    dataset_dir or PRETRAINED); a real run without the file stops with one line."""
    checkpoint = tmp_path / "imagenet_wrn_baseline_epoch_99.pt"
    checkpoint.write_bytes(b"")
    (command,) = _commands(_script("run-experiments.sh", "-n", f"dataset_dir={tmp_path}"))
    assert _overrides(command)["++model.pretrained_checkpoint"] == str(checkpoint)
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"")
    result = _script("run-experiments.sh", "-n", f"dataset_dir={tmp_path}", PRETRAINED=str(other))
    assert _overrides(_commands(result)[0])["++model.pretrained_checkpoint"] == str(other)
    assert result.stderr == ""
    # missing: the dry run warns and still shows it; a real run stops before starting anything
    missing = tmp_path / "missing"
    dry = _script("run-experiments.sh", "-n", f"dataset_dir={missing}")
    assert _overrides(_commands(dry)[0])["++model.pretrained_checkpoint"] == str(missing / checkpoint.name)
    assert "warning: pretrained checkpoint" in dry.stderr
    real = _script("run-experiments.sh", f"dataset_dir={missing}", SEEDS="1")
    assert real.returncode == 1 and real.stdout == ""
    (line,) = real.stderr.splitlines()
    assert line.startswith(f"error: pretrained checkpoint {missing / checkpoint.name} not found")
    assert "github.com/hendrycks/pre-training" in line and "PRETRAINED=" in line
    # from scratch on request; the quick-start has no WRN to start from
    (scratch,) = _commands(_script("run-experiments.sh", "-n", PRETRAINED="none"))
    assert "++model.pretrained_checkpoint" not in _overrides(scratch)
    (quick,) = _commands(_script("run-experiments.sh", "-n", EXPERIMENTS="none"))
    assert "++model.pretrained_checkpoint" not in _overrides(quick)


def test_run_experiments_lists_from_the_environment_and_missing_configs(tmp_path):
    result = _script("run-experiments.sh", "-n", DATASETS="cifar10 mnist", METHODS="mchad", SEEDS="1,2")
    (command,) = _commands(result)
    assert _sweep(_overrides(command)["experiment"]) == ["cifar10-mchad"]
    assert _overrides(command)["seed"] == "1,2"
    assert "skipping mnist-mchad" in result.stderr
    none = _script("run-experiments.sh", "-n", DATASETS="mnist", METHODS="x")
    assert none.returncode == 2 and "none of the experiments exists" in none.stderr
    (quick,) = _commands(_script("run-experiments.sh", "-n", EXPERIMENTS="none", SEEDS="1"))
    assert "experiment" not in _overrides(quick)


def test_run_ablation_dry_run_three_weight_sweeps():
    commands = _commands(_script("run-ablation.sh", "-n", "dataset_dir=/data"))
    assert len(commands) == 3
    swept = {}
    for command in commands:
        args = _overrides(command)
        assert args["experiment"] == "cifar10-gmchad"
        assert args["trainer.min_epochs"] == args["trainer.max_epochs"] == "100"
        assert args["++trainer.val_check_interval"] == "0.1"
        assert args["seed"] == "1" and command[-1] == "dataset_dir=/data"
        (key,) = [k for k in args if k.startswith("model.")]
        swept[key] = [float(v) for v in _sweep(args[key])]
        assert args["name"] == f"ablation-{key[6:]}-${{{key}}}"
    tenths = [i / 10 for i in range(11)]
    assert swept["model.weight_ce"] == pytest.approx(tenths) and len(swept["model.weight_ce"]) == 11
    assert swept["model.weight_center"] == pytest.approx(tenths)
    assert swept["model.weight_oe"] == pytest.approx([i * 1e-6 for i in range(11)], abs=1e-12)


def test_run_vary_radius_dry_run():
    (command,) = _commands(_script("run-vary-radius.sh", "--dry-run", "trainer.gpus=1"))
    args = _overrides(command)
    assert _sweep(args["experiment"]) == ["cifar10-mchad", "cifar10-gmchad"]
    assert _sweep(args["model.radius"]) == [str(r) for r in range(21)]
    assert command[-1] == "trainer.gpus=1"


def test_scripts_hard_code_no_machine_paths():
    for script in BASH.glob("*.sh"):
        text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        # an absolute path at the start of a word; `$WORK/datasets` is relative to a variable
        found = re.findall(r"""(?:^|[\s"'=:(])(/(?:home|data|work|mnt|tmp)\b[^\s"']*)""", text, re.M)
        assert not found, f"{script.name}: {found}"


@pytest.mark.slow
def test_run_vary_radius_real_tiny_run(tmp_path):
    """The quick-start, two radii, one after another in this process (basic launcher)."""
    result = _script(
        "run-vary-radius.sh",
        "hydra/launcher=basic",
        f"paths.log_dir={tmp_path}",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "~logger",
        "~callbacks",
        EXPERIMENTS="none",
        RADII="0,2",
        SEEDS="1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multiruns").iterdir()
    radii = sorted(OmegaConf.load(p).model.radius for p in sweep_dir.glob("*/config.yaml"))
    assert radii == [0, 2]
    assert len(list(sweep_dir.glob("*/results.csv"))) == 2
    assert "2 trial(s) finished, 0 failed" in result.stdout


def test_run_ablation_real_tiny_run_names_the_value(tmp_path):
    result = _script(
        "run-ablation.sh",
        "hydra/launcher=basic",
        f"paths.log_dir={tmp_path}",
        "~logger",
        "~callbacks",
        EXPERIMENT="none",
        EPOCHS="1",
        VAL_INTERVAL="0.5",
        PARAMETERS="weight_ce",
        WEIGHTS_CE="0.7",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = tmp_path.glob("multiruns/*/0/results.csv")
    assert "ablation-weight_ce-0.7" in results.read_text()


def test_an_unknown_method_is_refused_naming_it():
    """The scripts take their methods from the registry, which names a method it does not know."""
    result = _script("run-openset.sh", "-n", METHODS="mchad protoz")
    assert result.returncode == 2 and "unknown method protoz" in result.stderr
    assert not result.stdout
