"""Completing a sweep: the same ``-m`` command again with ``hydra.sweep.dir=<its folder>``.

The default sweeper of ``python run.py -m`` (``config/hydra/sweeper/resumable.yaml``,
:class:`hydra_plugins.mchad_sweepers.sweepers.ResumableSweeper`) is Hydra's basic sweeper
whose launches go through :class:`LaunchPending`: before the first trial starts, every
trial of the sweep is composed and its folder looked at.

- A trial whose folder holds ``results.csv`` is done: it is listed and not launched, so
  no worker (Ray or the basic launcher) touches it.
- Its saved config (``<trial>/.hydra/config.yaml``, Hydra's composed config, interpolations
  unresolved) must equal the one the command now composes for that trial; otherwise the
  sweep is refused with one line naming the trial(s) and the differing keys, before anything
  runs.
- The other trials are launched together (in parallel under Ray), each into its own folder:
  a trial whose job number moves because done trials are left out gets its folder back with a
  ``hydra.sweep.subdir`` override (a hydra override: not part of its task config or
  ``overrides.yaml``), so ``hydra.job.num`` may differ from the folder name.

- A trial without ``results.csv`` but with ``checkpoints/last.ckpt`` (preempted, killed,
  failed) whose saved config equals the one composed now continues from that checkpoint
  (epoch, optimiser, scheduler, RNG states, logged steps), as ``resume=<trial folder>`` would:
  it is launched with ``++hydra.job.env_set.MCHAD_CONTINUE=<its last.ckpt>`` (read by
  :func:`mchad.sweeps.sweep.run_trial`; a hydra override, so the task config stays the same) and the
  report says ``#1 resumed from epoch 2 (2 of 4 epochs done, ...)``. A checkpoint that cannot
  be read, or a trial whose config changed since, is reported in one line and the trial starts
  over; its old ``checkpoints/`` is kept as ``checkpoints.discarded/``.

Other trials without ``results.csv`` (never started, or stopped before their first checkpoint)
are run from scratch. The counts (done before / run now) and the continued trials are kept per
sweep folder in this process for :class:`mchad.sweeps.sweep.SweepReport`; torch is imported only to
read a checkpoint to continue from.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from mchad.errors import ConfigError

#: the environment variable naming the checkpoint a continued trial starts from (read by
#: mchad.sweeps.sweep.run_trial)
CONTINUE_ENV = "MCHAD_CONTINUE"
log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
SAVED_CONFIG = Path(".hydra") / "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
DISCARDED = "checkpoints.discarded"
#: differing keys named per trial in the refusal (the rest are counted)
MAX_KEYS_SHOWN = 6

#: sweep folder (absolute) -> {"done": trials done before this command, "run_now": trials launched}
_COUNTS: dict[str, dict[str, int]] = {}
#: sweep folder (absolute) -> one line per trial continued or started over
_CONTINUED: dict[str, list[str]] = {}


@dataclass
class Trial:
    num: int
    overrides: list[str]
    dir: Path
    done: bool
    #: the checkpoint this trial continues from (None: it runs from the start)
    resume: Path | None = None
    #: what the report says about it (continued, or started over and why)
    note: str = ""


def has_results(sweep_dir: Path) -> bool:
    """Whether any trial folder below ``sweep_dir`` holds a results.csv or a checkpoint to
    continue from (else nothing to skip or continue)."""
    return sweep_dir.is_dir() and (any(sweep_dir.rglob(RESULTS_FILE)) or any(sweep_dir.glob(f"**/{LAST_CHECKPOINT}")))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested containers -> ``{"model.weight_center": 0.5, ...}``; lists stay whole values."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}.") if isinstance(value, dict) and value else {name: value})
    return flat


_ABSENT = "<absent>"


def config_differences(saved: dict, wanted: dict) -> list[str]:
    """Keys whose value differs (or that exist on one side only), as ``key (old -> new)``."""
    old, new = flatten(saved), flatten(wanted)
    return [
        f"{key} ({old.get(key, _ABSENT)} -> {new.get(key, _ABSENT)})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    ]


def task_config(job_config: DictConfig) -> dict:
    """The config a trial's task sees (Hydra's ``.hydra/config.yaml``): no ``hydra`` node, unresolved."""
    container = OmegaConf.to_container(job_config, resolve=False)
    container.pop("hydra", None)
    return container


def _differences_note(folder: Path, job_config: DictConfig) -> tuple[list[str], str]:
    """The keys in which ``folder``'s saved config differs from ``job_config`` and their text."""
    saved = folder / SAVED_CONFIG
    if not saved.is_file():
        return [f"no {SAVED_CONFIG}"], f"no {SAVED_CONFIG} to compare"
    differences = config_differences(OmegaConf.to_container(OmegaConf.load(saved)), task_config(job_config))
    shown = ", ".join(differences[:MAX_KEYS_SHOWN])
    more = f" and {len(differences) - MAX_KEYS_SHOWN} more" if len(differences) > MAX_KEYS_SHOWN else ""
    return differences, f"differs in {shown}{more}"


def continuation(num: int, folder: Path, job_config: DictConfig) -> tuple[Path | None, str]:
    """Whether trial ``num`` (no results.csv) continues from its ``checkpoints/last.ckpt``:
    ``(checkpoint, "#n resumed from epoch k ...")``, or ``(None, why it starts over)``, or
    ``(None, "")`` when it has no checkpoint."""
    ckpt = folder / LAST_CHECKPOINT
    if not ckpt.is_file():
        return None, ""
    differences, text = _differences_note(folder, job_config)
    if differences:
        return None, f"#{num} starts over: its config changed since its checkpoint ({text})"
    from mchad.checkpoints import load_checkpoint  # torch: only with a checkpoint to read
    from mchad.errors import CheckpointError

    try:
        state = load_checkpoint(ckpt, trust=bool(job_config.get("trust_checkpoint", False)))
    except CheckpointError as error:
        return None, f"#{num} starts over: {error}"
    done = int(state.get("epoch", -1)) + 1  # saved at an epoch's end: Lightning's 0-based index
    total = OmegaConf.select(job_config, "trainer.max_epochs", default=None, throw_on_resolution_failure=False)
    of = f" of {total}" if isinstance(total, int) else ""
    return ckpt.absolute(), f"#{num} resumed from epoch {done} ({done}{of} epochs done, {ckpt})"


def plan_trials(config_loader: Any, master_config: DictConfig, jobs: Sequence[Sequence[str]]) -> list[Trial]:
    """Compose every job (number = its position) and find its folder; refuse a done trial whose
    saved config differs from the one composed now (ConfigError, one line); find the checkpoint
    each unfinished trial continues from (:func:`continuation`)."""
    sweep_dir = Path(str(master_config.hydra.sweep.dir))
    trials, mismatches = [], []
    for num, overrides in enumerate(jobs):
        job_config = config_loader.load_sweep_config(master_config, list(overrides))
        with open_dict(job_config):
            job_config.hydra.job.num = num
        folder = sweep_dir / str(job_config.hydra.sweep.subdir)
        done = (folder / RESULTS_FILE).is_file()
        resume, note = None, ""
        if done:
            differences, text = _differences_note(folder, job_config)
            if differences:
                mismatches.append(f"{folder}: {text}" if not (folder / SAVED_CONFIG).is_file() else f"{folder} {text}")
        else:
            resume, note = continuation(num, folder, job_config)
        trials.append(Trial(num, list(overrides), folder, done, resume, note))
    if mismatches:
        raise ConfigError(
            f"sweep {sweep_dir}: finished trial(s) were run with another config than this command asks for: "
            + "; ".join(mismatches)
            + " (complete a sweep with the command that started it, or give another hydra.sweep.dir)"
        )
    return trials


def discard_checkpoints(folder: Path) -> None:
    """A trial that starts over: its old checkpoints out of the way (kept for a look), so that
    the new ones are not mixed with them."""
    import shutil

    old = folder / LAST_CHECKPOINT.parent
    if old.is_dir():
        shutil.rmtree(folder / DISCARDED, ignore_errors=True)
        old.rename(folder / DISCARDED)


def _override_value(text: str) -> str:
    """``text`` as a value of a Hydra command-line override (quoted unless plain)."""
    if re.fullmatch(r"[\w./-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class LaunchPending:
    """Wraps a sweeper's launcher: trials already done are left out (see the module docs)."""

    def __init__(self, launcher: Any, sweeper: Any) -> None:
        self.launcher = launcher
        self.sweeper = sweeper
        self.trials: list[Trial] | None = None

    def __getattr__(self, name: str) -> Any:  # anything else is the launcher's
        return getattr(self.launcher, name)

    def _plan(self) -> list[Trial] | None:
        config = self.sweeper.config
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        all_jobs = [job for batch in self.sweeper.overrides for job in batch]
        if not has_results(sweep_dir):
            record(sweep_dir, done=0, run_now=len(all_jobs))
            return None
        try:
            trials = plan_trials(self.sweeper.hydra_context.config_loader, config, all_jobs)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        done = [t for t in trials if t.done]
        for trial in done:
            log.info(
                "#%d done (%s): %s -- not run again", trial.num, trial.dir / RESULTS_FILE, " ".join(trial.overrides)
            )
        for trial in trials:
            if trial.note:
                (log.info if trial.resume is not None else log.warning)("%s", trial.note)
            if trial.note and trial.resume is None:
                discard_checkpoints(trial.dir)
        _CONTINUED[str(sweep_dir)] = [t.note for t in trials if t.note]
        log.info(
            "sweep %s: %d of %d trial(s) done before, %d to run",
            sweep_dir,
            len(done),
            len(trials),
            len(trials) - len(done),
        )
        record(sweep_dir, done=len(done), run_now=len(trials) - len(done))
        return trials

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from hydra.core.utils import JobReturn, JobStatus

        if self.trials is None and initial_job_idx == 0:
            self.trials = self._plan() or []
        if not self.trials:
            return self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        batch = self.trials[initial_job_idx : initial_job_idx + len(job_overrides)]
        pending = [t for t in batch if not t.done]
        returns: dict[int, Any] = {}
        if pending:
            first = pending[0].num
            launched = []
            for position, trial in enumerate(pending):
                overrides = list(trial.overrides)
                if trial.num != first + position:  # its job number moved: keep its own folder
                    subdir = trial.dir.relative_to(Path(str(self.sweeper.config.hydra.sweep.dir)))
                    overrides.append(f"hydra.sweep.subdir={_override_value(str(subdir))}")
                if trial.resume is not None:  # a hydra override: the task config stays the same
                    overrides.append(f"++hydra.job.env_set.{CONTINUE_ENV}={_override_value(str(trial.resume))}")
                launched.append(overrides)
            for trial, result in zip(pending, self.launcher.launch(launched, initial_job_idx=first), strict=True):
                returns[trial.num] = result
        from mchad.runs.objective import read_objective

        return [
            returns[t.num]
            if not t.done
            else JobReturn(
                overrides=t.overrides,
                working_dir=str(t.dir),
                status=JobStatus.COMPLETED,
                _return_value=read_objective(t.dir),
            )
            for t in batch
        ]


def record(sweep_dir: Path, done: int, run_now: int) -> None:
    _COUNTS[str(Path(sweep_dir).absolute())] = {"done": done, "run_now": run_now}


def add_continued(sweep_dir: Path, lines: list[str]) -> None:
    """More report lines on continued trials (e.g. a SLURM job requeued after a preemption)."""
    _CONTINUED.setdefault(str(Path(sweep_dir).absolute()), []).extend(lines)


def continued_lines(sweep_dir: Path) -> list[str]:
    """The report's lines on trials continued from a checkpoint or started over."""
    return list(_CONTINUED.get(str(Path(sweep_dir).absolute()), []))


def counts_note(sweep_dir: Path) -> str:
    """``"; 2 done before, 1 run now"`` for the sweep report, "" when no sweeper recorded counts."""
    counts = _COUNTS.get(str(Path(sweep_dir).absolute()))
    if counts is None:
        return ""
    return f"; {counts['done']} done before, {counts['run_now']} run now"
