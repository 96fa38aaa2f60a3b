"""Section (d): seconds from ``python run.py`` to its first training step, the heaviest imports,
and what CUDA's own start costs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from mchad.bench.common import REPO


# --- (d) start-up -------------------------------------------------------------------------------------
def startup(overrides: list[str], repeats: int, workdir: Path) -> tuple[list[float], dict]:
    times, cpu, info = [], [], {}
    phases = {"to Trainer.fit": [], "sanity validation": [], "rest of fit set-up": []}
    for r in range(repeats):
        out = workdir / f"probe{r}.json"
        command = [
            sys.executable,
            str(REPO / "run.py"),
            *overrides,
            f"hydra.run.dir={workdir}/run{r}",
            "+callbacks.bench_probe._target_=mchad.bench.common.first_step_probe",
            f"+callbacks.bench_probe.out={out}",
        ]
        t0 = time.time()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"start-up run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        info = json.loads(out.read_text())
        times.append(info["time"] - t0)
        cpu.append(info["cpu_seconds"])
        phases["to Trainer.fit"].append(info["fit"] - t0)
        sanity = info.get("sanity_end", info["fit"]) - info.get("sanity_start", info["fit"])
        phases["sanity validation"].append(sanity)
        phases["rest of fit set-up"].append(info["time"] - info["fit"] - sanity)
    info["cpu"] = cpu
    info["phases"] = phases
    return times, info


def import_times(module: str = "mchad.runs.train", top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """Total and heaviest top-level imports of ``module`` (``python -X importtime``), seconds,
    imported as a run imports it: with the garbage collector paused (mchad.runs.collector)."""
    code = f"import gc; gc.disable(); import {module}"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        try:
            rows.append((name.rstrip(), int(cumulative) / 1e6))
        except ValueError:
            continue
    total = next((t for n, t in rows if n.strip() == module), float("nan"))
    depth1 = [(n.strip(), t) for n, t in rows if len(n) - len(n.lstrip()) == 3]  # " " + 2 per level
    return total, sorted(depth1, key=lambda r: -r[1])[:top]


# --- (d) what CUDA's own start costs --------------------------------------------------------------------
FIRST_USE = r"""
import json, sys, time
device = sys.argv[1]
marks = [time.perf_counter()]
import torch
marks.append(time.perf_counter())
if device == "cuda":
    torch.cuda.init()  # no synchronize before: it would create the context here
marks.append(time.perf_counter())
def mark():
    if device == "cuda":
        torch.cuda.synchronize()
    marks.append(time.perf_counter())
a = torch.randn(256, 256, device=device)
a @ a
mark()
x, w = torch.randn(8, 3, 32, 32, device=device), torch.randn(16, 3, 3, 3, device=device)
torch.nn.functional.conv2d(x, w, padding=1)
mark()
names = ("import torch", "torch.cuda.init()", "first matmul", "first conv")
print(json.dumps(dict(zip(names, [b - a for a, b in zip(marks, marks[1:])]))))
"""


def first_use_seconds(device: str = "cuda") -> dict[str, float]:
    """Seconds of ``import torch``, ``torch.cuda.init()``, a first small matmul (CUDA context and
    cuBLAS) and a first convolution (cuDNN) in a fresh process (cold), on ``device``; the CPU
    path exists to test this function without a GPU."""
    proc = subprocess.run([sys.executable, "-c", FIRST_USE, device], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"first use of {device} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])
