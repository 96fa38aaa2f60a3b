"""The benchmark command runs end to end on synthetic data (what it prints is judged by
reading it; here: it runs, every section reports, and the start-up probe sees no Ray import
and no decoding); the packed trials on the quick-start; the GPU-only measurements' pieces on
the CPU (utilisation sampler with a stand-in nvidia-smi, sync counter with stand-in warnings)."""

import glob
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_BENCH_ARGS

from mchad import bench
from mchad.bench.common import bench_overrides, compose
from mchad.bench.gpu import UtilisationSampler, host_syncs, nvidia_smi_id, sync_counter
from mchad.bench.packed import run_processes, share, trial_overrides
from mchad.bench.startup import first_use_seconds


def test_benchmark_runs_every_section_on_synthetic_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its own temp folder: other tests run alongside
    before = set(glob.glob(f"{tempfile.gettempdir()}/mchad-bench-*"))
    sizes = "--batch-size 32 --data-batches 5 --eval-size 64 --eval-repeats 1 --startup-repeats 1".split()
    report = bench.main([*TINY_BENCH_ARGS, *sizes])
    out = capsys.readouterr().out
    for section in ("(a) training", "(b) data pipeline", "(c) testing", "(d) start-up"):
        assert section in out
    assert "(e) packed" not in out and "packed" not in report  # on a CPU only when asked
    assert "GPU busy, Lightning   : n/a (no GPU)" in out and report["train"]["gpu_util"]["lightning"] is None
    assert "host syncs per step   : n/a (CUDA only" in out and "CUDA's own start: n/a (no GPU)" in out
    assert report["train"]["lightning"][0] > 0 and report["train"]["bare"][0] > 0
    assert math.isfinite(report["train"]["ratio"][0])
    assert min(report["data"]) > 0
    assert report["eval"]["rows"] > 0 and report["eval"]["cases"] == 7
    start = report["startup"]["quick-start (digits)"]
    assert 0 < start["seconds"][0] < 120
    assert start["ray_imported"] is False and start["decoded_images"] == 0
    assert set(start["phases"]) == {"to Trainer.fit", "sanity validation", "rest of fit set-up"}
    assert set(glob.glob(f"{tempfile.gettempdir()}/mchad-bench-*")) == before  # work folder removed


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--only", "train,trian"])
    assert exit_info.value.code == 2
    assert "unknown section(s) trian" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--packed", "0"], "--packed must be at least 1"),
    (["--packed-steps", "0"], "--packed-steps must be at least 1"),
    (["--row-seeds", "-1"], "--row-seeds must be 0"),
    (["--synthetic-size", "0"], "--synthetic-size must be at least 1"),
    (["--packing", "slurm"], "invalid choice: 'slurm'"),
])  # fmt: skip
def test_bad_packed_options_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_work_dir_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "old").write_text("")
    with pytest.raises(SystemExit):
        bench.parse_args(["--work-dir", str(tmp_path)])
    assert "is not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- (e) packed trials
QUICK_PACKED = ["--only", "packed", "--device", "cpu", "--packed", "2", "--packed-steps", "3",
                "--packed-config", "quickstart", "--set", "~callbacks", "--set", "~logger"]  # fmt: skip


def _timings(folder):
    return json.loads((folder / "timing.json").read_text())


def test_packed_trials_as_processes(tmp_path, capsys):
    """One quick-start trial alone, then two at once as plain processes; the figures come from
    their timing files (kept with --work-dir)."""
    report = bench.main([*QUICK_PACKED, "--packing", "processes", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    packed = report["packed"]
    alone, one, two = (_timings(tmp_path / "packed" / name) for name in ("alone", "trial1", "trial2"))
    assert alone["images"] == one["images"] == two["images"] == 3 * 64  # 3 steps of batch 64
    assert packed["images"] == [192, 192] and packed["way"] == "processes" and packed["k"] == 2
    # the two waited for each other at their first step, then trained at the same time
    assert max(one["first_step"], two["first_step"]) <= min(one["released"], two["released"]) + 0.05
    assert abs(one["released"] - two["released"]) < 0.1
    span = max(one["train_end"], two["train_end"]) - min(one["released"], two["released"])
    assert packed["combined"] == pytest.approx(384 / span)
    assert packed["alone"] == pytest.approx(192 / (alone["train_end"] - alone["released"]))
    assert 0 <= alone["released"] - alone["first_step"] < 0.1  # alone: nobody to wait for
    assert packed["ratio"] == pytest.approx(packed["combined"] / packed["alone"]) and packed["ratio"] > 0
    assert all(0 < s < 120 for s in [packed["alone_first_step_s"], *packed["first_step_s"]])
    # distinct seeds: the two trials' configs differ in the seed alone
    seeds = [(tmp_path / "packed" / f"trial{s}" / "config.yaml").read_text() for s in (1, 2)]
    assert "seed: 1" in seeds[0] and "seed: 2" in seeds[1]
    assert f"ratio packed/alone    : {packed['ratio']:.2f}x" in out
    assert (
        "2 plain `python run.py` processes, 1 CPU thread(s) each" in out and "measured with         : processes" in out
    )
    assert "GPU busy while packed : n/a (no GPU)" in out


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="needs ray")
def test_packed_trials_on_ray(tmp_path, capsys):
    """The same as one Ray sweep (hydra/launcher=ray, each trial half of the CPUs)."""
    report = bench.main([*QUICK_PACKED, "--packing", "ray", "--work-dir", str(tmp_path)])
    trials = sorted((tmp_path / "packed" / "ray").glob("*/timing.json"))
    assert len(trials) == 2 and report["packed"]["way"] == "ray"
    assert report["packed"]["images"] == [192, 192] and report["packed"]["ratio"] > 0
    started = {_timings(t.parent)["started"] for t in trials}
    assert len(started) == 1  # one launch: the sweep's
    assert "one `python run.py -m` sweep on Ray, each trial 1/2 of the CPUs" in capsys.readouterr().out


def test_a_failing_trial_is_reported_with_its_log(tmp_path, capsys):
    """The other sections' figures are kept; the error (with the trial's log) is reported."""
    report = bench.main([*QUICK_PACKED, "--set", "datamodule.batch_size=0", "--work-dir", str(tmp_path)])
    assert "packed" not in report and len(report["errors"]) == 1
    assert re.match(r"(?s)packed trial failed: .*alone.log \(exit 1\).*batch_size must be >= 1", report["errors"][0])
    assert "    error: packed trial failed: " in capsys.readouterr().err
    from mchad.bench import gpu_check

    lines = gpu_check.bench_lines(gpu_check.figures(report, ["--only", "packed"]))
    assert lines[-1].startswith(
        f"benchmark section failed: packed trial failed: {tmp_path / 'packed' / 'alone.log'} (exit 1):"
    )


def test_processes_run_at_most_k_at_once(tmp_path):
    """Four sleepers, two at a time: the third starts only when one of the first two ended."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    launched = run_processes([(sleeper, tmp_path / f"{i}.log") for i in range(4)], concurrency=2)
    assert launched[1] - launched[0] < 0.3 and launched[2] - launched[0] >= 0.45
    assert launched == sorted(launched)


def test_trial_overrides_are_the_benchmarks_shortened():
    args = bench.parse_args(
        ["--data", "synthetic", "--backbone", "wrn40-2", "--packed-steps", "7", "--eval-size", "50"]
    )
    overrides = trial_overrides(args)
    assert overrides[: len(bench_overrides(args))] == bench_overrides(args)
    assert {
        "experiment=cifar10-mchad",
        "model/backbone=wrn40-2",
        "trainer.limit_train_batches=7",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "datamodule.test_cases.GaussianNoise.n=50",
    } <= set(overrides)
    assert not any(o.startswith("seed=") for o in overrides)  # each trial gets its own
    full = trial_overrides(args, short=False)
    assert not any(o.startswith(("trainer.limit_train_batches", "trainer.max_epochs")) for o in full)
    assert share(1, 8) == "0.125" and share(1, 3) == "0.3333" and share(16, 8) == "2"


# ----------------------------------------------------------------------------- (a) GPU utilisation
@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` first on PATH that logs its arguments and prints 10, 20, 30, ... (or
    fails when the file ``fail`` exists)."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/args\n'
        f'[ -e {tmp_path}/fail ] && {{ echo "NVML: driver not loaded" >&2; exit 9; }}\n'
        f"n=$(wc -l < {tmp_path}/args)\n"
        'echo "$((n * 10))"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_sampler_polls_nvidia_smi_in_the_background(fake_nvidia_smi):
    with UtilisationSampler(3, interval=0.05, reader="nvidia-smi") as sampler:
        time.sleep(0.6)
    calls = (fake_nvidia_smi / "args").read_text().splitlines()
    assert len(calls) >= 4 and len(sampler.samples) == len(calls)
    assert calls[0] == "--query-gpu=utilization.gpu --format=csv,noheader,nounits -i 3"
    values = [v for _, v in sampler.samples]
    assert values == [10.0 * (i + 1) for i in range(len(values))]
    times = [t for t, _ in sampler.samples]
    assert times == sorted(times) and times[-1] - times[0] >= 0.3
    assert sampler.median() == statistics.median(values)
    # only the samples inside the windows count
    window = [(times[1] - 1e-6, times[2] + 1e-6)]
    assert sampler.values(window) == values[1:3] and sampler.median(window) == statistics.median(values[1:3])
    assert sampler.describe(window) == f"median {statistics.median(values[1:3]):.0f} % (n=2, nvidia-smi every 0.05 s)"
    assert sampler.describe([(0, 1)]) == "n/a (no sample inside the timed steps)"


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_sampler_asks_for_the_visible_gpu(fake_nvidia_smi, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,GPU-1234")
    assert nvidia_smi_id(0) == "5" and nvidia_smi_id(1) == "GPU-1234" and nvidia_smi_id(2) == "2"
    with UtilisationSampler(1, interval=0.05, reader="nvidia-smi"):
        time.sleep(0.1)
    assert (fake_nvidia_smi / "args").read_text().splitlines()[0].endswith("-i GPU-1234")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_sampler_says_why_it_has_no_figure(fake_nvidia_smi, monkeypatch):
    (fake_nvidia_smi / "fail").write_text("")
    with UtilisationSampler(0, interval=0.05, reader="nvidia-smi") as failing:
        time.sleep(0.15)
    assert failing.samples == [] and failing.median() is None
    assert failing.describe() == "n/a (nvidia-smi failed: nvidia-smi exit 9: NVML: driver not loaded)"
    assert UtilisationSampler(None, reader="nvidia-smi").start().describe() == "n/a (no GPU)"
    monkeypatch.setenv("PATH", str(fake_nvidia_smi / "empty"))
    assert UtilisationSampler(0, reader="nvidia-smi").describe() == "n/a (no nvidia-smi)"


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_sampler_falls_back_to_nvidia_smi_when_nvml_fails(fake_nvidia_smi, monkeypatch):
    """NVML unusable (here: no pynvml, no CUDA): nvidia-smi instead, or why neither works."""
    with UtilisationSampler(0, interval=0.05, reader="nvml") as sampler:
        time.sleep(0.15)
    assert (
        sampler.reader == "nvidia-smi" and sampler.samples and sampler.describe().endswith("nvidia-smi every 0.05 s)")
    )
    monkeypatch.setenv("PATH", str(fake_nvidia_smi / "empty"))
    alone = UtilisationSampler(0, reader="nvml").start()
    assert alone.describe().startswith("n/a (nvml failed: ") and alone.describe().endswith("; no nvidia-smi)")


# ----------------------------------------------------------------------------- (a) host syncs
class WarningSteps(pl.LightningModule):
    """Steps 3 and 6 warn as torch's sync debug mode does; every step also warns otherwise."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        if batch_idx in (3, 6):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # SYNC LINE
        warnings.warn("an unrelated warning", stacklevel=1)
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:an unrelated warning")
def test_sync_counter_counts_per_step_with_the_source_line():
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 2)), batch_size=1)
    modes = []
    counter = sync_counter(first=2, steps=6, set_mode=modes.append)
    trainer = pl.Trainer(
        accelerator="cpu",
        limit_train_batches=2 + 6 + 1,
        max_epochs=1,
        log_every_n_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
    )
    trainer.fit(WarningSteps(), train_dataloaders=data)
    assert counter.per_step == [0, 1, 0, 0, 1, 0]  # batches 2..7: the warnings of batches 3 and 6
    assert counter.logging_steps == [1, 5]  # batches 3 and 7: (global step + 1) % 4 == 0
    line = next(i for i, text in enumerate(open(__file__), 1) if "# SYNC LINE" in text and "warn(" in text)
    assert dict(counter.locations) == {f"tests/test_bench.py:{line}": 2}
    assert modes == ["warn", 0]  # on for the counted steps, off again after them


def test_host_syncs_runs_the_benchmarks_training(tmp_path):
    """The benchmark's own model and trainer through the counter (on a GPU: torch's sync debug
    mode; here nothing warns, so every step counts 0)."""
    args = bench.parse_args(
        ["--data", "synthetic", "--synthetic-size", "2000", "--device", "cpu", "--batch-size", "16"]
    )
    modes = []
    counter = host_syncs(compose(args, tmp_path), warmup=2, steps=12, set_mode=modes.append)
    assert counter.per_step == [0] * 12 and modes == ["warn", 0]
    assert counter.logging_steps == [7]  # batch 9: trainer.log_every_n_steps=10


# ----------------------------------------------------------------------------- (d) CUDA's start
def test_first_use_is_timed_in_a_fresh_process():
    seconds = first_use_seconds("cpu")  # on a GPU: "cuda"; here the script's CPU path
    assert list(seconds) == ["import torch", "torch.cuda.init()", "first matmul", "first conv"]
    assert seconds["import torch"] > 0.1 and all(v >= 0 for v in seconds.values())
