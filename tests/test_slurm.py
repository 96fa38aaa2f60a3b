"""Sweeps, preemption and DDP on a real SLURM: the one-node SLURM of ``bash/slurm-local.sh``.

A session fixture starts munged, slurmctld and slurmd (as root, from Debian's slurm-wlm and munge)
in a folder of its own, on ports of its own, and stops them after the tests. Where that cannot
happen (not root, slurm-wlm or munge not installed, hydra-submitit-launcher missing) every test
here is skipped with that reason; a script that fails to start the daemons fails the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from rank_failure_probe import gone
from test_ddp import METRICS, _quick
from test_sweep import CHECKPOINTS_ONLY, TINY, check_sweep_console

from mchad.results.aggregate import main as aggregate_main

SCRIPT = ROOT / "bash" / "slurm-local.sh"
RUN_PY = ROOT / "run.py"
TESTS = Path(__file__).resolve().parent


def cannot_start() -> str | None:
    """Why the local SLURM cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "the local SLURM's daemons need root (bash/slurm-local.sh runs munged, slurmctld and slurmd as root)"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    needed = ("slurmctld", "slurmd", "munged", "mungekey", "sinfo", "srun")
    missing = [name for name in needed if shutil.which(name, path=path) is None]
    if missing:
        return f"slurm-wlm and munge are not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed"
    return None


def _free_port_pair() -> int:
    """A port p with p + 1 free too (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65000:
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two free ports next to each other")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment in which sbatch, srun, squeue and ``hydra/launcher=slurm`` reach the local SLURM."""
    reason = cannot_start()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "MCHAD_SLURM_DIR": str(folder), "MCHAD_SLURM_PORT": str(_free_port_pair())}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, f"bash/slurm-local.sh start failed:\n{started.stdout}{started.stderr}"
    (line,) = started.stdout.strip().splitlines()
    assert line == f"export SLURM_CONF={folder / 'slurm.conf'}", line
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    stopped = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not folder.exists()


def _sweep_env(slurm: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in slurm.items() if k not in ("MCHAD_ROOT", "MCHAD_RUN_ID", "MCHAD_CWD")}
    env.update(PYTHONWARNINGS="ignore::DeprecationWarning", **extra)
    return env


def _sweep(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUN_PY), "-m", "hydra/launcher=slurm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_local_slurm_runs_jobs_and_a_second_start_leaves_it_running(slurm):
    again = subprocess.run(["bash", str(SCRIPT), "start"], env=slurm, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    assert (
        subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=slurm, capture_output=True, text=True).stdout == "idle\n"
    )
    ran = subprocess.run(["srun", "--ntasks=1", "echo", "ok"], env=slurm, capture_output=True, text=True, timeout=60)
    assert ran.stdout == "ok\n", ran.stderr


def test_a_two_seed_sweep_on_slurm_gives_two_results_one_line_each_and_the_table(slurm, tmp_path):
    result = _sweep(["seed=1,2", "paths.log_dir=logs", *TINY], tmp_path, _sweep_env(slurm))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.csv")) == ["0", "1"]
    check_sweep_console(output, sweep_dir, {0: "seed=1", 1: "seed=2"})
    assert len(output.strip().splitlines()) == 3, output  # no submitit or sacct notices
    # each trial ran as a SLURM job of its own (a job array: <array id>_<trial>)
    assert sorted(
        p.name.split("_")[1] for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and "_" in p.name
    ) == ["0", "1"]
    assert aggregate_main([str(sweep_dir), "--out", str(tmp_path / "agg")]) == 0
    (row,) = pd.read_csv(tmp_path / "agg" / "table.csv").to_dict("records")
    assert row["Seeds"] == 2 and row["Dataset"] == "Digits"


def test_a_trial_that_raises_on_slurm_is_listed_failed_and_the_sweep_exits_1(slurm, tmp_path):
    result = _sweep(["model.weight_center=-1", "paths.log_dir=logs", *TINY], tmp_path, _sweep_env(slurm))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    cause = "model.method: weight_center must be >= 0, got -1"
    assert (sweep_dir / "0" / "FAILED.txt").read_text().startswith(f"error: {cause}")
    assert not (sweep_dir / "0" / "results.csv").exists()
    check_sweep_console(output, sweep_dir, {}, {0: "(no swept values)"})
    assert f"FAILED {sweep_dir / '0'}: {cause}" in result.stderr


@pytest.mark.slow
def test_a_re_run_slurm_sweep_submits_only_the_missing_trial(slurm, tmp_path):
    """A 2-trial sweep, then trial 1's results.csv lost: the same command with its folder submits
    one job (trial 1, into its own folder) and leaves trial 0 alone."""
    sweep_dir = tmp_path / "sweep"
    command = ["seed=1,2", "paths.log_dir=logs", f"hydra.sweep.dir={sweep_dir}", *TINY]
    first = _sweep(command, tmp_path, _sweep_env(slurm))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    done = (sweep_dir / "0" / "results.csv").stat().st_mtime_ns
    (sweep_dir / "1" / "results.csv").unlink()
    jobs_before = {p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()}
    again = _sweep(command, tmp_path, _sweep_env(slurm))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "2 trial(s) finished, 0 failed; 1 done before, 1 run now" in again.stdout
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("trial #")] == ["trial #1 seed=2"]
    assert (sweep_dir / "1" / "results.csv").is_file()
    assert (sweep_dir / "0" / "results.csv").stat().st_mtime_ns == done
    (new,) = {p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()} - jobs_before
    assert "_" not in new  # one job, not an array


@pytest.mark.slow
def test_a_slurm_job_killed_without_a_result_is_listed_failed_with_its_state(slurm, tmp_path):
    """The seed-2 trial SIGKILLs its own process when training starts (as the out-of-memory
    killer would; tests/sigkill_callback.py): its job ends without a result; the sweep does not
    wait for ever, lists it failed with SLURM's state and exits 1; the other trial finishes."""
    env = _sweep_env(slurm, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    killer = [
        "+callbacks.kill._target_=sigkill_callback.KillOnSeed",
        "allowed_targets=[sigkill_callback.*]",
        "+callbacks.kill.seed=${seed}",
        "+callbacks.kill.kill_seed=2",
    ]
    sweep_dir = tmp_path / "sweep"
    result = _sweep(["seed=1,2", "paths.log_dir=logs", f"hydra.sweep.dir={sweep_dir}", *TINY, *killer], tmp_path, env)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert (sweep_dir / "0" / "results.csv").is_file()
    cause = (sweep_dir / "1" / "FAILED.txt").read_text().splitlines()[0]
    assert cause.startswith("error: the trial's worker process died or was lost (JobLost: job "), cause
    assert " ended FAILED without a result (log " in cause, cause
    assert f"FAILED {sweep_dir / '1'}: the trial's worker process died" in result.stderr
    assert "1 trial(s) finished, 1 failed" in result.stderr


@pytest.mark.slow
def test_hydra_launcher_local_runs_trials_as_processes_with_the_same_report(tmp_path):
    """hydra/launcher=local (submitit's local executor, no SLURM): one line per trial, the failed
    one listed with its cause, exit 1."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    result = subprocess.run(
        [sys.executable, str(RUN_PY), "-m", "hydra/launcher=local", "model.weight_center=0.5,-1", "paths.log_dir=logs"]
        + TINY,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("MCHAD_ROOT", "MCHAD_RUN_ID", "SLURM_CONF")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    check_sweep_console(output, sweep_dir, {0: "model.weight_center=0.5"}, {1: "model.weight_center=-1"})


def test_a_refused_target_stops_a_slurm_sweep_before_any_job(slurm, tmp_path):
    """A swept target: the sweeper's check of the common config does not see it; the launcher
    checks every trial's config before it submits anything."""
    result = _sweep(
        [
            "+callbacks.x._target_=mchad.callbacks.nothing,builtins.exec",
            "+callbacks.x._args_=[1]",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
        _sweep_env(slurm),
    )
    assert result.returncode == 1 and "is not an allowed target" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob(".submitit"))
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%Z"], env=slurm, capture_output=True, text=True)
    assert str(tmp_path) not in queue.stdout  # no job of this sweep (run from tmp_path) in SLURM's list


# ----------------------------------------------------------------------------- preemption


#: quick-start trials of 4 epochs with the callbacks that checkpoint and resume, deterministic
PREEMPTIBLE = [
    "trainer.max_epochs=4",
    "trainer.min_epochs=4",
    "trainer.deterministic=true",
    *CHECKPOINTS_ONLY,
    "+callbacks.pause._target_=slurm_probe.PauseAt",
    "allowed_targets=[slurm_probe.*]",
    "+callbacks.pause.trial=${hydra:job.num}",
    "+callbacks.pause.epoch=2",
]


def _paused_sweep(slurm: dict[str, str], tmp_path: Path, seeds: str) -> subprocess.Popen:
    """A SLURM sweep over ``seed=<seeds>`` whose trial 0 waits at epoch 3 once ``<tmp_path>/paused``
    exists (tests/slurm_probe.py's PauseAt), its console on the Popen's stdout."""
    env = _sweep_env(
        slurm,
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        MCHAD_TEST_PAUSE=str(tmp_path / "paused"),
        MCHAD_TEST_PAUSE_TRIAL="0",
    )
    command = [sys.executable, str(RUN_PY), "-m", "hydra/launcher=slurm", f"seed={seeds}"]
    return subprocess.Popen(
        [*command, f"hydra.sweep.dir={tmp_path / 'sweep'}", "paths.log_dir=logs", *PREEMPTIBLE],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_scancel_signal_term_requeues_the_trial_and_it_ends_as_if_never_stopped(slurm, tmp_path):
    """Two identical trials (seed=1,1); trial 0's job gets `scancel --signal=TERM` in epoch 3 of 4
    (tests/slurm_probe.py holds it at batch 1 until the signal arrives). The trial stops, its job
    requeues itself, SLURM starts it again (after its requeue hold, cred_expire: 30 s on the local
    SLURM) and it continues from the checkpoint after epoch 2; the
    report says so, the sweep exits 0 and, with trainer.deterministic=true, its results.csv equals
    trial 1's, never interrupted (config_hash differs: the pause's trial number)."""
    stamp, sweep_dir = tmp_path / "paused", tmp_path / "sweep"
    with _paused_sweep(slurm, tmp_path, "1,1") as driver:
        try:
            _wait_for(stamp.exists, 240, "trial 0 to reach epoch 3")
            (job,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith("_0")]
            subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True)

            # SLURM holds the requeued job until its old credential expired (cred_expire, 30 s on the
            # local SLURM); releasing it earlier (scontrol update StartTime=now) fails its start
            output, _ = driver.communicate(timeout=300)
        finally:
            driver.kill()
    logs = "".join(p.read_text(errors="replace")[-1500:] for p in sorted(sweep_dir.glob(f".submitit/{job}/*.err")))
    assert driver.returncode == 0, f"{output[-3000:]}\n--- job {job}'s log:\n{logs}"
    checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    assert f"  #0 preempted by SIGTERM: SLURM job {job} requeued\n" in output, output[-3000:]
    assert f"  #0 resumed from epoch 2 (2 of 4 epochs done, {checkpoint})\n" in output, output[-3000:]
    assert "2 trial(s) finished, 0 failed" in output
    assert not (sweep_dir / "0" / "FAILED.txt").exists()
    resumed, whole = (pd.read_csv(sweep_dir / str(n) / "results.csv").drop(columns="config_hash") for n in (0, 1))
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)


# ----------------------------------------------------------------------------- DDP under srun


def _srun(overrides: list[str], slurm: dict[str, str], cwd: Path, *, tasks: int = 2) -> subprocess.CompletedProcess:
    """``srun --ntasks=N --ntasks-per-node=N python run.py ...``: N tasks on the one node (Lightning's
    SLURM environment refuses --ntasks without --ntasks-per-node)."""
    env = {**_sweep_env(slurm), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    command = ["srun", f"--ntasks={tasks}", f"--ntasks-per-node={tasks}", sys.executable, str(RUN_PY), *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_ddp_under_srun_writes_one_result_of_every_sample_equal_to_one_process(slurm, tmp_path):
    """Two srun tasks, gloo on the CPU, Lightning's SLURM environment: one results.csv (in
    logs/runs/ddp/slurm-<job>.<step>), every training sample once per epoch over the two ranks, and
    the metrics of one process testing the same checkpoint."""
    logs, probe = tmp_path / "logs", tmp_path / "probe"
    result = _srun(_quick(logs, probe, "trainer.devices=2", "+datamodule.full_train_set=true"), slurm, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = logs.glob("runs/**/results.csv")
    assert results.parent.parent.name == "ddp" and results.parent.name.startswith("slurm-"), results
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    everything = ranks[0]["all_rows"]
    for epoch in ("0", "1"):
        together = sorted(ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch])
        assert together == sorted(everything)
    single = subprocess.run(
        [sys.executable, str(RUN_PY), *_quick(logs / "single", None, "+datamodule.full_train_set=true", "train=false")]
        + [f"ckpt_path={results.parent}"],
        cwd=tmp_path,
        env=_sweep_env(slurm),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    (one,) = (logs / "single").glob("runs/*/*/results.csv")
    keys = ["test_case", "score"]
    ddp, one = (pd.read_csv(p).sort_values(keys).reset_index(drop=True) for p in (results, one))
    assert ddp[keys].equals(one[keys]) and len(ddp) == 6
    np.testing.assert_allclose(ddp[METRICS].to_numpy(), one[METRICS].to_numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_a_failing_rank_under_srun_ends_the_job_with_its_cause(slurm, tmp_path):
    """Rank 1 raises at step 5 of a 2-task srun: both tasks end, srun exits non-zero, the one
    error line and FAILED.txt name rank 1's exception (mchad.runs.rank_watch)."""
    logs, probe = tmp_path / "logs", tmp_path / "probe"
    overrides = _quick(logs, probe, "trainer.devices=2", "+callbacks.probe.fail_rank=1", "+callbacks.probe.fail_step=5")
    result = _srun(overrides, slurm, tmp_path)
    ended = time.time()
    assert all(gone(int((probe / f"pid{rank}").read_text())) for rank in (0, 1))
    assert result.returncode != 0, result.stderr[-3000:]
    print(f"rank 1 failed -> srun ended: {ended - float((probe / 'failed1.time').read_text()):.2f} s")
    cause = "rank 1 failed: ValueError: probe failure on rank 1 at step 5"
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [f"error: {cause}"]
    (failed,) = logs.glob("runs/**/FAILED.txt")
    assert failed.read_text().splitlines()[0] == f"error: {cause}"


@pytest.mark.slow
def test_a_plain_scancel_is_not_undone_the_trial_stays_preempted(slurm, tmp_path):
    """`scancel <job>` (no --signal) ends the job: the trial stops (SIGTERM), is not requeued,
    and the sweep reports it preempted (exit 143); the same command would continue it."""
    stamp, sweep_dir = tmp_path / "paused", tmp_path / "sweep"
    with _paused_sweep(slurm, tmp_path, "1") as driver:
        try:
            _wait_for(stamp.exists, 240, "the trial to reach epoch 3")
            (job,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
            subprocess.run(["scancel", job], env=slurm, check=True)
            output, _ = driver.communicate(timeout=120)
        finally:
            driver.kill()
    assert driver.returncode == 143, output[-3000:]
    assert f"  #0 stopped by SIGTERM while SLURM job {job} was COMPLETING: not requeued\n" in output, output
    assert f"  PREEMPTED {sweep_dir / '0'}: preempted by SIGTERM" in output, output
    assert (sweep_dir / "0" / "checkpoints" / "last.ckpt").is_file()
