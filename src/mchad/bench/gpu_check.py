"""Pieces of ``bash/gpu-check.sh``: a timing callback for its runs and its summary table.

``run_timer(out)`` is added to a run as ``+callbacks.gpu_check_timer._target_=mchad.bench.gpu_check.run_timer
+callbacks.gpu_check_timer.out=<file> +callbacks.gpu_check_timer.started=<epoch seconds>``; it
writes, at the end of testing, the seconds from ``started`` (the script's launch of
``run.py``) to the first training step, the training seconds (first step to the end of
training, validation included), the validation seconds, the training images seen and the
test seconds, with the device synchronised at each mark. With ``barrier=<folder>
parties=<K>`` (the packed trials of ``mchad.bench``) a trial reaching its first step waits
there until K trials have (files in the folder), and notes when it went on (``released``):
the K then train at the same time, whenever each one's start-up ended.

``python -m mchad.bench.gpu_check summary WORK`` prints one table of the runs below ``WORK``
(``WORK/<name>/timing.json``, ``results.csv``, ``gpu_util.txt``), the benchmark figures
(``WORK/bench.json``) and where the time of the check went (``WORK/phases.txt``).
``python -m mchad.bench.gpu_check bench WORK -- <mchad.bench arguments>`` runs the benchmark and keeps
its figures in ``WORK/bench.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

#: the budget of the whole check on one H200 (seconds)
BUDGET_S = 480


def _sync(pl_module) -> None:
    import torch

    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def wait_for_parties(folder: Path, parties: int, timeout: float = 300.0) -> float:
    """Add this process to ``folder`` and wait until ``parties`` processes have (or ``timeout``
    seconds passed: a trial that failed before must not hold the others); returns the time."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}-{time.time_ns()}").touch()
    deadline = time.time() + timeout
    while len(list(folder.iterdir())) < parties and time.time() < deadline:
        time.sleep(0.01)
    return time.time()


def run_timer(out: str, started: float | None = None, barrier: str | None = None, parties: int = 1):
    """The timing callback (a factory, so that Lightning is imported only when it is used)."""
    import pytorch_lightning as pl

    class RunTimer(pl.Callback):
        def __init__(self) -> None:
            self.marks = {"started": started if started is not None else time.time(), "images": 0, "validation_s": 0.0}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "first_step" not in self.marks:
                self.marks["first_step"] = time.time()
                if barrier:
                    self.marks["released"] = wait_for_parties(Path(barrier), parties)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.marks["images"] += len(batch[0])

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                _sync(pl_module)
                self._validation_start = time.time()

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                _sync(pl_module)
                self.marks["validation_s"] += time.time() - self._validation_start

        def on_train_end(self, trainer, pl_module):
            _sync(pl_module)
            self.marks["train_end"] = time.time()
            self.marks["device"] = str(pl_module.device)

        def on_test_start(self, trainer, pl_module):
            _sync(pl_module)
            self.marks["test_start"] = time.time()

        def on_test_end(self, trainer, pl_module):
            _sync(pl_module)
            self.marks["test_end"] = time.time()
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(self.marks))

    return RunTimer()


# ----------------------------------------------------------------------------- summary


def gpu_utilisation(path: Path, start: float, end: float) -> float | None:
    """Mean GPU utilisation (%) of the samples (``<epoch seconds> <percent>`` per line) in ``[start, end]``."""
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        parts = line.split()
        try:
            t, value = float(parts[0]), float(parts[1])
        except (IndexError, ValueError):  # nvidia-smi missing or an error line
            continue
        if start <= t <= end:
            values.append(value)
    return statistics.fmean(values) if values else None


def run_row(folder: Path) -> dict:
    """The summary of one run folder of the check."""
    row: dict = {"run": folder.name}
    timing_file = folder / "timing.json"
    if not timing_file.is_file():
        row["error"] = "no timing (the run failed; see its log)"
        return row
    marks = json.loads(timing_file.read_text())
    train_s = marks["train_end"] - marks["first_step"]
    row.update(
        first_step_s=marks["first_step"] - marks["started"],
        train_s=train_s,
        images_per_s=marks["images"] / max(train_s - marks["validation_s"], 1e-9),
        gpu_util=gpu_utilisation(folder / "gpu_util.txt", marks["first_step"], marks["train_end"]),
        test_s=marks["test_end"] - marks["test_start"],
        device=marks.get("device", "?"),
    )
    results = folder / "results.csv"
    if results.is_file():
        import pandas as pd

        frame = pd.read_csv(results)
        headline = frame[frame.score == frame.score.iloc[0]]
        row["accuracy"] = float(frame.Accuracy.iloc[0])
        row["score"] = str(frame.score.iloc[0])
        row["auroc"] = {str(r.test_case): float(r.AUROC) for r in headline.itertuples()}
    return row


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    cases = sorted({c for r in rows for c in r.get("auroc", {})})
    header = ["run", "device", "to 1st step s", "train s", "img/s", "GPU util %", "test s", "accuracy",
              *(f"AUROC {c}" for c in cases)]  # fmt: skip
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["run"], r["error"]])
            continue
        lines.append([
            r["run"], r["device"], _fmt(r["first_step_s"], ".1f"), _fmt(r["train_s"], ".1f"),
            _fmt(r["images_per_s"], ",.0f"), _fmt(r["gpu_util"], ".0f"), _fmt(r["test_s"], ".1f"),
            _fmt(r.get("accuracy"), ".4f"), *(_fmt(r.get("auroc", {}).get(c), ".4f") for c in cases),
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)


def phases(work: Path) -> list[tuple[str, float, int]]:
    """``(phase, seconds, exit status)`` from ``phases.txt`` (one ``name seconds status`` per line)."""
    out = []
    path = work / "phases.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, seconds, status = line.rsplit(maxsplit=2)
        out.append((name, float(seconds), int(status)))
    return out


def summary(work: Path) -> str:
    runs = sorted(p.parent for p in work.glob("*/run.log"))
    text = ["GPU check summary (" + str(work) + ")", table([run_row(folder) for folder in runs])]
    bench_file = work / "bench.json"
    if bench_file.is_file():
        text += bench_lines(json.loads(bench_file.read_text()))
    done = phases(work)
    if done:
        total = sum(seconds for _, seconds, _ in done)
        text.append("time: " + ", ".join(f"{name} {seconds:.0f} s" + (f" (exit {status})" if status else "")
                                         for name, seconds, status in done) + f"; total {total:.0f} s")  # fmt: skip
        if total > BUDGET_S:
            worst = max(done, key=lambda p: p[1])
            text.append(
                f"OVER BUDGET: {total:.0f} s > {BUDGET_S} s; the longest phase was {worst[0]} ({worst[1]:.0f} s)"
            )
    return "\n".join(text)


def _with_unit(value, spec: str, unit: str) -> str:
    return "n/a" if value is None else format(value, spec) + unit


def _mark(value, target: str, met: bool) -> str:
    return "" if value is None else f" [target {target}: {'MET' if met else 'MISSED'}]"


def bench_lines(b: dict) -> list[str]:
    """The benchmark's figures (``bench.json``) as summary lines; n/a where not measured."""
    nan = float("nan")
    lines = [
        "benchmark ({args}): Lightning {lightning:,.0f} img/s, bare loop {bare:,.0f} img/s, "
        "ratio {ratio:.3f}; ID + OOD test sets scored at {scoring:,.0f} img/s".format(
            **{"lightning": nan, "bare": nan, "ratio": nan, "scoring": nan, **b}
        )  # older files: n/a as nan
    ]
    util, syncs, cuda = b.get("gpu_util"), b.get("syncs"), b.get("cuda_start_s")
    sync_text = "n/a"
    if syncs:
        sync_text = (f"median {syncs['median']:g}, max {syncs['max']} over {syncs['steps']} steps, "
                     f"{syncs['outside_logging']} outside the logging steps")  # fmt: skip
    lines.append(
        f"GPU busy while the benchmark's Lightning steps ran: {_with_unit(util, '.0f', ' %')} (bare loop "
        f"{_with_unit(b.get('gpu_util_bare'), '.0f', ' %')}){_mark(util, '>= 80 %', util is not None and util >= 80)}; "
        f"host syncs per step: "
        f"{sync_text}{_mark(syncs, '0 outside logging steps', bool(syncs) and syncs['outside_logging'] == 0)}; "
        f"CUDA's own start: {_with_unit(cuda, '.2f', ' s')}"
    )
    packed = b.get("packed")
    if packed:
        ratio = packed["ratio"]
        line = (f"packed trials ({packed['way']}, {packed['k']} at once): alone {packed['alone']:,.0f} img/s, combined "
                f"{packed['combined']:,.0f} img/s, ratio {ratio:.2f}x{_mark(ratio, '>= 4x', ratio >= 4)}; seconds to "
                f"the first step: alone {packed['alone_first_step_s']:.1f}, packed median "
                f"{packed['first_step_s']:.1f}")  # fmt: skip
        row = b.get("row")
        if row:
            line += (f"; {row['seeds']}-seed sweep in {row['seconds']:.0f} s"
                     f"{_mark(row, '<= 180 s', row['seconds'] <= 180)}")  # fmt: skip
        lines.append(line)
    lines += [f"benchmark section failed: {error} (see bench.log)" for error in b.get("errors", [])]
    return lines


def figures(report: dict, argv: list[str]) -> dict:
    """What ``bench.json`` keeps of a :func:`mchad.bench.main` report (medians)."""
    med = statistics.median
    out: dict = {"args": " ".join(argv)}
    if "train" in report:
        train = report["train"]
        out.update(
            lightning=med(train["lightning"]),
            bare=med(train["bare"]),
            ratio=med(train["ratio"]),
            gpu_util=train["gpu_util"]["lightning"],
            gpu_util_bare=train["gpu_util"]["bare"],
        )
    if "syncs" in report:
        per = report["syncs"]["per_step"]
        out["syncs"] = {
            "median": med(per),
            "max": max(per),
            "steps": len(per),
            "outside_logging": report["syncs"]["outside_logging"],
            "locations": report["syncs"]["locations"],
        }
    if "eval" in report:
        out["scoring"] = med(report["eval"]["scoring"])
    if "cuda_start" in report:
        out["cuda_start_s"] = med(report["cuda_start"]["CUDA's own start"])
    if "packed" in report:
        p = report["packed"]
        out["packed"] = {
            "way": p["way"],
            "k": p["k"],
            "alone": p["alone"],
            "combined": p["combined"],
            "ratio": p["ratio"],
            "alone_first_step_s": p["alone_first_step_s"],
            "first_step_s": med(p["first_step_s"]),
            "gpu_util": p["gpu_util"],
        }
    if "row" in report:
        out["row"] = report["row"]
    if report.get("errors"):
        out["errors"] = [error.strip().splitlines()[0] for error in report["errors"]]
    return out


def bench(work: Path, argv: list[str]) -> int:
    """Run the benchmark, keep its figures; 1 when a section failed (its figures are missing)."""
    from mchad.bench import main as bench_main

    report = bench_main(argv)
    (work / "bench.json").write_text(json.dumps(figures(report, argv)))
    return 1 if report.get("errors") else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("summary", "bench"):
        print(
            "error: usage: python -m mchad.bench.gpu_check summary WORK | bench WORK -- <bench arguments>",
            file=sys.stderr,
        )
        return 1
    work = Path(argv[1])
    if argv[0] == "summary":
        print(summary(work))
        return 0
    return bench(work, [a for a in argv[2:] if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
