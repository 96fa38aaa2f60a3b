"""Measure: when one DDP rank raises, do the other ranks stop, how fast, and with which cause?

``python tests/rank_failure_launchers.py [--watch on off] [--launcher lightning torchrun] [--fail-rank 1 0]``
runs the quick-start on the CPU (gloo, 2 processes) with rank ``fail_rank`` raising at step 5
(tests/ddp_probe.py), under Lightning's own subprocess launcher (``trainer.devices=2``) and under
torchrun, with and without :mod:`mchad.runs.rank_watch` (``--watch off`` puts a
``sitecustomize`` on the path that makes ``rank_watch.start`` a no-op in every process), and
prints per case: the exit status, seconds from the failure until the last process was gone,
and the ``error:`` lines of the console. The figures are in rank_watch's docstring.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rank_failure_probe import gone

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

NO_WATCH = "import mchad.runs.rank_watch as w\nw.start = lambda *args, **kwargs: None\n"


def case(launcher: str, fail_rank: int, watch: bool, tmp: Path, timeout: float) -> str:
    logs, probe, site = tmp / "logs", tmp / "probe", tmp / "site"
    path = [str(TESTS), str(ROOT / "src")]
    if not watch:
        site.mkdir()
        (site / "sitecustomize.py").write_text(NO_WATCH)
        path.insert(0, str(site))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(path)}
    overrides = [
        f"paths.log_dir={logs}",
        f"hydra.run.dir={logs}/run",  # torchrun: the processes compose one run folder
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "~callbacks.validation_views",
        "~callbacks.embedding_animation",
        "~callbacks.test_plots",
        "+callbacks.probe._target_=ddp_probe.SampleProbe",
        "allowed_targets=[ddp_probe.*]",
        f"+callbacks.probe.out={probe}",
        f"+callbacks.probe.fail_rank={fail_rank}",
        "+callbacks.probe.fail_step=5",
    ]
    start = [sys.executable]
    if launcher == "torchrun":
        start += ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    command = [*start, str(ROOT / "run.py"), *overrides]
    process = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        stderr += "\n(timed out)"
    pids = [int((probe / f"pid{rank}").read_text()) for rank in (0, 1) if (probe / f"pid{rank}").exists()]
    deadline = time.time() + 30
    while not all(gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    ended = time.time()
    stuck = [pid for pid in pids if not gone(pid)]
    for pid in stuck:
        os.kill(pid, 9)
    failed = probe / f"failed{fail_rank}.time"
    seconds = f"{ended - float(failed.read_text()):.1f} s" if failed.exists() else "no failure"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return (
        f"{launcher:9} fail_rank={fail_rank} watch={'on ' if watch else 'off'} exit={process.returncode} "
        f"last process gone after {seconds}{' (still running: killed)' if stuck else ''}; "
        f"error lines: {errors or '[none]'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", nargs="+", default=["lightning", "torchrun"])
    parser.add_argument("--fail-rank", nargs="+", type=int, default=[1, 0])
    parser.add_argument("--watch", nargs="+", default=["on", "off"])
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args()
    for launcher in args.launcher:
        for fail_rank in args.fail_rank:
            for watch in args.watch:
                with tempfile.TemporaryDirectory() as tmp:
                    print(case(launcher, fail_rank, watch == "on", Path(tmp), args.timeout), flush=True)


if __name__ == "__main__":
    main()
