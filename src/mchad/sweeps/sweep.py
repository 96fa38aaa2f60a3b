"""Multirun (``python run.py -m ...``) support: trials in Ray workers, failures, the report.

* :func:`run_trial` is what ``mchad.task.main`` runs for each trial of a sweep. It prepares
  the process (a Ray worker: torch threads = the CPUs Ray gave the trial, the driver's
  working directory), runs the trial and, when it fails, writes the cause to
  ``<trial folder>/FAILED.txt`` (:mod:`mchad.failures`) and returns normally, so that the
  other trials go on (hydra-ray-launcher's ``ray.get`` would otherwise stop the sweep at the
  first failure).
* :class:`SweepReport` (a Hydra callback, see ``config/hydra/default.yaml``) lists the
  failed and missing trials when the sweep ends (path + cause) and makes the command exit
  with status 1 if there is any; it counts the trials done before this command and run now
  (a completed sweep, :mod:`mchad.sweeps.sweep_resume`).
* :func:`worker_setup` runs once in every Ray worker process (``runtime_env``
  ``worker_process_setup_hook`` in ``config/hydra/launcher/ray.yaml``).
* :func:`launch_on_ray` starts the trials on Ray and waits for every one of them; a trial
  whose worker process died (killed, out of memory, node lost) gets a FAILED.txt with Ray's
  cause (:func:`record_dead_trial`) instead of ending the sweep without a report.

This module is imported by single runs too (the callback): it must not import ray or torch
at module level.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mchad.errors import one_line
from mchad.failures import FAILED_FILE, RESULTS_FILE, failure_cause, record_failure
from mchad.sweeps.sweep_resume import CONTINUE_ENV  # set by the sweeper for a continued trial

log = logging.getLogger(__name__)

#: the first word of a preempted trial's cause (FAILED.txt)
PREEMPTED = "preempted"


# ----------------------------------------------------------------------------- worker side


def in_ray_worker() -> bool:
    """True inside a Ray worker process (never imports ray itself)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # pragma: no cover - depends on ray internals
        return False


def assigned_cpus() -> int | None:
    """Number of CPUs Ray reserved for the current task, None outside a Ray task."""
    if not in_ray_worker():
        return None
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(round(cpus))) if cpus else 1


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: register the resolvers the configs use and work
    in the driver's directory (``MCHAD_CWD``), where relative paths of the sweep point."""
    import mchad.resolvers  # noqa: F401

    cwd = os.environ.get("MCHAD_CWD")
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)


def prepare_worker(cwd: str | None) -> None:
    """In a Ray worker: use the trial's CPU share for torch threads; work in the driver's cwd.

    Ray starts workers in its own folder; relative paths given on the command line
    (e.g. ``dataset_dir=data``) are meant relative to where the user ran ``run.py``.
    """
    threads = assigned_cpus()
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if cwd and Path(cwd).is_dir():
        os.chdir(cwd)
    log.info("Ray worker on %s: %d torch thread(s), cwd %s", os.uname().nodename, threads, os.getcwd())


def run_trial(cfg: DictConfig, output_dir: str | Path, cwd: str | None = None) -> dict[str, Any]:
    """Run one trial of a sweep; a failure is written to FAILED.txt instead of raised.

    A trial the sweeper continues (:mod:`mchad.sweeps.sweep_resume`: ``MCHAD_CONTINUE`` names its
    last.ckpt) starts from that checkpoint's full training state, as ``resume=`` would. A
    preemption (:mod:`mchad.runs.preemption`) is recorded as ``preempted``; once this process
    was preempted, the trials it would still run stop before training.

    Returns a small picklable summary: ``{"status": "ok"|"failed"|"preempted", "dir": ..., ...}``.
    """
    from omegaconf import open_dict

    from mchad.errors import Preempted
    from mchad.runs.preemption import armed
    from mchad.runs.train import run  # heavy imports only here

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    failed = output_dir / FAILED_FILE
    failed.unlink(missing_ok=True)
    checkpoint = os.environ.get(CONTINUE_ENV)
    try:
        with armed():
            prepare_worker(cwd)
            if checkpoint:
                log.info("continuing the trial from %s", checkpoint)
                with open_dict(cfg):
                    cfg.ckpt_path = checkpoint  # the same config (checked by the sweeper): resume= semantics
            path = run(cfg)
    except Preempted as stop:
        (output_dir / RESULTS_FILE).unlink(missing_ok=True)
        hint = "continue it: the same sweep command with hydra.sweep.dir=<this sweep's folder>"
        cause = record_failure(output_dir, f"{PREEMPTED} by {stop.signal_name}; {hint}")
        log.warning("trial %s (%s)", cause, failed)
        return {"status": "preempted", "dir": str(output_dir), "cause": cause}
    except (Exception, SystemExit) as error:  # noqa: BLE001 - every cause is recorded
        # a partial results.csv would be counted as a finished trial
        (output_dir / RESULTS_FILE).unlink(missing_ok=True)
        cause = record_failure(output_dir, error)
        log.error("trial failed: %s (%s)", cause, failed)
        return {"status": "failed", "dir": str(output_dir), "cause": cause}
    return {"status": "ok", "dir": str(output_dir), "results": str(path)}


# ----------------------------------------------------------------------------- the trial's line


def _headline(results: Path) -> str:
    """Accuracy and the mean AUROC of the headline score (results.csv's first) over the test cases."""
    import csv

    with open(results, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return "no results"
    score = rows[0]["score"]
    aurocs = [float(r["AUROC"]) for r in rows if r["score"] == score and r.get("AUROC") not in ("", None)]
    auroc = (
        f"AUROC {sum(aurocs) / len(aurocs):.3f} ({score}, mean of {len(aurocs)} test cases)" if aurocs else "no AUROC"
    )
    return f"accuracy {float(rows[0]['Accuracy']):.3f}, {auroc}"


def trial_line(num: int, overrides: list[str], trial_dir: str | Path) -> str:
    """One line for a finished trial: its number, the values swept (the overrides not given
    literally on the command line), its headline metrics (and objective) or its failure, its folder."""
    from mchad.runs.objective import read_objective

    trial_dir = Path(trial_dir).absolute()
    given = _given_keys(sys.argv[1:])
    swept = " ".join(_shortened(o) for o in overrides if _override_key(o) not in given) or "(no swept values)"
    if (trial_dir / RESULTS_FILE).is_file():
        objective = read_objective(trial_dir)
        outcome = _headline(trial_dir / RESULTS_FILE) + ("" if objective is None else f", objective {objective:.4f}")
    else:
        outcome = f"FAILED: {failure_cause(trial_dir, 'no results.csv')}"
    return f"trial #{num} {swept}: {outcome} ({trial_dir})"


def _shortened(override: str) -> str:
    """``key=value`` with a float value to 4 significant digits (a search's draws)."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if "." in value and len(value) > 6 else override


def _override_key(text: str) -> str | None:
    return _parse_override(text)[0]


def _parse_override(text: str) -> tuple[str | None, bool]:
    """(key, whether it sweeps several values) of a command-line override; (None, False) if it is none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except Exception:  # noqa: BLE001 - a flag (-m) or not an override at all
        return None, False
    return override.key_or_group, override.is_sweep_override()


def _given_keys(argv: list[str]) -> set[str]:
    """The keys the command line sets to one value (the same in every trial)."""
    keys = set()
    for arg in argv:
        key, sweeps = _parse_override(arg) if not arg.startswith("-") else (None, False)
        if key is not None and not sweeps:
            keys.add(key)
    return keys


def report_trial(num: int, overrides: list[str], trial_dir: str | Path) -> None:
    """Print the trial's line on the driver's console (its tables and log are in its run.log)."""
    print(trial_line(num, overrides, trial_dir), flush=True)


# ----------------------------------------------------------------------------- driver side


def launch_on_ray(launcher, job_overrides, initial_job_idx: int) -> list:
    """hydra-ray-launcher's ``launch``, except for how the trials are awaited.

    hydra-ray-launcher collects the trials with ``ray.get`` one after another: the first
    trial whose worker died raises out of the launcher, the driver stops waiting for the
    others (Ray stops them with it) and Hydra never calls :class:`SweepReport`. Here each
    trial is awaited as it ends; a dead one is recorded (:func:`record_dead_trial`) and
    returned as a completed job with a failed summary, so that the sweep goes on and reports
    it (exit status 1). Ray does not retry a dead worker's trial (``max_retries: 0`` in
    ray.yaml): a retried out-of-memory kill is retried without end by Ray's own default.
    """
    import ray
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray
    from omegaconf import open_dict

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # debug: the console gets one line per finished trial instead (report_trial)
    log.debug("Ray launcher: %d trial(s), sweep folder %s", len(job_overrides), sweep_dir)
    address = launcher.ray_cfg.init.get("address")
    if address not in (None, "local"):  # Ray's own notices are off (ray.yaml: logging_level)
        log.info("Connecting to the existing Ray cluster at %s", address)
    start_ray(launcher.ray_cfg.init)
    trials = {}
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.debug("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"job_id_for_{idx}"
            sweep_config.hydra.job.num = idx
        ref = launch_job_on_ray(
            launcher.hydra_context, launcher.ray_cfg.remote, sweep_config, launcher.task_function, Singleton.get_state()
        )
        trials[ref] = (idx, list(overrides), sweep_config)
    return collect_trials(trials, ray.wait, ray.get)


def collect_trials(trials: dict, wait, get) -> list:
    """The JobReturn of every trial (``{ref: (job number, overrides, sweep config)}``), in job
    order, awaiting them as they end (``wait``/``get``: Ray's). A trial that did not return
    normally (its worker died, or it raised past :func:`run_trial`) is recorded with
    :func:`record_dead_trial` and returned as completed with a failed summary."""
    from hydra.core.utils import JobReturn, JobStatus

    results = {}
    pending = list(trials)
    while pending:
        done, pending = wait(pending, num_returns=1)
        for ref in done:
            idx, overrides, sweep_config = trials[ref]
            try:
                job = get(ref)
            except Exception as error:  # noqa: BLE001 - ray.exceptions.*: worker died, out of memory, node lost
                cause, detail = trial_lost_cause(error), str(error)
            else:
                if job.status != JobStatus.FAILED:
                    results[idx] = job
                    report_trial(idx, overrides, _trial_dir(sweep_config, idx))
                    continue
                cause, detail = f"the trial raised {one_line(job._return_value)}", str(job._return_value)
            trial_dir = _trial_dir(sweep_config, idx)
            summary = record_dead_trial(trial_dir, overrides, cause, detail)
            report_trial(idx, overrides, trial_dir)
            results[idx] = JobReturn(
                overrides=overrides, working_dir=str(trial_dir), status=JobStatus.COMPLETED, _return_value=summary
            )
    return [results[idx] for idx in sorted(results)]


def _trial_dir(sweep_config, idx: int) -> Path:
    """The folder Hydra gives trial ``idx`` (hydra.sweep.dir / hydra.sweep.subdir)."""
    sweep = sweep_config.hydra.sweep
    try:
        return Path(str(sweep.dir)) / str(sweep.subdir)
    except Exception:  # noqa: BLE001 - an unresolvable custom subdir: the default layout
        return Path(str(sweep.dir)) / str(idx)


def trial_lost_cause(error: BaseException, limit: int = 300) -> str:
    """One line for a trial Ray could not bring back: its worker process died (killed by a
    signal or the out-of-memory monitor, Ray names the likely cause) or its node was lost."""
    text = one_line(error)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"the trial's worker process died or was lost ({text})"


def record_dead_trial(trial_dir: Path, overrides: list[str], cause: str, detail: str = "") -> dict[str, Any]:
    """Record a trial that ended without returning: ``FAILED.txt`` with ``cause`` (first line)
    and ``detail``, and ``.hydra/overrides.yaml`` if the worker died before Hydra wrote it, so
    that :class:`SweepReport` and ``mchad.results.aggregate`` list the trial. A trial that wrote its
    results.csv (atomically, as its last step) before dying has finished and stays so."""
    trial_dir = Path(trial_dir)
    if (trial_dir / RESULTS_FILE).is_file():
        return {"status": "ok", "dir": str(trial_dir), "results": str(trial_dir / RESULTS_FILE)}
    overrides_file = trial_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        from omegaconf import OmegaConf

        overrides_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(list(overrides)), overrides_file)
    (trial_dir / FAILED_FILE).write_text(f"error: {cause}\n\n{detail}\n", encoding="utf-8")
    return {"status": "failed", "dir": str(trial_dir), "cause": cause}


def sweep_status(sweep_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Trial folders below ``sweep_dir`` (those holding ``.hydra/``): finished and not finished
    (failed or preempted, with the cause).

    A trial without results.csv and without FAILED.txt (a crashed or killed worker) is
    failed with cause "no results.csv (crashed or still running?)".
    """
    sweep_dir = Path(sweep_dir)
    finished, failed = [], []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra"), key=_trial_order):
        trial = hydra_dir.parent
        if (trial / RESULTS_FILE).is_file():
            finished.append(trial)
        elif (trial / FAILED_FILE).is_file():
            failed.append((trial, failure_cause(trial)))
        else:
            failed.append((trial, "no results.csv and no FAILED.txt (worker crashed or killed?)"))
    return finished, failed


def is_preempted(cause: str) -> bool:
    return cause.startswith(PREEMPTED + " ")


def _trial_order(path: Path) -> tuple:
    parts = path.parent.parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


class SweepReport(Callback):
    """Hydra callback: after a multirun, report failed and preempted trials (path + cause) and
    how trials were continued; exit 1 if any failed, else 143 if any was preempted."""

    def __init__(self, fail_exit: bool = True) -> None:
        self.fail_exit = fail_exit

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's driver starts Python's garbage collector, which run.py paused for a run's
        imports (mchad.runs.collector): on Ray or SLURM it runs no trial itself."""
        from mchad.runs.collector import gc_after_imports

        gc_after_imports()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        if not sweep_dir.is_dir():
            return
        from mchad.runs.preemption import EXIT_PREEMPTED
        from mchad.sweeps.sweep_resume import continued_lines, counts_note

        finished, stopped = sweep_status(sweep_dir)
        preempted = [(trial, cause) for trial, cause in stopped if is_preempted(cause)]
        failed = [(trial, cause) for trial, cause in stopped if not is_preempted(cause)]
        note = f", {len(preempted)} preempted" if preempted else ""
        lines = [
            f"sweep {sweep_dir}: {len(finished)} trial(s) finished, {len(failed)} failed{note}{counts_note(sweep_dir)}"
        ]
        lines += [f"  {line}" for line in continued_lines(sweep_dir)]
        lines += [f"  FAILED {trial}: {cause}" for trial, cause in failed]
        lines += [f"  PREEMPTED {trial}: {cause}" for trial, cause in preempted]
        if failed:
            lines.append(
                f"  (causes in <trial>/{FAILED_FILE}; aggregate with: python -m mchad.results.aggregate {sweep_dir})"
            )
        if preempted:
            lines.append(f"  (continue the preempted trials: the same command with hydra.sweep.dir={sweep_dir})")
        report = "\n".join(lines)
        (sweep_dir / "sweep_report.txt").write_text(report + "\n", encoding="utf-8")
        print(report, file=sys.stderr if stopped else sys.stdout, flush=True)
        if self.fail_exit and failed:
            raise SystemExit(1)
        if self.fail_exit and preempted:
            raise SystemExit(EXIT_PREEMPTED)
