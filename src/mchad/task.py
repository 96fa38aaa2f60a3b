"""``run.py``'s Hydra task: one run, or one trial of a sweep; a failure's cause in FAILED.txt.

The entry point above the orchestration: it calls :func:`mchad.runs.train.run` (one run) or
:func:`mchad.sweeps.sweep.run_trial` (one trial of a multirun), and nothing below imports it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig

from mchad.cli import FILE_ONLY, show_tracebacks
from mchad.errors import Preempted, UserError
from mchad.failures import FAILED_FILE, one_line, record_failure
from mchad.runs.instantiate import discard_unstarted_run

log = logging.getLogger(__name__)


def _console_logging_only() -> None:
    """DDP ranks > 0 log to the console only: Hydra opened a log file in the run folder for
    every process (Lightning's children name theirs ``train_ddp_process_<rank>.log``), which
    belongs to rank 0 alone."""
    import logging as logging_module

    root = logging_module.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging_module.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
        path = Path(handler.baseFilename)
        if path.name.startswith("train_ddp_process_") and path.is_file() and path.stat().st_size == 0:
            path.unlink()  # a child's own, still empty file (rank 0's file is left to rank 0)


def _multirun_trial() -> DictConfig | None:
    """The Hydra config of this job when it is one trial of a multirun (``-m``), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def _refuse_unsafe_targets(cfg: DictConfig) -> None:
    """Stop before anything runs when a ``_target_`` is off the allow-list (mchad.targets),
    leaving no run folder behind: Hydra made one holding only its own files."""
    from mchad.targets import check_targets

    try:
        check_targets(cfg)
    except UserError as error:
        output_dir = Path(cfg.paths.output_dir)
        hydra_files = {".hydra", "run.log", f"{Path(sys.argv[0]).stem}.log"}
        if output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= hydra_files:
            shutil.rmtree(output_dir)
            with contextlib.suppress(OSError):  # the date folder, if this run was its only one
                output_dir.parent.rmdir()
        raise SystemExit(f"error: {one_line(error)}") from None


def main(cfg: DictConfig) -> float | None:
    """Hydra task: a user error ends the process with one line and exit status 1; Ctrl-C
    with one line saying how to resume (exit status 130); a preemption (SIGTERM, SIGUSR1:
    :mod:`mchad.runs.preemption`) likewise, saying ``preempted`` (exit status 143). A failed or
    stopped run writes its cause to ``<run folder>/FAILED.txt`` (removed again once the run,
    resumed, succeeds). Under DDP the first failing rank's cause is the one reported
    (:mod:`mchad.runs.rank_watch`).

    In a multirun (``-m``, e.g. in a Ray worker) a failing trial writes its cause to
    ``<trial>/FAILED.txt`` and returns, so the other trials go on (see mchad.sweeps.sweep); the
    trial returns its validation objective (mchad.runs.objective), which a search sweeper
    (``hydra/sweeper=optuna``) optimises, or None when it failed.
    """
    _refuse_unsafe_targets(cfg)  # before the heavy imports: nothing of the run starts
    from mchad.runs import preemption, rank_watch
    from mchad.runs.train import run
    from mchad.sweeps.sweep import run_trial

    preemption.install()
    trial = _multirun_trial()
    if trial is not None:
        from mchad.cli import trial_console
        from mchad.runs.objective import trial_objective
        from mchad.sweeps.sweep import in_ray_worker, report_trial

        trial_console()  # the trial's messages and tables go to its run.log only
        summary = run_trial(cfg, trial.runtime.output_dir, cwd=trial.runtime.cwd)
        if not in_ray_worker():  # a Ray trial's line is printed by the driver (mchad.sweeps.sweep.collect_trials)
            report_trial(trial.job.num, list(trial.overrides.task), trial.runtime.output_dir)
        return trial_objective(summary)
    from mchad.distributed import is_launch_rank_zero

    writer = is_launch_rank_zero()  # DDP: rank 0 writes FAILED.txt and prints the one error line
    if not writer:
        _console_logging_only()
    output_dir = Path(cfg.paths.output_dir)
    try:
        with preemption.armed():
            run(cfg)
    except (KeyboardInterrupt, Preempted) as stop:
        preempted = isinstance(stop, Preempted)
        code = preemption.EXIT_PREEMPTED if preempted else preemption.EXIT_INTERRUPTED
        if not writer:
            raise SystemExit(code) from None
        from mchad.checkpoints import LAST_CHECKPOINT

        what = f"preempted by {stop.signal_name}" if preempted else "interrupted"
        message = f"{what}; {preemption.resume_hint(output_dir, (output_dir / LAST_CHECKPOINT).is_file())}"
        record_failure(output_dir, message)
        log.warning("%s", message, extra=FILE_ONLY)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except Exception as error:  # noqa: BLE001 - reported below, then the process ends
        peer = rank_watch.announce(error)  # DDP: the others stop too; a peer's earlier failure is the cause
        if peer is not None and not isinstance(error, UserError):
            if writer:
                record_failure(output_dir, peer)
                log.error("%s", peer, extra=FILE_ONLY)
            raise SystemExit(f"error: {peer}" if writer else 1) from None
        if not isinstance(error, UserError):  # a bug: its cause and traceback in FAILED.txt, then raised on
            if writer:
                record_failure(output_dir, error)
                raise
            traceback.print_exc()  # the other ranks: the traceback, but rank 0 prints the one error line
            raise SystemExit(1) from None
        if not writer:  # every rank stops with status 1
            log.error("%s", one_line(error))
            raise SystemExit(1) from None
        discard_unstarted_run(output_dir)  # an input error before the run produced anything: only FAILED.txt
        cause = record_failure(output_dir, error)
        log.error("%s", cause, extra=FILE_ONLY)  # run.log; the console gets the one line below
        if show_tracebacks():
            traceback.print_exc()
        raise SystemExit(f"error: {cause}") from None
    if writer:
        (output_dir / FAILED_FILE).unlink(missing_ok=True)  # e.g. an interrupted run, resumed
