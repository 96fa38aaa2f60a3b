"""What the DDP rank-failure watchdog (:mod:`mchad.runs.rank_watch`) costs per training step.

``python -m mchad.bench.rank_watch [--steps 300] [--repeats 3]``: two CPU processes (gloo, a
TCPStore as Lightning starts them) train a small MLP with DistributedDataParallel; blocks of
``steps`` steps alternate without and with the watchdog, and each block's median step time is
printed, with the time of one look at the store (what the watchdog does every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _rank(rank: int, world_size: int, port: int, steps: int, repeats: int, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from torch.distributed.distributed_c10d import _get_default_store

    from mchad.runs import rank_watch

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))  # cpu: gloo benchmark, the model is on the CPU
    store = _get_default_store()

    def block() -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        torch.distributed.barrier()
        return statistics.median(times)

    block()  # warm-up
    results = {"off": [], "on": []}
    for _ in range(repeats):
        results["off"].append(block())
        rank_watch.start(store, rank, None)
        results["on"].append(block())
        rank_watch.finish()
        rank_watch._WATCH.thread.join()
    polls = []
    for _ in range(200):
        start = time.perf_counter()
        store.check([rank_watch.KEY])
        polls.append(time.perf_counter() - start)
    results["poll"] = statistics.median(polls)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(2, port, args.steps, args.repeats, out), nprocs=2, start_method="spawn")
        rank0 = json.loads(Path(out, "rank0.json").read_text())
    off, on = rank0["off"], rank0["on"]
    print(
        f"median step time (ms), {args.steps} steps per block, rank 0: without watchdog "
        f"{' '.join(f'{t * 1e3:.3f}' for t in off)}; with {' '.join(f'{t * 1e3:.3f}' for t in on)}"
    )
    print(
        f"difference of the medians: {(statistics.median(on) - statistics.median(off)) * 1e3:+.3f} ms per step "
        f"({(statistics.median(on) / statistics.median(off) - 1) * 100:+.1f} %); one look at the store "
        f"{rank0['poll'] * 1e6:.0f} us (every 0.5 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
