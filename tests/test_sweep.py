"""Sweeps (``python run.py -m``) through the Ray launcher: folders, failures, the report.

The Ray tests start their own Ray on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
keeps Ray on the loopback address) and stop it: a sweep's local Ray ends with its driver
process; the existing-cluster test stops the head it started (SIGTERM to its
``ray start --block``, then any process left that names its private temp dir).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, RUN_PLACE_VARIABLES, compose_config, imported_modules
from forked_runs import run_py
from omegaconf import OmegaConf

from mchad.results.aggregate import main as aggregate_main
from mchad.results.read_results import find_results
from mchad.sweeps.sweep import FAILED_FILE, SweepReport, collect_trials, run_trial, sweep_status

RUN_PY = ROOT / "run.py"
TESTS = Path(__file__).resolve().parent
# quick-start trials of ~2 s of training
TINY = ["trainer.max_epochs=2", "trainer.min_epochs=2", "~logger", "~callbacks"]
#: no logger and no callback but the ones that checkpoint (and so can continue a trial)
CHECKPOINTS_ONLY = [
    "~logger",
    "~callbacks.validation_views",
    "~callbacks.embedding_animation",
    "~callbacks.test_plots",
    "~callbacks.hparams",
    "~callbacks.progress_bar",
    "~callbacks.lr_monitor",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RUN_PLACE_VARIABLES}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray on 127.0.0.1, not the machine's address
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONWARNINGS="ignore::DeprecationWarning",
        **extra,
    )
    return env


def _ray_works() -> bool:
    try:
        import hydra_plugins.hydra_ray_launcher.ray_launcher  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


needs_ray = pytest.mark.skipif(not _ray_works(), reason="ray or hydra-ray-launcher not installed")


def _sweep(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = run_py(["-m", *args], cwd=cwd, env=env, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "in start_ray" in output:  # ray.init() failed: no Ray here
        pytest.skip(f"Ray could not start here: {output[-800:]}")
    return result


def _trials(sweep_dir: Path, keys=("seed", "model.weight_center")) -> dict[str, Path]:
    """Trial folders by their swept overrides (e.g. 'seed=1 model.weight_center=0.5')."""
    trials = {}
    for overrides in sweep_dir.glob("*/.hydra/overrides.yaml"):
        swept = [o for o in OmegaConf.load(overrides) if o.split("=", 1)[0] in keys]
        trials[" ".join(swept)] = overrides.parent.parent
    return trials


# ----------------------------------------------------------------------------- config


def _hydra_config(overrides: list[str] | None = None):
    """The ``hydra`` node of ``python run.py <overrides>`` (interpolations resolvable)."""
    from hydra.core.hydra_config import HydraConfig

    compose_config(overrides)
    return HydraConfig.get()


def test_sweeps_default_to_the_ray_launcher_with_a_cpu_share():
    hydra = _hydra_config()
    launcher = hydra.launcher
    assert launcher._target_ == "hydra_plugins.mchad_ray_launcher.MchadRayLauncher"
    assert launcher.ray.init.address == "local"
    assert launcher.ray.remote.num_cpus == 1 and launcher.ray.remote.num_gpus == 0
    assert launcher.ray.remote.max_retries == 0  # a dead worker's trial is reported, not re-run
    env_vars = launcher.ray.init.runtime_env.env_vars
    assert env_vars.MCHAD_ROOT == str(ROOT) and env_vars.MCHAD_RUN_ID
    assert OmegaConf.to_container(env_vars)["MCHAD_CWD"] == "${hydra.runtime.cwd}"  # resolved by the driver
    assert [c._target_ for c in hydra.callbacks.values()] == ["mchad.sweeps.sweep.SweepReport"]


def test_gpu_launcher_and_basic_launcher_compose():
    gpu = _hydra_config(["hydra/launcher=ray_gpu"]).launcher
    assert gpu.ray.remote.num_gpus == 1 and gpu.ray.init.address == "local"
    basic = _hydra_config(["hydra/launcher=basic"]).launcher
    assert basic._target_.endswith("BasicLauncher")
    half = _hydra_config(["hydra/launcher=ray_gpu", "hydra.launcher.ray.remote.num_gpus=0.5"]).launcher
    assert half.ray.remote.num_gpus == 0.5


def test_run_id_follows_the_sweep_driver_in_workers(monkeypatch):
    from mchad import resolvers

    assert resolvers.run_id() == resolvers._RUN_ID
    monkeypatch.setenv("MCHAD_RUN_ID", "driver-id")
    assert OmegaConf.create({"x": "${run_id:}"}).x == "driver-id"


# ----------------------------------------------------------------------------- failures, in-process


def test_run_trial_records_a_user_error_and_returns(tmp_path):
    cfg = compose_config(["model.weight_center=-1", *TINY], output_dir=tmp_path)
    summary = run_trial(cfg, tmp_path)
    assert summary["status"] == "failed" and "weight_center" in summary["cause"]
    text = (tmp_path / FAILED_FILE).read_text()
    assert text.startswith("error: model.method:") and "Traceback" not in text
    assert not (tmp_path / "results.csv").exists()


def test_run_trial_records_a_refused_value_in_one_line(tmp_path):
    # a value the optimizer refuses was a crash until issue 39: now one input-error line
    cfg = compose_config(["model.optimizer.lr=-1", *TINY], output_dir=tmp_path)
    summary = run_trial(cfg, tmp_path)
    assert summary["status"] == "failed"
    text = (tmp_path / FAILED_FILE).read_text()
    assert text.startswith("error: model.optimizer") and "learning rate" in text.lower()
    assert "Traceback" not in text


def test_run_trial_records_a_crash_with_its_traceback(tmp_path, monkeypatch):
    from mchad.runs import train

    def crash(*args, **kwargs):
        raise RuntimeError("Invalid learning rate: a bug's crash")  # not an input error

    monkeypatch.setattr(train, "check_factories", crash)
    cfg = compose_config(TINY, output_dir=tmp_path)
    summary = run_trial(cfg, tmp_path)
    assert summary["status"] == "failed"
    text = (tmp_path / FAILED_FILE).read_text()
    first, rest = text.split("\n", 1)
    assert first.startswith("error: ") and "learning rate" in first.lower()
    assert "Traceback" in rest


def _fake_trial(root: Path, num: int, results: bool = False, failed: str | None = None) -> Path:
    trial = root / str(num)
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
    if results:
        (trial / "results.csv").write_text(
            "experiment,id_dataset,method,test_case,score,seed,Accuracy,AUROC,AUPR-IN,AUPR-OUT,FPR95\n"
            f"digits-mchad,Digits,MCHAD,Noise,distance,{num},0.9,0.8,0.7,0.6,0.5\n"
        )
    if failed:
        (trial / FAILED_FILE).write_text(f"error: {failed}\nTraceback ...\n")
    return trial


def test_sweep_report_lists_failed_trials_and_exits_1(tmp_path, capsys):
    root = tmp_path / "sweep"
    for num in (0, 1, 10):
        _fake_trial(root, num, results=True)
    bad = _fake_trial(root, 2, failed="CUDA out of memory")
    crashed = _fake_trial(root, 3)
    finished, failed = sweep_status(root)
    assert [t.name for t in finished] == ["0", "1", "10"]
    assert failed[0] == (bad, "CUDA out of memory")
    assert failed[1][0] == crashed and "crashed" in failed[1][1]

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}})
    with pytest.raises(SystemExit) as exit_info:
        SweepReport().on_multirun_end(config)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "3 trial(s) finished, 2 failed" in err and f"FAILED {bad}: CUDA out of memory" in err
    assert (root / "sweep_report.txt").read_text().count("\n  FAILED ") == 2

    # aggregation lists both, with the cause
    assert aggregate_main([str(root), "--out", str(tmp_path / "agg")]) == 0
    missing = (tmp_path / "agg" / "missing.txt").read_text()
    assert str(bad) in missing and "CUDA out of memory" in missing and str(crashed) in missing


def test_sweep_report_passes_a_clean_sweep(tmp_path, capsys):
    root = tmp_path / "sweep"
    _fake_trial(root, 0, results=True)
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    assert "1 trial(s) finished, 0 failed" in capsys.readouterr().out


def test_single_run_does_not_import_ray_and_fails_with_one_line(failed_run):
    """A single run never creates the launcher (start-up time): no ray module is imported."""
    assert failed_run.returncode == 1
    imported = imported_modules(failed_run.stderr)
    assert "torch" in imported  # the run got as far as building the model
    assert not [m for m in imported if m == "ray" or m.startswith("ray.")]
    messages = failed_run.console().splitlines()
    assert messages[-1].startswith("error: model.method:")
    # a failed single run records its cause like a sweep trial (issue 21)
    (failed,) = failed_run.logs.rglob(FAILED_FILE)
    assert failed.read_text().splitlines()[0] == messages[-1]


def test_collect_trials_reports_a_dead_worker_and_waits_for_the_rest(tmp_path, capsys):
    """Guards the launcher's collection (without starting Ray): trial 1's worker died before
    Hydra made its folder, trial 2 raised past run_trial, trials 0 and 3 finished after them.
    Every trial is awaited, the dead and the raised ones get FAILED.txt (and .hydra/) with
    their cause, and the sweep report lists them and exits 1."""
    from hydra.core.utils import JobReturn, JobStatus
    from ray.exceptions import WorkerCrashedError

    root = tmp_path / "sweep"
    finished = {0: _fake_trial(root, 0, results=True), 3: _fake_trial(root, 3, results=True)}
    outcomes = {
        0: JobReturn(status=JobStatus.COMPLETED, _return_value={"status": "ok"}),
        1: WorkerCrashedError(),
        2: JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA error: an illegal memory access")),
        3: JobReturn(status=JobStatus.COMPLETED, _return_value={"status": "ok"}),
    }
    order = [1, 2, 3, 0]  # the order the trials end in
    config = {
        idx: OmegaConf.create(
            {"hydra": {"sweep": {"dir": str(root), "subdir": "${hydra.job.num}"}, "job": {"num": idx}}}
        )
        for idx in outcomes
    }
    trials = {f"ref{idx}": (idx, [f"seed={idx}"], config[idx]) for idx in outcomes}

    def wait(pending, num_returns):
        first = min(pending, key=lambda ref: order.index(int(ref[3:])))
        return [first], [ref for ref in pending if ref != first]

    def get(ref):
        outcome = outcomes[int(ref[3:])]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    jobs = collect_trials(trials, wait, get)
    assert [job.return_value["status"] for job in jobs] == ["ok", "failed", "failed", "ok"]
    assert all(job.status == JobStatus.COMPLETED for job in jobs)  # Hydra's sweeper goes on
    dead, raised = root / "1", root / "2"
    assert (
        (dead / FAILED_FILE)
        .read_text()
        .startswith("error: the trial's worker process died or was lost (WorkerCrashedError")
    )
    assert OmegaConf.load(dead / ".hydra" / "overrides.yaml") == ["seed=1"]
    assert "CUDA error" in (raised / FAILED_FILE).read_text().splitlines()[0]
    assert sweep_status(root)[0] == [finished[0], finished[3]]
    with pytest.raises(SystemExit) as exit_info:
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}}))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"FAILED {dead}: the trial's worker process died" in err and f"FAILED {raised}: the trial raised" in err


TRIAL_LINE = (
    r"trial #(\d+) (.+): accuracy [\d.]+, AUROC [\d.]+ \(distance, mean of 3 test cases\), objective [\d.]+ \((.+)\)"
)


def check_sweep_console(
    output: str, sweep_dir: Path, swept: dict[int, str], failed: dict[int, str] | None = None
) -> None:
    """The driver's console of a sweep: one line per trial (number, swept values, headline
    metrics and objective, or the failure, and its folder) and the report, nothing else: no
    results tables, no worker-prefixed lines, no foreign warnings, no colour codes."""
    import re

    failed = failed or {}
    lines = output.strip().splitlines()
    trial_lines = [line for line in lines if line.startswith("trial #")]
    assert len(trial_lines) == len(swept) + len(failed), output[-3000:]
    for line in trial_lines:
        num = int(line.split()[1][1:])
        if num in failed:
            assert line.startswith(f"trial #{num} {failed[num]}: FAILED: "), line
            assert line.endswith(f"({sweep_dir / str(num)})"), line
            continue
        match = re.fullmatch(TRIAL_LINE, line)
        assert match and match.group(2) == swept[num] and match.group(3) == str(sweep_dir / str(num)), line
    report = [line for line in lines if not line.startswith("trial #")]
    assert report[0].startswith(f"sweep {sweep_dir}: "), output[-3000:]
    assert len(report) == 1 + (len(failed) + 1 if failed else 0), output[-3000:]  # FAILED lines and the hint
    for noise in ("\x1b[", "(_run_job", "WARNING", "experiment id_dataset", "Launching", "Token authentication"):
        assert noise not in output, noise


# the console of a basic sweep (3 trial lines and the report) is checked on the first sweep of
# tests/test_sweep_resume.py (the same command): one sweep fewer in the suite


# ----------------------------------------------------------------------------- Ray sweeps


@needs_ray
def test_ray_sweep_runs_trials_apart_and_reports_a_failing_one(tmp_path):
    """2 seeds x (good, bad weight): the good trials finish in their own folders, the bad
    ones record their cause, the sweep reports them and exits 1. Started from another
    directory with a relative log folder: the workers must resolve it like the driver."""
    result = _sweep(["seed=1,2", "model.weight_center=0.5,-1", "paths.log_dir=logs", *TINY], tmp_path, _env())
    output = result.stdout + result.stderr
    sweeps = list((tmp_path / "logs" / "multiruns").iterdir())
    assert len(sweeps) == 1, output[-3000:]
    sweep_dir = sweeps[0]
    trials = _trials(sweep_dir)
    assert sorted(p.name for p in trials.values()) == ["0", "1", "2", "3"], output[-3000:]

    good = [trials[f"seed={s} model.weight_center=0.5"] for s in (1, 2)]
    bad = [trials[f"seed={s} model.weight_center=-1"] for s in (1, 2)]
    for trial, seed in zip(good, (1, 2), strict=True):
        assert (trial / "results.csv").is_file(), output[-3000:]
        assert f",{seed}," in (trial / "results.csv").read_text().splitlines()[1]
        assert OmegaConf.load(trial / "config.yaml").paths.root_dir == str(ROOT)
    for trial in bad:
        assert not (trial / "results.csv").exists()
        assert "weight_center" in (trial / FAILED_FILE).read_text()

    assert result.returncode == 1, output[-3000:]
    assert "2 trial(s) finished, 2 failed" in result.stderr
    for trial in bad:
        assert f"FAILED {trial}: model.method:" in result.stderr
    # the console: one line per trial and the report (issue 32)
    swept = {int(t.name): key for key, t in trials.items()}
    check_sweep_console(
        output,
        sweep_dir,
        {n: k for n, k in swept.items() if "=0.5" in k},
        {n: k for n, k in swept.items() if "=-1" in k},
    )

    results, missing = find_results(sweep_dir)
    assert sorted(results["seed"].unique()) == [1, 2] and results["run_dir"].nunique() == 2
    assert sorted(m.path for m in missing) == sorted(bad)


@needs_ray
@pytest.mark.slow
def test_ray_sweep_reports_a_trial_whose_worker_was_killed(tmp_path):
    """A real kill: the seed-2 trial SIGKILLs its own Ray worker when training starts (as the
    out-of-memory killer would; tests/sigkill_callback.py). The sweep does not hang: the other
    trial finishes, the killed one is reported failed with Ray's cause, the exit status is 1.
    (Slow: a local Ray start takes 20-60 s on 2 shared cores; the fast test above pins the
    collection logic.)"""
    env = _env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    killer = [
        "+callbacks.killer._target_=sigkill_callback.KillOnSeed",
        "allowed_targets=[sigkill_callback.*]",
        "+callbacks.killer.seed=${seed}",
        "+callbacks.killer.kill_seed=2",
    ]
    result = _sweep(["seed=1,2", "paths.log_dir=logs", *TINY, *killer], tmp_path, env, timeout=400)
    output = result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    trials = _trials(sweep_dir)
    assert (trials["seed=1"] / "results.csv").is_file(), output[-3000:]
    killed = trials["seed=2"]
    assert not (killed / "results.csv").exists()
    cause = (killed / FAILED_FILE).read_text().splitlines()[0]
    assert cause.startswith("error: the trial's worker process died"), cause
    assert result.returncode == 1, output[-3000:]
    assert "1 trial(s) finished, 1 failed" in result.stderr
    assert f"FAILED {killed}: the trial's worker process died" in result.stderr


@needs_ray
@pytest.mark.slow
def test_a_ray_trial_whose_worker_was_killed_continues_from_its_checkpoint_when_re_run(tmp_path):
    """The seed-2 trial's Ray worker is SIGKILLed in epoch 2 of 3: reported failed (Ray's cause,
    exit 1); the same command with its hydra.sweep.dir continues that trial from its checkpoint
    after epoch 1 and leaves the finished one alone (MCHAD_TEST_SIGNAL: tests/sigkill_callback.py)."""
    env = _env(PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    sweep_dir = tmp_path / "sweep"
    command = [
        "seed=1,2",
        "paths.log_dir=logs",
        f"hydra.sweep.dir={sweep_dir}",
        "trainer.max_epochs=3",
        "trainer.min_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        *CHECKPOINTS_ONLY,
        "+callbacks.signal._target_=sigkill_callback.SignalAt",
        "allowed_targets=[sigkill_callback.*]",
        "+callbacks.signal.seed=${seed}",
    ]
    killed = _sweep(command, tmp_path, {**env, "MCHAD_TEST_SIGNAL": "SIGKILL:seed=2:epoch=1:batch=1"}, timeout=400)
    output = killed.stdout + killed.stderr
    assert killed.returncode == 1, output[-3000:]
    trials = _trials(sweep_dir)
    assert (trials["seed=1"] / "results.csv").is_file(), output[-3000:]
    second = trials["seed=2"]
    assert (second / FAILED_FILE).read_text().startswith("error: the trial's worker process died")
    assert (second / "checkpoints" / "last.ckpt").is_file()
    done = (trials["seed=1"] / "results.csv").stat().st_mtime_ns

    again = _sweep(command, tmp_path, env, timeout=400)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert f"resumed from epoch 1 (1 of 3 epochs done, {second / 'checkpoints' / 'last.ckpt'})" in output
    assert "2 trial(s) finished, 0 failed; 1 done before, 1 run now" in again.stdout
    assert (second / "results.csv").is_file() and not (second / FAILED_FILE).exists()
    assert (trials["seed=1"] / "results.csv").stat().st_mtime_ns == done


# ----------------------------------------------------------------------------- existing cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 (2 CPUs) in a private temp dir; stopped afterwards."""
    if not _ray_works() or shutil.which("ray") is None:
        pytest.skip("ray CLI not available")
    temp_dir = tempfile.mkdtemp(prefix="mchad-ray-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    env = _env(RAY_AUTH_MODE="disabled")
    log_path = Path(temp_dir) / "ray-start.log"
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        cwd=temp_dir,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # --block: stops the processes of this head
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait()
        for pid in _processes_naming(temp_dir):  # whatever survived, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"ray start failed: {log_path.read_text()[-800:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        stop()


@needs_ray
@pytest.mark.slow
def test_sweep_on_an_existing_cluster(ray_head, tmp_path):
    """The workers of a cluster started elsewhere (other cwd, no MCHAD_ROOT) write each
    trial to the driver's <sweep dir>/<job num>/."""
    address, env = ray_head
    result = _sweep(
        [f"hydra.launcher.ray.init.address={address}", "seed=1,2", "paths.log_dir=logs", *TINY],
        tmp_path,
        env,
        timeout=400,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Connecting to the existing Ray cluster at {address}" in output
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    trials = _trials(sweep_dir)
    assert sorted(trials) == ["seed=1", "seed=2"]
    for seed in (1, 2):
        trial = trials[f"seed={seed}"]
        assert (trial / "results.csv").is_file()
        assert OmegaConf.load(trial / "config.yaml").paths.root_dir == str(ROOT)
    assert "2 trial(s) finished, 0 failed" in result.stdout
