"""bash/gpu-check.sh where there is no GPU: its arguments and commands (dry run), and the timing
callback and summary table it relies on (mchad.gpu_check) on a real tiny CPU run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, compose_config, make_image_folder
from mchad import gpu_check

SCRIPT = ROOT / "bash" / "gpu-check.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": "/opt/wheels"}  # as on the GPU machine
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, cwd="/")


@needs_bash
def test_dry_run_prints_the_steps_and_runs_nothing(tmp_path):
    data = make_image_folder(tmp_path / "cifar", classes=2, per_class=1)
    result = _script("--dry-run", str(data), str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    assert f"PYTHONPATH {ROOT / 'src'}:/opt/wheels" in result.stdout  # the repository's src/ first
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    tests, decode, default, fastest, bench = commands
    assert tests[1:] == ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-m", "gpu", str(ROOT / "tests")]
    assert decode[-2:] == [str(data), str(tmp_path / "work" / "datasets")]
    paper = {"experiment=cifar10-mchad", "datamodule=imagefolder", f"datamodule.root={data}", "testmodules=noise", "trainer.gpus=1"}
    for run, name in ((default, "default"), (fastest, "fastest")):
        assert run[1] == str(ROOT / "run.py") and paper <= set(run)
        assert f"hydra.run.dir={tmp_path / 'work' / name}" in run
        assert "+callbacks.gpu_check_timer._target_=mchad.gpu_check.run_timer" in run
    # the paper's scale is the experiment's own (WRN-40-2, 10 epochs): nothing overrides it
    assert not [o for o in default if o.startswith(("trainer.max_epochs", "model/backbone", "trainer.limit_train"))]
    assert {"trainer.precision=bf16-mixed", "model.channels_last=true", "model.compile=true"} <= set(fastest)
    assert "trainer.precision=bf16-mixed" not in default
    assert bench[1:5] == ["-m", "mchad.gpu_check", "bench", str(tmp_path / "work")] and "--device" in bench
    assert not (tmp_path / "work").exists()


@needs_bash
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "usage"),
        (["/nonexistent/cifar"], "is not an image folder"),
        (["--fast", "{data}"], "unknown option --fast"),
        (["{data}", "{data}", "extra"], "usage"),
        (["{data}"], "no CUDA GPU"),  # a real run refuses a machine without one, before anything runs
    ],
)
def test_bad_arguments_are_one_error_line(args, message, tmp_path):
    data = make_image_folder(tmp_path / "cifar", classes=2, per_class=1)
    if message == "no CUDA GPU" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _script(*(a.format(data=data) for a in args))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_timer_and_summary_of_a_real_run(tmp_path):
    """The timing callback on a quick-start run (CPU), and the summary the script prints."""
    from mchad.train import run

    folder = tmp_path / "work" / "default"
    overrides = [
        "trainer.enable_progress_bar=false", "trainer.max_epochs=2", "trainer.min_epochs=2", "trainer.limit_train_batches=3",
        f"dataset_dir={tmp_path / 'data'}", "~callbacks", "~logger",
        "+callbacks.gpu_check_timer._target_=mchad.gpu_check.run_timer", f"+callbacks.gpu_check_timer.out={folder / 'timing.json'}",
    ]  # fmt: skip
    run(compose_config(overrides, output_dir=folder))
    (folder / "run.log").write_text("")
    marks = json.loads((folder / "timing.json").read_text())
    assert marks["images"] == 2 * 3 * 64  # 2 epochs x 3 steps x batch 64
    assert marks["started"] <= marks["first_step"] < marks["train_end"] <= marks["test_start"] < marks["test_end"]
    assert 0 < marks["validation_s"] < marks["train_end"] - marks["first_step"]
    # utilisation samples: two inside training, one before it, one garbled line
    t0, t1 = marks["first_step"], marks["train_end"]
    (folder / "gpu_util.txt").write_text(f"{t0 - 5} 0\n{t0} 40\n{t1} 60\n{t1} [N/A]\n")
    (tmp_path / "work" / "phases.txt").write_text("gpu-tests 100.0 0\nrun-default 400.5 1\n")

    row = gpu_check.run_row(folder)
    frame = pd.read_csv(folder / "results.csv")
    assert row["accuracy"] == frame.Accuracy.iloc[0] and row["gpu_util"] == 50.0
    assert row["auroc"] == {r.test_case: r.AUROC for r in frame[frame.score == "distance"].itertuples()}
    assert row["images_per_s"] == pytest.approx(marks["images"] / (t1 - t0 - marks["validation_s"]))
    text = gpu_check.summary(tmp_path / "work")
    assert "AUROC Digits6-9" in text and "default" in text
    assert "run-default 400 s (exit 1)" in text and "OVER BUDGET: 500 s > 480 s; the longest phase was run-default" in text


def test_summary_of_a_failed_run_says_so(tmp_path):
    (tmp_path / "fastest").mkdir()
    (tmp_path / "fastest" / "run.log").write_text("Traceback ...")
    assert "fastest  no timing (the run failed; see its log)" in gpu_check.summary(tmp_path)
    assert gpu_check.main(["nonsense"]) == 1
