"""Completing a sweep (hydra.sweep.dir=<old sweep>) and the Optuna search on validation data.

The end-to-end sweeps use the basic launcher (trials one after another in the driver) and
quick-start trials of one epoch on 2 batches; the Ray launcher goes through the same sweeper
(tests/test_sweep.py runs Ray sweeps).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import ROOT, compose_config
from forked_runs import run_py
from omegaconf import OmegaConf
from test_sweep import _env, check_sweep_console

from mchad.errors import ConfigError
from mchad.runs.objective import OBJECTIVE_FILE, read_objective, trial_objective
from mchad.sweeps.sweep_resume import LaunchPending, Trial, config_differences, counts_note, record

RUN_PY = ROOT / "run.py"
QUICK = [
    "trainer.max_epochs=1",
    "trainer.min_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "~logger",
    "~callbacks",
]


def _multirun(args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    return run_py(["-m", "hydra/launcher=basic", *args], cwd=cwd, env=_env(), timeout=timeout)


# ----------------------------------------------------------------------------- completing a sweep


def test_a_completed_sweep_reruns_only_the_missing_trial_and_refuses_a_changed_config(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["seed=1,2,3", *QUICK, f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={tmp_path}/logs"]
    first = _multirun(command, tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "3 trial(s) finished, 0 failed; 0 done before, 3 run now" in first.stdout
    # issue 32: every trial's full results table (and Hydra's job list) were on the console; now a
    # 3-trial sweep prints 3 trial lines and the report, the tables are in each trial's run.log
    output = first.stdout + first.stderr
    check_sweep_console(output, sweep_dir, {n: f"seed={n + 1}" for n in range(3)})
    assert len(output.strip().splitlines()) == 4
    assert "experiment id_dataset" in (sweep_dir / "0" / "run.log").read_text()
    results = {num: sweep_dir / str(num) / "results.csv" for num in range(3)}
    before = {num: path.stat().st_mtime_ns for num, path in results.items()}

    # the second trial is lost (e.g. killed): only it runs again, in its own folder
    shutil.rmtree(sweep_dir / "1")
    again = _multirun(command, tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "3 trial(s) finished, 0 failed; 2 done before, 1 run now" in again.stdout
    assert f"#0 done ({results[0]})" in output and f"#2 done ({results[2]})" in output
    # one trial ran: its line (Hydra's "Launching 1 jobs locally" is off the console, issue 32)
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("trial #")] == ["trial #1 seed=2"]
    assert results[1].is_file() and ",2," in results[1].read_text().splitlines()[1]
    assert results[0].stat().st_mtime_ns == before[0] and results[2].stat().st_mtime_ns == before[2]
    assert OmegaConf.load(sweep_dir / "1" / ".hydra" / "overrides.yaml")[0] == "seed=2"

    # the same folder with another value: refused in one line, nothing runs
    changed = _multirun(["seed=1,2,4", *command[1:]], tmp_path)
    assert changed.returncode == 1
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sweep "), changed.stderr[-2000:]
    assert f"{sweep_dir / '2'} differs in seed (3 -> 4)" in lines[0]
    assert str(sweep_dir / "0") not in lines[0]  # trials 0 and 1 are what the command asks for
    assert [p.stat().st_mtime_ns for p in results.values()][::2] == [before[0], before[2]]


def test_config_differences_name_changed_added_and_removed_keys():
    saved = {"seed": 3, "model": {"margin": 4.0, "radius": 0.0}, "trainer": {"max_epochs": 1}}
    wanted = {"seed": 3, "model": {"margin": 5.0}, "trainer": {"max_epochs": 1, "precision": "bf16-mixed"}}
    assert config_differences(saved, wanted) == [
        "model.margin (4.0 -> 5.0)",
        "model.radius (0.0 -> <absent>)",
        "trainer.precision (<absent> -> bf16-mixed)",
    ]
    assert config_differences(saved, saved) == []


class _RecordingLauncher:
    def __init__(self):
        self.calls = []

    def launch(self, job_overrides, initial_job_idx):
        from hydra.core.utils import JobReturn, JobStatus

        self.calls.append(([list(o) for o in job_overrides], initial_job_idx))
        return [JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0.5) for o in job_overrides]


def test_pending_trials_keep_their_folders_when_job_numbers_move(tmp_path):
    """Trials 1 and 3 done: 0 and 2 are launched together as jobs 0 and 1, so trial 2 is sent
    to its own folder with a hydra.sweep.subdir override; done trials return their objective."""
    launcher = _RecordingLauncher()
    sweeper = OmegaConf.create({"config": {"hydra": {"sweep": {"dir": str(tmp_path)}}}})
    pending = LaunchPending(launcher, sweeper)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / OBJECTIVE_FILE).write_text("value: 0.75\n")
    pending.trials = [Trial(n, [f"seed={n}"], tmp_path / str(n), done=n in (1, 3)) for n in range(4)]
    returns = pending.launch([[f"seed={n}"] for n in range(4)], initial_job_idx=0)
    assert launcher.calls == [([["seed=0"], ["seed=2", "hydra.sweep.subdir=2"]], 0)]
    assert [r.overrides for r in returns] == [["seed=0"], ["seed=1"], ["seed=2", "hydra.sweep.subdir=2"], ["seed=3"]]
    assert [r.return_value for r in returns] == [0.5, 0.75, 0.5, None]


def test_counts_note_is_per_sweep_folder(tmp_path):
    assert counts_note(tmp_path / "never") == ""
    record(tmp_path, done=2, run_now=1)
    assert counts_note(tmp_path) == "; 2 done before, 1 run now"


# ----------------------------------------------------------------------------- the objective


class _TestSetTouched(Exception):
    pass


def test_the_objective_is_computed_from_validation_data_before_any_test_set(tmp_path, monkeypatch):
    """Every path to a test set raises: the objective is written all the same, before testing,
    and equals the validation metrics that training logged (val/acc, val/unknown/distance/AUROC)."""
    from mchad.data.datamodule import OODDataModule
    from mchad.models.module import OODModel
    from mchad.runs.train import run

    def touched(*args, **kwargs):
        raise _TestSetTouched("a test set was used")

    monkeypatch.setattr(OODDataModule, "test_dataloader", touched)
    monkeypatch.setattr(OODModel, "test_step", touched)
    cfg = compose_config(
        [
            "trainer.max_epochs=2",
            "trainer.min_epochs=2",
            "trainer.enable_progress_bar=false",
            "~logger.tensorboard",
            "~callbacks.embedding_animation",
            "~callbacks.test_plots",
            "~callbacks.hparams",
            "callbacks.validation_views.projector=false",
            "callbacks.validation_views.histogram_image=false",
        ],
        output_dir=tmp_path,
    )
    with pytest.raises(_TestSetTouched):
        run(cfg)
    objective = OmegaConf.load(tmp_path / OBJECTIVE_FILE)
    assert objective.metric == "mean" and objective.direction == "maximize" and objective.unknowns == "noise"
    assert objective.value == pytest.approx((objective.val_acc + objective.val_auroc) / 2)
    logged = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    last = logged.dropna(subset=["val/unknown/distance/AUROC"]).iloc[-1]
    assert objective.val_auroc == pytest.approx(last["val/unknown/distance/AUROC"], abs=1e-6)
    assert objective.val_acc == pytest.approx(last["val/acc"], abs=1e-6)
    assert not (tmp_path / "results.csv").exists()


def test_trial_objective_is_none_for_a_failed_trial(tmp_path):
    (tmp_path / OBJECTIVE_FILE).write_text("value: 0.8\n")
    assert trial_objective({"status": "ok", "dir": str(tmp_path)}) == 0.8
    assert trial_objective({"status": "failed", "dir": str(tmp_path)}) is None
    (tmp_path / OBJECTIVE_FILE).write_text("value: .nan\n")
    assert read_objective(tmp_path) is None


def test_an_unknown_objective_is_refused_before_training(tmp_path):
    from mchad.runs.train import run

    with pytest.raises(ConfigError, match="objective.metric must be one of val_acc, val_auroc, mean"):
        run(compose_config(["objective.metric=test_auroc", *QUICK], output_dir=tmp_path))


# ----------------------------------------------------------------------------- Optuna


def test_optuna_search_space_in_config_and_weight_oe_only_with_outliers():
    from conftest import compose_config as compose
    from hydra.core.hydra_config import HydraConfig

    from mchad.sweeps.search import search_params

    cfg = compose(["hydra/sweeper=optuna", "hydra.sweeper.n_trials=40"])
    sweeper = HydraConfig.get().sweeper
    raw = OmegaConf.to_container(sweeper, resolve=False)  # interpolations into the whole config
    assert raw["_target_"] == "hydra_plugins.mchad_sweepers.sweepers.OptunaSearch"
    assert raw["n_trials"] == 40 and raw["direction"] == "${objective.direction}"
    assert raw["storage"] == "sqlite:///${hydra.sweep.dir}/optuna.db" and raw["study_name"] == "${name}"
    ablation = {"model.weight_center", "model.weight_ce", "model.margin", "model.radius", "model.optimizer.lr"}
    assert set(search_params(sweeper.params, sweeper.outlier_params, cfg)) == ablation

    cfg = compose(["hydra/sweeper=optuna", "model=gmchad", "datamodule/outliers=photos"])
    sweeper = HydraConfig.get().sweeper
    assert set(search_params(sweeper.params, sweeper.outlier_params, cfg)) == ablation | {"model.weight_oe"}


@pytest.mark.slow  # about a minute of training; the search space and the objective are tested above
def test_optuna_search_on_the_quick_start_optimises_the_validation_objective(tmp_path):
    """4 trials, 2 at a time: the study (SQLite) and the best parameters are in the sweep
    folder; the value told to Optuna for each trial is its validation objective, not a test metric."""
    import optuna

    sweep_dir = tmp_path / "search"
    result = _multirun(
        [
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.n_jobs=2",
            *QUICK,
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={tmp_path}/logs",
        ],
        tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (sweep_dir / "optuna.db").is_file()
    # the console (issue 32): a line per trial with its drawn values, no Optuna colour codes
    assert "\x1b[" not in output and "[I " not in output
    assert sorted(line.split(":")[0].split()[1] for line in output.splitlines() if line.startswith("trial #")) == [
        "#0",
        "#1",
        "#2",
        "#3",
    ]
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(best.best_params) == {
        "model.weight_center",
        "model.weight_ce",
        "model.margin",
        "model.radius",
        "model.optimizer.lr",
    }
    assert best.study.complete == 4 and best.objective.metric == "mean"

    study = optuna.load_study(study_name="digits-mchad", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert len(study.trials) == 4
    for trial in study.trials:
        folder = sweep_dir / str(trial.number)
        validation = OmegaConf.load(folder / OBJECTIVE_FILE)
        assert trial.value == validation.value == pytest.approx((validation.val_acc + validation.val_auroc) / 2)
        saved = OmegaConf.load(folder / "config.yaml")
        assert saved.model.margin == pytest.approx(trial.params["model.margin"])
        tested = pd.read_csv(folder / "results.csv")
        test_values = set(tested["AUROC"]) | set(tested["Accuracy"]) | set((tested["Accuracy"] + tested["AUROC"]) / 2)
        assert trial.value not in test_values
    assert best.best_value == max(t.value for t in study.trials) == best.validation.value
    assert best.best_trial_dir == str(sweep_dir / str(study.best_trial.number))

    # continued in the same folder: 2 more trials, in new folders, with new parameters
    more = _multirun(
        [
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *QUICK,
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={tmp_path}/logs",
        ],
        tmp_path,
    )
    assert more.returncode == 0, (more.stdout + more.stderr)[-3000:]
    assert "6 trial(s) finished, 0 failed; 4 done before, 2 run now" in more.stdout
    study = optuna.load_study(study_name="digits-mchad", storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.number for t in study.trials] == list(range(6))
    for trial in study.trials[4:]:
        assert trial.value == OmegaConf.load(sweep_dir / str(trial.number) / OBJECTIVE_FILE).value
        assert all(trial.params != earlier.params for earlier in study.trials[:4])
    assert OmegaConf.load(sweep_dir / "optimization_results.yaml").study.trials == 6


# ----------------------------------------------------------------------------- continuing trials


class _Loader:
    """Hydra's config loader for a sweep over seeds (``seed=<n>``), 4 epochs."""

    def load_sweep_config(self, master, overrides):
        (seed,) = [int(o.split("=")[1]) for o in overrides]
        config = OmegaConf.merge(master, {"seed": seed, "trainer": {"max_epochs": 4}})
        return config


def _trial_folder(folder: Path, seed: int, checkpoint: bytes | None = None, results: bool = False) -> None:
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "trainer": {"max_epochs": 4}}), folder / ".hydra" / "config.yaml")
    if checkpoint is not None:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(checkpoint)
    if results:
        (folder / "results.csv").write_text("experiment\nx\n")


def test_unfinished_trials_continue_from_a_readable_checkpoint_else_start_over_and_say_why(tmp_path, caplog):
    """#0 finished: skipped; #1 (checkpoint after epoch 2, same config): continued from it, with a
    hydra override only; #2 (checkpoint truncated by hand) and #3 (config changed since): one line
    each and started over, the old checkpoints moved aside; #4 (nothing yet): run."""
    import io

    import torch

    from mchad.sweeps.sweep import CONTINUE_ENV
    from mchad.sweeps.sweep_resume import continued_lines

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 1, "global_step": 6}, buffer)
    good = buffer.getvalue()
    _trial_folder(tmp_path / "0", 0, good, results=True)
    _trial_folder(tmp_path / "1", 1, good)
    _trial_folder(tmp_path / "2", 2, good[: len(good) // 2])
    _trial_folder(tmp_path / "3", 30, good)  # was run with seed=30
    master = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"}, "job": {"num": 0}}}
    )
    jobs = [[f"seed={n}"] for n in range(5)]
    sweeper = SimpleNamespace(config=master, overrides=[jobs], hydra_context=SimpleNamespace(config_loader=_Loader()))
    launcher = _RecordingLauncher()
    with caplog.at_level("INFO"):
        LaunchPending(launcher, sweeper).launch(jobs, initial_job_idx=0)
    ckpt = tmp_path / "1" / "checkpoints" / "last.ckpt"
    assert launcher.calls == [
        ([["seed=1", f"++hydra.job.env_set.{CONTINUE_ENV}={ckpt}"], ["seed=2"], ["seed=3"], ["seed=4"]], 1)
    ]
    lines = continued_lines(tmp_path)
    assert lines[0] == f"#1 resumed from epoch 2 (2 of 4 epochs done, {ckpt})"
    assert lines[1].startswith(
        f"#2 starts over: checkpoint {tmp_path / '2' / 'checkpoints' / 'last.ckpt'} is unreadable"
    )
    assert lines[2] == "#3 starts over: its config changed since its checkpoint (differs in seed (30 -> 3))"
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    messages = [r.getMessage() for r in caplog.records]
    assert all(line in messages for line in lines)
    for num in (2, 3):  # started over: nothing of the old attempt is mixed with the new one
        assert not (tmp_path / str(num) / "checkpoints").exists()
        assert (tmp_path / str(num) / "checkpoints.discarded" / "last.ckpt").is_file()
    assert ckpt.is_file()


def test_the_report_lists_preempted_trials_apart_and_exits_143(tmp_path, capsys):
    from mchad.sweeps.sweep import SweepReport

    for num, cause in ((0, None), (1, "preempted by SIGTERM; continue it"), (2, "ValueError: boom")):
        (tmp_path / str(num) / ".hydra").mkdir(parents=True)
        if cause is None:
            (tmp_path / str(num) / "results.csv").write_text("x\n")
        else:
            (tmp_path / str(num) / "FAILED.txt").write_text(f"error: {cause}\n")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as info:
        SweepReport().on_multirun_end(config)
    assert info.value.code == 1  # a failure outranks a preemption
    err = capsys.readouterr().err
    assert "1 trial(s) finished, 1 failed, 1 preempted" in err
    assert f"PREEMPTED {tmp_path / '1'}: preempted by SIGTERM" in err and f"FAILED {tmp_path / '2'}: ValueError" in err
    (tmp_path / "2" / "results.csv").write_text("x\n")
    with pytest.raises(SystemExit) as info:
        SweepReport().on_multirun_end(config)
    assert info.value.code == 143


# 4 short deterministic epochs with last.ckpt every epoch; the signal callback is in every
# trial's config (it acts only when MCHAD_TEST_SIGNAL says so, so the re-run's config is the same)
CONTINUABLE = [
    "trainer.max_epochs=4",
    "trainer.min_epochs=4",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.deterministic=true",
    "~logger.tensorboard",
    "~callbacks.validation_views",
    "~callbacks.embedding_animation",
    "~callbacks.test_plots",
    "~callbacks.hparams",
    "+callbacks.signal._target_=sigkill_callback.SignalAt",
    "allowed_targets=[sigkill_callback.*]",
    "+callbacks.signal.seed=${seed}",
]


def _multirun_env(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    import os

    tests = str(Path(__file__).resolve().parent)
    return subprocess.run(
        [sys.executable, str(RUN_PY), "-m", "hydra/launcher=basic", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]), **env),
        timeout=600,
    )


@pytest.mark.slow  # three processes, eight trial-runs of 4 short epochs (about 2 minutes on 2 cores)
def test_a_sweep_killed_mid_trial_continues_that_trial_exactly(tmp_path):
    """SIGKILL in epoch 2 of 4 of the second trial; the same command again: the first trial is
    skipped, the second continues from its checkpoint after epoch 1, the third runs; the second's
    results.csv and scores.npz equal those of an uninterrupted run of its seed."""
    import numpy as np

    sweep_dir = tmp_path / "sweep"
    command = ["seed=1,2,3", *CONTINUABLE, f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={tmp_path}/logs"]
    killed = _multirun_env(command, tmp_path, MCHAD_TEST_SIGNAL="SIGKILL:seed=2:epoch=1:batch=1")
    assert killed.returncode == -9, (killed.stdout + killed.stderr)[-3000:]
    first = sweep_dir / "0" / "results.csv"
    assert first.is_file() and not (sweep_dir / "1" / "results.csv").exists() and not (sweep_dir / "2").exists()
    before = first.stat().st_mtime_ns

    again = _multirun_env(command, tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    ckpt = sweep_dir / "1" / "checkpoints" / "last.ckpt"
    assert f"#0 done ({first})" in output
    assert f"#1 resumed from epoch 1 (1 of 4 epochs done, {ckpt})" in output
    assert "3 trial(s) finished, 0 failed; 1 done before, 2 run now" in again.stdout
    # the trials' own logs say it (issue 32: a trial's log stays in its run.log, the console has the line above);
    # the third trial starts from scratch
    trial_logs = [(sweep_dir / n / "run.log").read_text() for n in ("1", "2")]
    assert [log.count("continuing the trial from") for log in trial_logs] == [1, 0]
    assert first.stat().st_mtime_ns == before
    assert (sweep_dir / "2" / "results.csv").is_file()
    assert not list(sweep_dir.glob("*/FAILED.txt"))

    reference = _multirun_env(
        ["seed=2", *command[1:-2], f"hydra.sweep.dir={tmp_path / 'reference'}", f"paths.log_dir={tmp_path}/logs"],
        tmp_path,
    )
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    pd.testing.assert_frame_equal(
        pd.read_csv(sweep_dir / "1" / "results.csv"),
        pd.read_csv(tmp_path / "reference" / "0" / "results.csv"),
        check_exact=True,
    )
    with np.load(sweep_dir / "1" / "scores.npz") as a, np.load(tmp_path / "reference" / "0" / "scores.npz") as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 3
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
