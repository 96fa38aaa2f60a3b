"""DDP: when one rank fails, every rank stops within seconds, with that rank's cause.

Without this, the other ranks wait in their next collective (the gradient all-reduce, Lightning's
per-step broadcast) for the failed one: with NCCL until the process group's timeout (30 min),
with gloo until the failed process has exited, and then each reports its own "Connection closed
by peer" instead of the cause.

Design: a flag in the process group's key-value store (the TCPStore every launch already has),
and a watchdog thread on every rank.

- The first rank to fail writes ``rank <r> failed: <cause>`` there (``compare_set``: only the
  first failure is kept) -- from Lightning's ``on_exception`` hook, before its teardown, and again
  from the task's error handling (:func:`announce`, for failures outside fit/test).
- Every rank's watchdog looks for the flag every :data:`POLL_S` seconds (one round trip to the
  store; the training step itself does nothing more). A rank that sees another rank's failure stops its
  process at once (``os._exit``: its main thread may be blocked inside a collective, where no
  Python exception can reach it); global rank zero first writes the cause to ``FAILED.txt`` and
  prints it as the one ``error:`` line. A rank whose own exception came from another rank's failure
  (gloo: connection closed) reports that rank's cause instead (:func:`announce`).
- The store lives in rank 0's process (or torchrun's agent): when it can no longer be reached,
  rank 0's process is gone; a rank that has not finished within :data:`GRACE_S` then stops too.
- :func:`finish` after the last collective of a run (the end of testing) stops the watchdog.

:class:`mchad.runs.train.RankFailureWatch` (a Lightning callback) starts it once the process group
exists. No torch or Lightning is imported here.

Why not only the launchers' own handling (``python tests/rank_failure_launchers.py``: the
quick-start, 2 CPU processes over gloo, rank 0 or 1 raising at step 5, with and without this
watchdog; the shared 2-core machine, load average 4-9; seconds from the failure until the last
process was gone, 2-4 runs each):

==========================  ============================  ===================================
launcher, failing rank      with the watchdog             without
==========================  ============================  ===================================
Lightning's, rank 1         1.0, 3.5, 3.6, 40.8 s (load)  2.2, 9.3 s
Lightning's, rank 0         1.1, 3.7 s                    2.2, 6.7 s
torchrun, rank 1            0.7, 1.9 s                    1.5, 11.1 s
torchrun, rank 0            3.9, 1.8 s                    13.6, 4.2 s
==========================  ============================  ===================================

Every process stops and the status is 1 either way: Lightning's subprocess launcher SIGKILLs its
children when rank 0 raises and, when a child exits non-zero, its ``_ChildProcessObserver``
(polling every 5 s) SIGKILLs every process, rank 0 included; torchrun's agent ends the group; and
gloo fails a collective whose peer has exited. What only this watchdog does: (1) when rank 1
fails, the console line and FAILED.txt give its cause (``rank 1 failed: ValueError: ...``);
without it rank 0 reports its own ``RuntimeError: ... Connection closed by peer`` as a bug, and
under Lightning's launcher a rank 0 killed by the observer (NCCL: no error of its own) writes
nothing at all; (2) a failed rank that does not exit (stuck in an NCCL call, as in
``tests/test_ddp.py::test_a_failing_rank_stops_a_rank_waiting_in_a_collective_with_its_cause``)
ends a rank 0 waiting in an all-reduce within the 0.5 s poll, where no launcher notices anything
until NCCL's 30-minute timeout. Not measured here: NCCL on several GPUs, and ``srun``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from mchad.errors import one_line
from mchad.failures import record_failure

log = logging.getLogger(__name__)

KEY = "mchad/first_failure"
#: seconds between two looks at the store
POLL_S = 0.5
#: seconds a rank may still take to finish once the store (rank 0's process) is gone
GRACE_S = 10.0
#: exit status of a rank stopped because another one failed
EXIT_PEER_FAILED = 1


class _Watch:
    def __init__(self, store, rank: int, output_dir: Path | None) -> None:
        self.store, self.rank, self.output_dir = store, rank, output_dir
        self.finished = threading.Event()  # this rank is done (finished, or reports on its own)
        self.lock = threading.Lock()
        self.stopping = False  # the watchdog is ending the process
        self.other_cause: str | None = None  # another rank failed first: its cause
        self.thread = threading.Thread(target=self._run, name="mchad-rank-watch", daemon=True)

    def _run(self) -> None:
        while not self.finished.wait(POLL_S):
            try:
                if not self.store.check([KEY]):
                    continue
                cause = self.store.get(KEY).decode()
            except Exception:  # noqa: BLE001 - the store is unreachable: rank 0's process ended
                if self.finished.wait(GRACE_S):
                    return
                cause = "rank 0's process ended before this rank finished"
            if cause.startswith(f"rank {self.rank} "):
                return  # this rank's own failure: its main thread reports it
            self._stop(cause)
            return

    def _stop(self, cause: str) -> None:
        with self.lock:
            if self.finished.is_set():
                return
            self.stopping = True
        if self.output_dir is not None:  # global rank zero
            record_failure(self.output_dir, cause)
            log.error("%s", cause, extra={"file_only": True})  # run.log only (mchad.cli.FILE_ONLY)
            print(f"error: {cause}", file=sys.stderr, flush=True)
        else:
            log.error("stopping: %s", cause)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(EXIT_PEER_FAILED)


_WATCH: _Watch | None = None


def start(store, rank: int, output_dir: Path | None) -> None:
    """Watch for another rank's failure (``output_dir``: rank 0's run folder, None on the others)."""
    global _WATCH
    if _WATCH is not None and not _WATCH.finished.is_set():
        return  # fit, then test: one watchdog
    _WATCH = _Watch(store, rank, output_dir)
    _WATCH.thread.start()


def announce(error: BaseException | str) -> str | None:
    """Record this rank's failure unless another rank failed first; returns that rank's cause if
    one did (None if this rank's failure is the first, or no watchdog runs). From now on this
    rank's main thread reports the failure, not the watchdog."""
    watch = _WATCH
    if watch is None:
        return None
    with watch.lock:
        if watch.stopping:  # the watchdog is ending the process with another rank's cause
            threading.Event().wait()
        watch.finished.set()
    if watch.other_cause is not None:
        return watch.other_cause
    cause = f"rank {watch.rank} failed: {one_line(error)}"
    try:
        first = watch.store.compare_set(KEY, "", cause).decode()
    except Exception:  # noqa: BLE001 - store gone: rank 0's process ended, its cause is its own
        return None
    if first != cause:
        watch.other_cause = first
    return watch.other_cause


def finish() -> None:
    """This rank is past its last collective: stop watching."""
    if _WATCH is not None:
        _WATCH.finished.set()
