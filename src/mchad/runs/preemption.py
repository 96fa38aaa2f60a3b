"""A preempted run stops cleanly and says so: SIGTERM or SIGUSR1 -> ``Preempted`` -> exit 143.

Clusters preempt a job by SIGTERM (SLURM at the end of its time or when preempting, then
SIGKILL after its grace period; Kubernetes, spot instances alike); ``sbatch --signal=USR1@120``
warns a job with SIGUSR1 ahead of time. :func:`install` (``mchad.task.main``) makes both signals
a preemption:

- inside ``trainer.fit``/``test``, Lightning's own SIGTERM handling stops at the next batch
  boundary on every rank (it forwards the signal to the processes it started and broadcasts
  rank 0's decision); the handler here only remembers the signal, and a SIGUSR1 is handed to
  Lightning's SIGTERM handler. :func:`mchad.runs.train.run` turns Lightning's stop into
  :class:`~mchad.errors.Preempted`;
- elsewhere inside a run (:func:`armed`: loading data, building the model, between fit and
  test) the handler raises :class:`~mchad.errors.Preempted` at once; outside a run (a sweep
  between two trials, Hydra's own work) it only remembers the signal, and the next run stops
  before it starts.

The task writes ``FAILED.txt`` (``error: preempted by SIGTERM; continue this run with: ...``)
and exits with :data:`EXIT_PREEMPTED`, distinct from a failure (1) and from Ctrl-C
(:data:`EXIT_INTERRUPTED`). Once a process was preempted, the trials a sweep would still start
in it stop before training (:func:`received`).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mchad.errors import Preempted

log = logging.getLogger(__name__)

#: a preempted run or sweep (128 + SIGTERM, as a shell reports a process ended by SIGTERM)
EXIT_PREEMPTED = 143
#: Ctrl-C (128 + SIGINT)
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: str | None = None
_armed = False


def received() -> str | None:
    """The name of the first preemption signal this process received (``"SIGTERM"``), else None."""
    return _received


def reset() -> None:
    """Forget a received signal (tests)."""
    global _received
    _received = None


def _on_signal(signum: int, frame) -> None:
    global _received
    name = signal.Signals(signum).name
    if _received is None:
        _received = name
        log.warning("received %s: stopping (preempted)", name)
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_signal:  # Lightning's handling is not active: stop here and now
        if _armed:
            raise Preempted(_received)
        return
    if signum != signal.SIGTERM and callable(current):
        current(signal.SIGTERM, frame)  # Lightning's SIGTERM handler (it calls this one again)


@contextmanager
def armed() -> Iterator[None]:
    """A run: a preemption signal received before or during it raises :class:`Preempted`."""
    global _armed
    if _received is not None:
        raise Preempted(_received)
    _armed = True
    try:
        yield
    finally:
        _armed = False


def install() -> dict:
    """Handle SIGTERM and SIGUSR1 as a preemption in this process (main thread only; elsewhere a
    no-op). Returns the previous handlers, for :func:`restore`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not _on_signal:
            previous[signum] = handler
            signal.signal(signum, _on_signal)
    return previous


def restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def resume_hint(output_dir, has_checkpoint: bool) -> str:
    """The line a stopped run ends with: how to continue it."""
    import shlex

    if has_checkpoint:
        return f"continue this run with: python run.py resume={shlex.quote(str(output_dir))}"
    return "it stopped before its first epoch ended (no checkpoint to resume from); start it again"


def cluster_plugins() -> list:
    """On SLURM, Lightning's cluster environment with its auto-requeue off.

    Ours instead (docs/preemption.md): Lightning's requeue saves a mid-epoch ``hpc_ckpt_*.ckpt``
    on SIGUSR1 and calls ``scontrol requeue`` itself; a mid-epoch checkpoint does not resume
    exactly (the batch order and RNG states are kept at epoch boundaries, see
    :class:`mchad.runs.rng_state.RNGState`), and the requeued job would compose a new run folder and
    never find it. Here a preemption stops at a batch boundary, the run folder says
    ``preempted``, the exit status (143) tells the job script, and ``resume=`` or the same sweep
    command continues from ``last.ckpt``. Never both: with auto-requeue on, SIGUSR1 would also be
    Lightning's.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
