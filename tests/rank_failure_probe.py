"""One process of the rank-failure test (tests/test_ddp.py), in a module of its own so that the
spawned processes import only torch and the watchdog; and :func:`gone`, whether a process ended."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def failing_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """A gloo group over a TCPStore (as Lightning starts it): rank 1 fails at step 5 and then
    hangs instead of exiting (as a rank stuck in an NCCL call would), so only the watchdog can
    end rank 0, which waits in that step's all-reduce."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from torch.distributed.distributed_c10d import _get_default_store

    from mchad.runs import rank_watch

    rank_watch.start(_get_default_store(), rank, Path(out) if rank == 0 else None)
    value = torch.ones(1)
    for step in range(10):
        if rank == 1 and step == 5:
            Path(out, "failed.time").write_text(repr(time.time()))
            rank_watch.announce(ValueError("boom at step 5"))
            time.sleep(120)
        torch.distributed.all_reduce(value)
    Path(out, f"finished{rank}").write_text("")


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status
