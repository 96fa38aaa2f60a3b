"""bash/gpu-check.sh where there is no GPU: its arguments and commands (dry run), and the timing
callback and summary table it relies on (mchad.bench.gpu_check) on a real tiny CPU run."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, TINY_BENCH_ARGS, compose_config, make_image_folder

from mchad.bench import gpu_check

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
    tests, decode, default, bf16, fastest, bench = commands
    assert tests[1:] == [
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        "-m",
        "gpu",
        str(ROOT / "tests"),
    ]
    assert decode[-2:] == [str(data), str(tmp_path / "work" / "datasets")]
    paper = {
        "experiment=cifar10-mchad",
        "datamodule=imagefolder",
        f"datamodule.root={data}",
        "testmodules=noise",
        "trainer.gpus=1",
    }
    for run, name in ((default, "default"), (bf16, "bf16"), (fastest, "fastest")):
        assert run[1] == str(ROOT / "run.py") and paper <= set(run)
        assert f"hydra.run.dir={tmp_path / 'work' / name}" in run
        assert "+callbacks.gpu_check_timer._target_=mchad.bench.gpu_check.run_timer" in run
        # channels_last is left to its default (auto: on for a GPU)
        assert not [o for o in run if o.startswith("model.channels_last")]
    # the paper's scale is the experiment's own (WRN-40-2, 10 epochs): nothing overrides it
    assert not [o for o in default if o.startswith(("trainer.max_epochs", "model/backbone", "trainer.limit_train"))]
    assert "trainer.precision=bf16-mixed" not in default and not [o for o in default + bf16 if "compile" in o]
    assert "trainer.precision=bf16-mixed" in bf16
    assert {"trainer.precision=bf16-mixed", "model.compile=reduce-overhead"} <= set(fastest)
    assert bench[1:5] == ["-m", "mchad.bench.gpu_check", "bench", str(tmp_path / "work")] and "--device" in bench
    # the benchmark's arguments parse, and ask for every GPU figure of the summary
    from mchad.bench import parse_args

    args = parse_args(bench[bench.index("--") + 1 :])
    assert set(args.only.split(",")) == {"train", "eval", "startup", "packed"} and args.packed == 8
    assert args.row_seeds == 0 and args.work_dir == str(tmp_path / "work" / "bench-runs")
    assert not (tmp_path / "work").exists()


@needs_bash
def test_dry_run_with_the_whole_row(tmp_path):
    data = make_image_folder(tmp_path / "cifar", classes=2, per_class=1)
    env = {**os.environ, "PYTHON": sys.executable, "ROW_SEEDS": "21"}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(data), str(tmp_path / "work")], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    bench = shlex.split([line for line in result.stdout.splitlines() if "mchad.bench.gpu_check bench" in line][0][2:])
    assert bench[bench.index("--row-seeds") + 1] == "21"


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
    from mchad.runs.train import run

    folder = tmp_path / "work" / "default"
    overrides = [
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=2",
        "trainer.min_epochs=2",
        "trainer.limit_train_batches=3",
        f"dataset_dir={tmp_path / 'data'}",
        "~callbacks",
        "~logger",
        "+callbacks.gpu_check_timer._target_=mchad.bench.gpu_check.run_timer",
        f"+callbacks.gpu_check_timer.out={folder / 'timing.json'}",
    ]
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
    assert (
        "run-default 400 s (exit 1)" in text and "OVER BUDGET: 500 s > 480 s; the longest phase was run-default" in text
    )


def test_summary_of_a_failed_run_says_so(tmp_path):
    (tmp_path / "fastest").mkdir()
    (tmp_path / "fastest" / "run.log").write_text("Traceback ...")
    assert "fastest  no timing (the run failed; see its log)" in gpu_check.summary(tmp_path)
    assert gpu_check.main(["nonsense"]) == 1


def test_benchmark_figures_of_a_cpu_run(tmp_path):
    """``gpu_check bench`` on a tiny real CPU benchmark: the figures it keeps, n/a for the GPU's."""
    assert (
        gpu_check.main(["bench", str(tmp_path), "--", *TINY_BENCH_ARGS, "--batch-size", "16", "--only", "train"]) == 0
    )
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["lightning"] > 0 and figures["bare"] > 0 and figures["ratio"] > 0
    assert figures["gpu_util"] is None and "syncs" not in figures and "packed" not in figures
    lines = gpu_check.summary(tmp_path).splitlines()
    assert lines[-2].startswith("benchmark (--data synthetic") and "scored at nan img/s" in lines[-2]
    assert (
        lines[-1]
        == "GPU busy while the benchmark's Lightning steps ran: n/a (bare loop n/a); host syncs per step: n/a; "
        "CUDA's own start: n/a"
    )


def test_summary_shows_the_gpu_figures(tmp_path):
    """The figures a GPU run of the benchmark keeps, as the summary prints them (targets marked)."""
    report = {
        "train": {
            "lightning": [6000.0, 6200.0, 6100.0],
            "bare": [6500.0] * 3,
            "ratio": [0.92, 0.95, 0.94],
            "gpu_util": {"lightning": 27.0, "bare": 31.0, "text": "median 27 %"},
        },
        "syncs": {
            "per_step": [0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0],
            "logging_steps": [2, 12],
            "outside_logging": 0,
            "locations": {"pytorch_lightning/x.py:10": 4},
        },
        "eval": {"scoring": [90000.0]},
        "cuda_start": {"CUDA's own start": [1.5, 1.25, 1.75]},
        "packed": {
            "way": "ray",
            "k": 8,
            "alone": 5000.0,
            "combined": 21000.0,
            "ratio": 4.2,
            "alone_first_step_s": 9.0,
            "first_step_s": [20.0, 21.0, 25.0],
            "gpu_util": 90.0,
        },
        "row": {"seeds": 21, "seconds": 200.0, "way": "ray", "k": 8},
    }
    (tmp_path / "bench.json").write_text(json.dumps(gpu_check.figures(report, ["--device", "cuda"])))
    lines = gpu_check.summary(tmp_path).splitlines()
    assert lines[-3] == (
        "benchmark (--device cuda): Lightning 6,100 img/s, bare loop 6,500 img/s, ratio 0.940; "
        "ID + OOD test sets scored at 90,000 img/s"
    )
    assert lines[-2] == (
        "GPU busy while the benchmark's Lightning steps ran: 27 % (bare loop 31 %) [target >= 80 %: MISSED]; "
        "host syncs per step: median 0, max 2 over 14 steps, 0 outside the logging steps "
        "[target 0 outside logging steps: MET]; CUDA's own start: 1.50 s"
    )
    assert lines[-1] == (
        "packed trials (ray, 8 at once): alone 5,000 img/s, combined 21,000 img/s, ratio 4.20x [target >= 4x: MET]; "
        "seconds to the first step: alone 9.0, packed median 21.0; 21-seed sweep in 200 s [target <= 180 s: MISSED]"
    )


def test_barrier_waits_for_the_parties_or_the_timeout(tmp_path):
    import time

    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "1234-1").touch()  # the other trial is there already
    t0 = time.time()
    assert gpu_check.wait_for_parties(tmp_path / "two", 2, timeout=5) - t0 < 0.5
    t0 = time.time()
    released = gpu_check.wait_for_parties(tmp_path / "alone", 2, timeout=0.3)  # the other never comes
    assert 0.3 <= released - t0 < 2 and len(list((tmp_path / "alone").iterdir())) == 1
