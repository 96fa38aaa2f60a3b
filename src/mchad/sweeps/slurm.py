"""Sweeps on SLURM (and on this machine) through hydra-submitit-launcher: ``hydra/launcher=slurm|local``.

The launchers (:mod:`hydra_plugins.mchad_submitit_launcher`) are submitit's, with the behaviour a sweep
has on Ray (:mod:`mchad.sweeps.sweep`):

* :func:`launch_on_submitit` (the driver) composes every trial and checks its targets before
  anything is submitted (a swept ``_target_`` too), submits one job per trial (a job array) and
  awaits each job as it ends (:func:`mchad.sweeps.sweep.collect_trials`, as on Ray): one console line
  per finished trial, a job that ended without a result (cancelled, killed, out of memory, node lost)
  recorded as failed with SLURM's state and the last line of its log. The jobs' states come from
  ``squeue`` (never ``sacct``: clusters without accounting, the local SLURM of
  ``bash/slurm-local.sh``, answer sacct with an error that submitit would print at every poll).
* :func:`prepare_job` and :func:`requeue_if_preempted` (in the job) make a preempted trial continue:
  SIGTERM or SIGUSR1 (preemption, ``scancel --signal``, the time limit's warning, asked for as
  ``--signal=USR1@<signal_delay_s>``) stops the trial at a batch boundary as everywhere
  (:mod:`mchad.runs.preemption`); then the job requeues itself (``scontrol requeue``) and, started
  again by SLURM, continues from the trial's ``checkpoints/last.ckpt``
  (:func:`mchad.sweeps.sweep_resume.continuation`, as a re-run sweep would). Each step is noted in
  the job's submitit folder (``requeued.txt``) and the sweep report shows the notes.

Imported by the launchers only when a sweep starts (no submitit, torch or ray at module level).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mchad.failures import RESULTS_FILE

log = logging.getLogger(__name__)

#: seconds between two looks at the jobs
POLL_S = 1.0
#: seconds a job that SLURM reports not running is given to show its result file (shared file systems
#: lag) or to be running again (requeued)
RESULT_GRACE_S = 15.0
#: a job's notes on its requeues and continuations, in its submitit folder
NOTES_FILE = "requeued.txt"
#: SLURM states of a job that has not ended (a requeued job passes through REQUEUED, PREEMPTED and
#: PENDING; a job that stays PREEMPTED leaves squeue's list after MinJobAge and counts as ended then)
ACTIVE = {
    "PENDING",
    "PREEMPTED",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "SPECIAL_EXIT",
    "STAGE_OUT",
    "STOPPED",
    "SUSPENDED",
}


# ----------------------------------------------------------------------------- driver side


def make_executor(launcher: Any) -> Any:
    """submitit's executor with the launcher's parameters, as hydra-submitit-launcher builds it;
    on SLURM the warning before the time limit is SIGUSR1 (ours, :mod:`mchad.runs.preemption`)
    instead of submitit's SIGUSR2."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    kind = launcher._EXECUTOR
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{kind}_max_num_timeout"] = params.pop("max_num_timeout")
    if kind == "slurm":
        extra = dict(params.get("additional_parameters") or {})
        extra.setdefault("signal", f"USR1@{params.get('signal_delay_s', 120)}")
        params["additional_parameters"] = extra
    executor = submitit.AutoExecutor(cluster=kind, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"{kind}_{key}": value for key, value in params.items()})
    return executor


def launch_on_submitit(launcher: Any, job_overrides: Any, initial_job_idx: int) -> list:
    """hydra-submitit-launcher's ``launch``, with the trials checked first and awaited as they end."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from omegaconf import open_dict

    from mchad.resolvers import run_id
    from mchad.sweeps.sweep import collect_trials

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    logging.getLogger("submitit").setLevel(logging.ERROR)  # its notices are not the sweep's console
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # the jobs resolve the driver's folders (sbatch and the local executor pass the environment on)
    os.environ.setdefault("MCHAD_ROOT", str(launcher.config.paths.root_dir))
    os.environ["MCHAD_RUN_ID"] = run_id()
    configs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = idx
        check_trial_targets(sweep_config)  # a refused target stops the sweep before anything is submitted
        configs.append(sweep_config)
    executor = make_executor(launcher)
    params = [
        (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx)
    ]
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.debug("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    jobs = executor.map_array(launcher, *zip(*params, strict=True))
    trials = {
        job: (idx, list(overrides), config)
        for job, idx, overrides, config in zip(
            jobs, range(initial_job_idx, initial_job_idx + len(jobs)), job_overrides, configs, strict=True
        )
    }
    watch = JobWatch(launcher._EXECUTOR)
    try:
        returns = collect_trials(trials, watch.wait, watch.get)
    except KeyboardInterrupt:  # Ctrl-C: no job of this sweep goes on writing into its folders
        running = [job for job in jobs if not job.paths.result_pickle.exists()]
        for job in running:
            job.cancel(check=False)
        print(f"interrupted: cancelled the sweep's {len(running)} unfinished job(s)", file=sys.stderr, flush=True)
        raise
    finally:
        report_notes(sweep_dir, jobs)
    return returns


def check_trial_targets(config: Any) -> None:
    """A trial's targets against the allow-list (:mod:`mchad.targets`; Hydra's own node is not the
    trial's): one ``error:`` line and exit 1 when one is refused."""
    from omegaconf import OmegaConf

    from mchad.errors import UserError
    from mchad.failures import one_line
    from mchad.targets import check_targets

    try:
        check_targets(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]))
    except UserError as error:
        raise SystemExit(f"error: {one_line(error)}") from None


class JobWatch:
    """``wait`` and ``get`` of :func:`mchad.sweeps.sweep.collect_trials` for submitit's jobs.

    A job has ended when its result file exists, or when SLURM (the local executor: its process)
    has reported it not running for :data:`RESULT_GRACE_S` seconds without a result file appearing:
    a file system that shows the file late, or a job that SLURM is requeueing, is not taken for a
    lost one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.states: dict[str, str] = {}
        self.stopped_since: dict[str, float] = {}

    def state(self, job: Any) -> str:
        if self.kind != "slurm":
            return "ENDED" if job.done() else "RUNNING"
        return self.states.get(str(job.job_id), "PENDING")

    def ended(self, job: Any) -> bool:
        if job.paths.result_pickle.exists():
            return True
        key = str(job.job_id)
        if self.state(job) in ACTIVE:
            self.stopped_since.pop(key, None)
            return False
        return time.monotonic() - self.stopped_since.setdefault(key, time.monotonic()) >= RESULT_GRACE_S

    def wait(self, pending: list, num_returns: int = 1) -> tuple[list, list]:
        while True:
            if self.kind == "slurm":
                self.states = slurm_states([str(job.job_id) for job in pending]) or self.states
            done = [job for job in pending if self.ended(job)]
            if len(done) >= min(num_returns, len(pending)):
                return done, [job for job in pending if job not in done]
            time.sleep(POLL_S)

    def get(self, job: Any) -> Any:
        """The job's JobReturn; a job that ended without one raises :class:`JobLost`."""
        from hydra.core.utils import JobReturn, JobStatus
        from submitit.core.utils import FailedJobError

        if not job.paths.result_pickle.exists():
            raise JobLost(lost_cause(job, self.state(job)))
        try:
            return job.results()[0]
        except FailedJobError as error:  # raised in the job outside the trial (Hydra's own work)
            last = [line for line in str(error).splitlines() if line.strip()][-1:] or ["unknown cause"]
            return JobReturn(status=JobStatus.FAILED, _return_value=f"{last[0].strip()} (see {job.paths.stderr})")


class JobLost(RuntimeError):
    """A job that ended without a result."""


def lost_cause(job: Any, state: str) -> str:
    """SLURM's state of a job that ended without a result, and the last line of its error log."""
    last = ""
    if job.paths.stderr.is_file():
        lines = [line for line in job.paths.stderr.read_text(errors="replace").splitlines() if line.strip()]
        last = f": {lines[-1].strip()}" if lines else ""
    return f"job {job.job_id} ended {state} without a result (log {job.paths.stderr}){last}"


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """``{job id: SLURM state}`` from one ``squeue`` call; a job SLURM no longer lists has ended
    (``ENDED``). Empty when squeue does not answer (the caller keeps the last states)."""
    if not job_ids:
        return {}
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T", f"--jobs={','.join(job_ids)}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.debug("squeue failed: %s", error)
        return {}
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        log.debug("squeue failed: %s", done.stderr.strip())
        return {}
    listed: dict[str, str] = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition(" ")
        if state and listed.get(job_id) not in ACTIVE:  # a job listed twice: its active record counts
            listed[job_id] = state.strip()
    return {job_id: listed.get(job_id, "ENDED") for job_id in job_ids}


def report_notes(sweep_dir: Path, jobs: list) -> None:
    """The jobs' requeue notes into the sweep report (:class:`mchad.sweeps.sweep.SweepReport`)."""
    from mchad.sweeps.sweep_resume import add_continued

    for job in jobs:
        notes = Path(job.paths.folder) / NOTES_FILE
        if notes.is_file():
            add_continued(sweep_dir, notes.read_text(encoding="utf-8").splitlines())


# ----------------------------------------------------------------------------- job side


def prepare_job(launcher: Any, overrides: list[str], job_num: int) -> list[str]:
    """In the job, before the trial: torch uses the trial's CPUs (``cpus_per_task``); SIGUSR2 (submitit's
    preemption signal, should someone send it) is a preemption like SIGTERM; and a job that SLURM
    started again (requeued) continues its trial from ``checkpoints/last.ckpt``. Returns the
    trial's overrides (with ``MCHAD_CONTINUE`` when it continues)."""
    import signal

    from mchad.runs import preemption

    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or launcher.params.get("cpus_per_task")
    if cpus and str(cpus).isdigit():  # trials that run side by side do not oversubscribe the cores
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(cpus)
        import torch

        torch.set_num_threads(int(cpus))
    preemption.install()
    signal.signal(signal.SIGUSR2, signal.getsignal(signal.SIGUSR1))
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        return overrides
    return continue_requeued(launcher, overrides, job_num)


def continue_requeued(launcher: Any, overrides: list[str], job_num: int) -> list[str]:
    """A requeued job's trial: continued from its last checkpoint when its config is unchanged
    (else started over, its checkpoints set aside), as a re-run sweep would; noted for the report."""
    from omegaconf import open_dict

    from mchad.sweeps.sweep_resume import CONTINUE_ENV, continuation, discard_checkpoints
    from mchad.sweeps.sweep_resume import _override_value as override_value

    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(config):
        config.hydra.job.num = job_num
    folder = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
    if (folder / RESULTS_FILE).is_file():
        return overrides
    checkpoint, note = continuation(job_num, folder, config)
    if checkpoint is None:
        discard_checkpoints(folder)
        note = note or f"#{job_num} starts over: no checkpoint to continue from"
    note_event(note)
    log.warning("requeued by SLURM (restart %s): %s", os.environ.get("SLURM_RESTART_COUNT"), note)
    kept = [o for o in overrides if not o.lstrip("+").startswith(f"hydra.job.env_set.{CONTINUE_ENV}=")]
    if checkpoint is None:
        return kept
    return [*kept, f"++hydra.job.env_set.{CONTINUE_ENV}={override_value(str(checkpoint))}"]


def note_event(line: str) -> None:
    """Append a line to this job's notes (its submitit folder), read by :func:`report_notes`."""
    from submitit import JobEnvironment

    folder = JobEnvironment().paths.folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / NOTES_FILE, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def requeue_if_preempted(result: Any, job_num: int) -> None:
    """After the trial (``result``: its JobReturn): if SIGTERM or SIGUSR1 stopped it before its
    results while the job still runs (``scancel --signal``, the time limit's SIGUSR1 warning, a
    preemption signal), requeue this job and end it without a result (the driver waits for the
    requeued job). A job that SLURM is already ending (``scancel`` without ``--signal``, the hard
    time limit: COMPLETING), or whose requeue SLURM refuses (e.g. MaxBatchRequeue reached), is not
    requeued: the trial stays recorded as preempted."""
    from mchad.runs.preemption import EXIT_PREEMPTED, received

    signal_name = received()
    if signal_name is None or not os.environ.get("SLURM_JOB_ID"):
        return
    trial_dir = Path(str(result.hydra_cfg.hydra.runtime.output_dir))
    if (trial_dir / RESULTS_FILE).is_file():
        return
    from submitit import JobEnvironment

    job_id = JobEnvironment().job_id
    state = slurm_states([job_id]).get(job_id, "RUNNING")
    if state == "COMPLETING" or state not in ACTIVE:  # SLURM ends the job (plain scancel, the hard time limit)
        note_event(f"#{job_num} stopped by {signal_name} while SLURM job {job_id} was {state}: not requeued")
        return
    # noted first: SLURM ends this job's processes as soon as it requeues the job
    note_event(f"#{job_num} preempted by {signal_name}: SLURM job {job_id} requeued")
    log.warning("preempted by %s: requeueing SLURM job %s; it continues from the last checkpoint", signal_name, job_id)
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        note_event(f"#{job_num}: SLURM did not requeue job {job_id} ({done.stderr.strip()}): recorded as preempted")
        log.warning("SLURM did not requeue job %s: %s", job_id, done.stderr.strip())
        return
    raise SystemExit(EXIT_PREEMPTED)  # no result: the driver waits for the requeued job
