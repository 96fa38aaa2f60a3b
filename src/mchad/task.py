"""``run.py``'s Hydra task: one run or one trial of a sweep, and how a run ends.

The top level above the orchestration: it calls :func:`mchad.runs.train.run` (one run) or
:func:`mchad.sweeps.sweep.run_trial` (one trial of a multirun), and nothing below imports it.

How one run ends is decided here alone, in :func:`task_wrapper` (in the style of
lightning-hydra-template's ``task_wrapper``); under DDP global rank zero prints the line and
writes ``<run folder>/FAILED.txt``, every other rank exits with the same status:

=========================  ====================================================  ==========================  ====
ending                     console (stderr)                                      FAILED.txt                  exit
=========================  ====================================================  ==========================  ====
success                    the results table (:mod:`mchad.runs.train`)           removed                     0
user error (UserError)     ``error: <cause>``                                    ``error: <cause>``          1
another rank's failure     ``error: rank <r> failed: <cause>``                   the same line               1
crash (any other error)    its traceback, ``error: internal error, a bug (...)``  the line and the traceback  1
                           (:func:`mchad.cli.guard`)
preemption (SIGTERM/USR1)  ``preempted by SIGTERM; continue this run with: ...``  the same line               143
Ctrl-C                     ``interrupted; continue this run with: ...``          the same line               130
=========================  ====================================================  ==========================  ====

A rank that sees another rank's failure while blocked in a collective is ended by
:mod:`mchad.runs.rank_watch` with the same line, FAILED.txt and status. A sweep trial does not
end its process: :func:`mchad.sweeps.sweep.run_trial` writes its FAILED.txt and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mchad.cli import FILE_ONLY, show_tracebacks
from mchad.errors import Preempted, UserError, one_line
from mchad.failures import FAILED_FILE, record_failure
from mchad.runs.collector import import_heavy
from mchad.runs.instantiate import discard_unstarted_run

log = logging.getLogger(__name__)


def _console_logging_only() -> None:
    """DDP ranks > 0 log to the console only: Hydra opened a log file in the run folder for
    every process (Lightning's children name theirs ``train_ddp_process_<rank>.log``), which
    belongs to rank 0 alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
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
    """Hydra task: one run (:func:`task_wrapper` decides how it ends), or one trial of a
    multirun (``-m``, e.g. in a Ray worker): a failing trial writes its cause to
    ``<trial>/FAILED.txt`` and returns, so the other trials go on (see mchad.sweeps.sweep); the
    trial returns its validation objective (mchad.runs.objective), which a search sweeper
    (``hydra/sweeper=optuna``) optimises, or None when it failed.
    """
    _refuse_unsafe_targets(cfg)  # before the heavy imports: nothing of the run starts
    from mchad.runs import preemption

    preemption.install()
    trial = _multirun_trial()
    if trial is not None:
        return _trial(cfg, trial)
    _one_run(cfg)
    return None


def _trial(cfg: DictConfig, trial: DictConfig) -> float | None:
    from mchad.cli import trial_console
    from mchad.runs.objective import trial_objective
    from mchad.sweeps.sweep import in_ray_worker, report_trial, run_trial

    import_heavy("mchad.runs.train")  # run_trial's imports; the first trial of a process makes them
    trial_console()  # the trial's messages and tables go to its run.log only
    summary = run_trial(cfg, trial.runtime.output_dir, cwd=trial.runtime.cwd)
    if not in_ray_worker():  # a Ray trial's line is printed by the driver (mchad.sweeps.sweep.collect_trials)
        report_trial(trial.job.num, list(trial.overrides.task), trial.runtime.output_dir)
    return trial_objective(summary)


def task_wrapper(task: Callable[[DictConfig], object]) -> Callable[[DictConfig], None]:
    """How a run ends (the table in this module's docstring): ``task(cfg)`` runs, and its
    outcome becomes the console line, ``<cfg.paths.output_dir>/FAILED.txt`` and the exit status."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> None:
        from mchad.distributed import is_launch_rank_zero

        output_dir = Path(cfg.paths.output_dir)
        rank_zero = is_launch_rank_zero()  # DDP: global rank zero writes FAILED.txt and prints the one line
        if not rank_zero:
            _console_logging_only()
        try:
            task(cfg)
        except (KeyboardInterrupt, Preempted) as stop:
            raise _stopped(stop, output_dir, rank_zero) from None
        except Exception as error:  # noqa: BLE001 - every failure ends here, in one of the ways below
            ending = _failed(error, output_dir, rank_zero)
            if ending is None:  # a crash: raised on, mchad.cli.guard prints its traceback and one line
                raise
            raise ending from None
        if rank_zero:
            (output_dir / FAILED_FILE).unlink(missing_ok=True)  # e.g. an interrupted run, resumed

    return wrapped


def _stopped(stop: KeyboardInterrupt | Preempted, output_dir: Path, rank_zero: bool) -> SystemExit:
    """A preemption or Ctrl-C: how to continue the run, on the console and in FAILED.txt."""
    from mchad.runs import preemption

    preempted = isinstance(stop, Preempted)
    code = preemption.EXIT_PREEMPTED if preempted else preemption.EXIT_INTERRUPTED
    if not rank_zero:
        return SystemExit(code)
    from mchad.checkpoints import LAST_CHECKPOINT

    what = f"preempted by {stop.signal_name}" if preempted else "interrupted"
    message = f"{what}; {preemption.resume_hint(output_dir, (output_dir / LAST_CHECKPOINT).is_file())}"
    record_failure(output_dir, message)
    log.warning("%s", message, extra=FILE_ONLY)
    print(message, file=sys.stderr, flush=True)
    return SystemExit(code)


def _failed(error: Exception, output_dir: Path, rank_zero: bool) -> SystemExit | None:
    """A failure: the SystemExit that ends the process, None for a crash raised on."""
    from mchad.runs import rank_watch

    other_rank = rank_watch.announce(error)  # DDP: the others stop too; an earlier failure of another rank is the cause
    if other_rank is not None and not isinstance(error, UserError):
        if rank_zero:
            record_failure(output_dir, other_rank)
            log.error("%s", other_rank, extra=FILE_ONLY)
        return SystemExit(f"error: {other_rank}" if rank_zero else 1)
    if not isinstance(error, UserError):  # a crash: its cause and traceback in FAILED.txt
        if rank_zero:
            record_failure(output_dir, error)
            return None
        traceback.print_exc()  # the other ranks: the traceback, but rank zero prints the one error line
        return SystemExit(1)
    if not rank_zero:  # every rank stops with status 1
        log.error("%s", one_line(error))
        return SystemExit(1)
    discard_unstarted_run(output_dir)  # an input error before the run produced anything: only FAILED.txt
    cause = record_failure(output_dir, error)
    log.error("%s", cause, extra=FILE_ONLY)  # run.log; the console gets the one line of the SystemExit
    if show_tracebacks():
        traceback.print_exc()
    return SystemExit(f"error: {cause}")


@task_wrapper
def _one_run(cfg: DictConfig) -> None:
    _check_before_imports(cfg)
    from mchad.runs import preemption

    import_heavy("mchad.runs.train")
    from mchad.runs.train import run

    with preemption.armed():
        run(cfg)


def _check_before_imports(cfg: DictConfig) -> None:
    """A fresh run's config mistakes (:func:`mchad.runs.validate.check_config`) before torch and
    Lightning are imported: one line after 0.6 s instead of 4.4 s. Not for a run that takes its
    config from a checkpoint or an earlier run (resume, train=false, ckpt_path), nor in a
    folder with an earlier results.csv (the run removes that first; mchad.runs.train.start)."""
    from mchad.runs.validate import check_config

    if cfg.get("resume") or cfg.get("ckpt_path") or not cfg.get("train", True):
        return
    if (Path(cfg.paths.output_dir) / "results.csv").exists():
        return
    check_config(cfg)  # run_config checks the run's config again, the data's class count filled in
