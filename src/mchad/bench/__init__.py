"""Benchmark: is training and testing as fast as the hardware allows?

    python -m mchad.bench [--data auto|cifar10|synthetic] [--backbone convnet|wrn40-2]
                          [--batch-size 128] [--steps 32] [--repeats 11] [--device auto|cpu|cuda]
                          [--precision 32-true|bf16-mixed] [--channels-last auto|true|false]
                          [--compile false|true|MODE] [--eval-size 1000]
                          [--only train,data,eval,startup,packed] [--packed 8] [--packed-steps 100]
                          [--packing auto|processes|ray] [--packed-config bench|quickstart]
                          [--row-seeds N] [--work-dir DIR]

Prints, for the current machine, one model, data set, batch size and optimiser:

(a) training throughput (images/s) of run.py's Lightning path (``train.build``: the same
    ``OODDataModule`` + ``OODModel``, the configured loggers and callbacks, the trainer config)
    against a bare PyTorch loop in the same process (same data, transform, model, Adam, cosine
    schedule stepped per batch). The two alternate, repeat after repeat, so that a change of
    machine load hits both; target ratio >= 0.95. On a GPU also: its utilisation while the
    timed steps run (sampled every 0.1 s, :class:`UtilisationSampler`; target >= 80 %), and
    the host synchronisations per training step (``torch.cuda.set_sync_debug_mode("warn")``
    over ``--sync-steps`` steps after warm-up, with their source lines; target 0 outside
    Lightning's logging steps).
(b) the data pipeline alone (permutation, batch gather, transfer, crop + flip + normalise on
    the device) against the training throughput; target >= 10x.
(c) testing: seconds to score the ID test set and seven OOD sets and compute every metric
    (``trainer.test``), and that work alone.
(d) start-up: seconds from starting ``python run.py`` to its first training step (a probe
    callback stops the process there), for the quick-start and for the CIFAR-10 image folder;
    target <= 5 s. Split into the time to ``Trainer.fit`` (imports, Hydra, data set-up),
    Lightning's sanity validation (2 validation batches: model compute, which on a CPU is
    most of the difference between the two cases) and the rest. Also: is Ray imported, was
    anything decoded (or the uint8 cache used), and the heaviest imports (``python -X importtime``);
    on a GPU, what CUDA's own start costs in a fresh process (``torch.cuda.init()``, a first
    matmul, a first cuDNN convolution).
(e) packed trials (default on a GPU only; elsewhere ``--only ...,packed``): one short
    ``python run.py`` trial alone, then ``--packed`` K trials at once (distinct seeds), as K
    plain processes or one Ray sweep (``--packing``); each waits at its first step until all K
    got there, so that they train at the same time; their combined throughput (all their
    training images / from then to the end of the last one's training) against the one alone
    (target >= 4x for 8 trials on one GPU), each trial's seconds to its first step and the
    wall time from the first launch (``mchad.bench.gpu_check.run_timer``). ``--row-seeds N`` also times a whole
    N-seed sweep at the
    configuration's own length, K at once (the paper's 21-seed CIFAR-10 row: target <= 180 s
    on one H200).

Every timing is repeated; min and median are printed and the ratios are quoted. ``--data auto``
uses a CIFAR-10 image folder (``--root``, default ``../shared/data/cifar10-jpeg`` beside the
repository, or ``$MCHAD_BENCH_ROOT``) if it exists,
else synthetic uint8 images of CIFAR's shape (and size, unless ``--synthetic-size``), so the
benchmark runs anywhere offline.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from mchad.bench.common import DEFAULT_ROOT, REPO, compose, fmt, resolve_device, summary
from mchad.bench.gpu import UtilisationSampler, host_syncs
from mchad.bench.packed import packed_section
from mchad.bench.startup import first_use_seconds, import_times, startup
from mchad.bench.training import data_pipeline, evaluation, train_bare, train_lightning

# --- main -------------------------------------------------------------------------------------------
SECTIONS = ("train", "data", "eval", "startup", "packed")
#: (e) starts 1 + K runs of run.py: by default only where it measures something (a GPU)
DEFAULT_SECTIONS = ("train", "data", "eval", "startup")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The timed runs: data, model, sizes, device, repeats."""
    p.add_argument("--data", choices=["auto", "cifar10", "synthetic"], default="auto")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 image folder (train/ and test/)")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=50000,
        help="training images of --data synthetic (CIFAR's 50000; the test set a fifth of it)",
    )
    p.add_argument("--backbone", default="convnet", help="config/model/backbone: convnet, wrn40-2")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--data-batches", type=int, default=100, help="batches per repeat of (b)")
    p.add_argument("--eval-size", type=int, default=1000, help="images of the ID test set and of each OOD set")
    p.add_argument("--eval-repeats", type=int, default=2)
    p.add_argument("--startup-repeats", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", default="32-true", help="trainer.precision, e.g. bf16-mixed")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--compile", default="false", help="model.compile: false, true or a torch.compile mode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further run.py override, e.g. --set model.backbone.width=16 (repeatable)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); in (e), of every trial run as a process (0: the "
        "trial alone torch's default, each packed one its share of the cores)",
    )
    p.add_argument(
        "--sync-steps",
        type=int,
        default=20,
        help="(a), CUDA only: training steps whose host synchronisations are counted",
    )


def _add_section_arguments(p: argparse.ArgumentParser) -> None:
    """(e) packed trials, the sections chosen, where the runs are kept."""
    p.add_argument("--packed", type=int, default=8, metavar="K", help="(e): trials trained at once")
    p.add_argument("--packed-steps", type=int, default=100, help="(e): training steps of each trial")
    p.add_argument(
        "--packing",
        choices=["auto", "processes", "ray"],
        default="auto",
        help="(e): K plain processes, one Ray sweep (hydra/launcher=ray_gpu, or ray on a CPU), "
        "or auto = Ray if importable and on a GPU, else processes",
    )
    p.add_argument(
        "--packed-config",
        choices=["bench", "quickstart"],
        default="bench",
        help="(e): the trials' configuration: the benchmark's (cifar10-mchad, --data, --backbone, ...) "
        "or the quick-start's (digits)",
    )
    p.add_argument(
        "--row-seeds",
        type=int,
        default=0,
        metavar="N",
        help="(e): also time a whole N-seed sweep, K at once (0: off; the paper's CIFAR-10 row: 21)",
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections of {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)}, "
        "and packed on a GPU)",
    )
    p.add_argument(
        "--work-dir",
        default=None,
        help="keep the timed runs' folders and logs here (a new or empty folder; default: a temporary "
        "folder, removed at the end)",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mchad.bench", description=__doc__.split("\n\n")[0])
    _add_run_arguments(p)
    _add_section_arguments(p)
    args = p.parse_args(argv)
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        p.error(f"--work-dir {args.work_dir} is not empty (its runs would mix with this benchmark's)")
    unknown = set((args.only or "").split(",")) - {"", *SECTIONS}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    for name in ("packed", "packed_steps", "sync_steps", "synthetic_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.row_seeds < 0:
        p.error("--row-seeds must be 0 (off) or more")
    if args.data == "auto":
        args.data = "cifar10" if (Path(args.root) / "train").is_dir() else "synthetic"
    return args


def main(argv=None) -> dict:
    """Run the benchmark. Warnings and Lightning's info logging are quiet while it runs (the
    figures are the output) and restored afterwards (the tests call this in-process)."""
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (sets its loggers' levels on import: quiet them after)

    args = parse_args(argv)
    quiet = {
        "pytorch_lightning": logging.WARNING,
        "lightning": logging.WARNING,
        "lightning_fabric": logging.WARNING,
        "lightning.pytorch": logging.WARNING,
        "mchad": logging.ERROR,
    }
    levels = {name: logging.getLogger(name).level for name in quiet}
    try:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            return _main(args, argv if argv is not None else sys.argv[1:])
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _main(args, argv: list[str]) -> dict:
    import torch

    os.environ.setdefault("MCHAD_ROOT", str(REPO))
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report: dict = {}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mchad-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # a fresh folder per timed run: TensorBoard's projector warns when one is reused
        runs = (work / f"run{i}" for i in itertools.count())
        cfg = compose(args, next(runs))
        device = resolve_device(cfg)
        on_gpu = device.type == "cuda"
        gpu_index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        sections = set(args.only.split(",")) if args.only else {*DEFAULT_SECTIONS, *(("packed",) if on_gpu else ())}
        _print_header(args, argv, device, load)
        if "train" in sections:
            _training_section(args, runs, gpu_index, report)
            _host_syncs_section(args, runs, cfg, on_gpu, report)
        if "data" in sections:
            _data_section(args, runs, report)
        if "eval" in sections:
            _evaluation_section(args, runs, report)
        if "startup" in sections:
            _startup_section(args, work, on_gpu, report)
        if "packed" in sections:
            try:
                packed_section(args, work, on_gpu, gpu_index, report)
            except RuntimeError as error:  # keep the other sections' figures; the exit status says it failed
                report.setdefault("errors", []).append(str(error))
                print(f"    error: {str(error).strip()}", file=sys.stderr, flush=True)
        load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load average {load_end:.1f} at the end (other processes share these {os.cpu_count()} cores)")
        return report
    finally:  # run folders, checkpoints and logs of the timed runs, unless asked to keep them
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _met(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _print_header(args, argv: list[str], device, load: float) -> None:
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print("=" * 78)
    print("mchad benchmark:", " ".join(argv) or "(defaults)")
    print(
        f"machine: {gpu or 'CPU only'}; {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load:.1f} at start"
    )
    print(
        f"data: {args.data}"
        + (f" ({args.root})" if args.data == "cifar10" else " (uint8 3x32x32, 50k/10k)")
        + f"; backbone {args.backbone}; batch {args.batch_size}; Adam + cosine; precision {args.precision}; "
        f"device {device}; channels_last {args.channels_last}; compile {args.compile}"
    )
    print("=" * 78, flush=True)


def _training_section(args, runs, gpu_index: int | None, report: dict) -> None:
    """(a) run.py's Lightning path against the bare loop, alternating."""
    light, bare, light_windows, bare_windows = [], [], [], []

    def timed(train, rates, windows):
        rate, window = train(compose(args, next(runs)), args)
        rates.append(rate)
        windows.append(window)

    with UtilisationSampler(gpu_index) as sampler:
        for r in range(args.repeats):  # alternate (and swap who goes first), so that load changes hit both
            if r % 2:
                timed(train_bare, bare, bare_windows)
            timed(train_lightning, light, light_windows)
            if not r % 2:
                timed(train_bare, bare, bare_windows)
    ratios = [a / b for a, b in zip(light, bare, strict=True)]
    busy = sampler.median(light_windows)
    report["train"] = {"lightning": light, "bare": bare, "ratio": ratios,
                       "gpu_util": {"lightning": busy, "bare": sampler.median(bare_windows),
                                    "text": sampler.describe(light_windows)}}  # fmt: skip
    ratio = statistics.median(ratios)  # paired: each Lightning repeat with the bare one next to it
    of_medians = statistics.median(light) / statistics.median(bare)
    print(
        f"(a) training, {args.steps} steps x {args.batch_size} images after {args.warmup} warm-up steps, "
        f"{args.repeats} repeats"
    )
    print(f"    run.py Lightning path : {fmt(light, ' img/s')}")
    print(f"    bare PyTorch loop     : {fmt(bare, ' img/s')}")
    print(
        f"    ratio Lightning/bare  : {ratio:.3f} (median of the paired repeats "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); "
        f"ratio of the medians {of_medians:.3f}  [target >= 0.95: {_met(ratio >= 0.95)}]"
    )
    per_step = (args.batch_size / statistics.median(light) - args.batch_size / statistics.median(bare)) * 1e3
    print(f"    framework overhead    : {per_step:+.1f} ms per step", flush=True)
    print(
        f"    GPU busy, Lightning   : {sampler.describe(light_windows)}"
        + (f"  [target >= 80 %: {_met(busy >= 80)}]" if busy is not None else "")
    )
    print(f"    GPU busy, bare loop   : {sampler.describe(bare_windows)}", flush=True)


def _host_syncs_section(args, runs, cfg, on_gpu: bool, report: dict) -> None:
    """(a), CUDA only: host synchronisations per training step, with their source lines."""
    if not on_gpu:
        print("    host syncs per step   : n/a (CUDA only; the CPU test suite checks the step with an emulated device)")
        return
    warm = args.warmup + 3  # past the first steps' one-off work (compilation, CUDA graph capture)
    counter = host_syncs(compose(args, next(runs)), warm, args.sync_steps)
    per, logging_steps = counter.per_step or [float("nan")], counter.logging_steps  # nan: no step counted
    outside = sum(c for i, c in enumerate(per) if i not in logging_steps)
    report["syncs"] = {"per_step": per, "logging_steps": logging_steps, "outside_logging": outside,
                       "locations": dict(counter.locations)}  # fmt: skip
    print(
        f"    host syncs per step   : median {statistics.median(per):g}, max {max(per)} over {len(per)} steps "
        f"after {warm} warm-up steps; {sum(per)} in all, {outside} outside the logging steps "
        f"({', '.join(map(str, logging_steps)) or 'none'}; trainer.log_every_n_steps="
        f"{cfg.trainer.log_every_n_steps})  [target 0 outside logging steps: {_met(outside == 0)}]"
    )
    for where, n in counter.locations.most_common(8):
        print(f"      {n:4d} x {where}")


def _data_section(args, runs, report: dict) -> None:
    """(b) the data pipeline alone, against the training throughput."""
    rates = data_pipeline(compose(args, next(runs)), args, args.data_batches)
    report["data"] = rates
    reference = statistics.median(report["train"]["lightning"]) if "train" in report else None
    print(f"(b) data pipeline alone (permutation, gather, transfer, crop+flip+normalise), {args.data_batches} batches")
    print(f"    {fmt(rates, ' img/s')}")
    if reference:
        ratio = statistics.median(rates) / reference
        print(f"    ratio data/training   : {ratio:.1f}x  [target >= 10x: {_met(ratio >= 10)}]", flush=True)


def _evaluation_section(args, runs, report: dict) -> None:
    """(c) testing: scoring, metrics, the whole trainer.test."""
    ev = evaluation(compose(args, next(runs), eval_sets=True), args)
    report["eval"] = ev
    print(f"(c) testing: ID test set + {ev['cases']} OOD sets = {ev['images']:,} images, {ev['rows']} metric rows")
    print(f"    scoring               : {fmt(ev['scoring'], ' img/s')}")
    print(f"    scoring + all metrics : {fmt(ev['metrics'], ' s', 2)}")
    print(f"    whole trainer.test    : {fmt(ev['test_call'], ' s', 2)} (with the plotting callbacks)")
    if "train" in report:
        rate = statistics.median(ev["scoring"]) / statistics.median(report["train"]["lightning"])
        print(f"    scoring/training rate : {rate:.1f}x", flush=True)


def _startup_section(args, work: Path, on_gpu: bool, report: dict) -> None:
    """(d) ``python run.py`` to its first training step; CUDA's own start; the heaviest imports."""
    print("(d) start-up: `python run.py ...` to its first training step")
    cases = {"quick-start (digits)": []}
    if args.data == "cifar10":
        cases["CIFAR-10 image folder"] = [
            "experiment=cifar10-mchad",
            "datamodule=imagefolder",
            f"datamodule.root={args.root}",
            "testmodules=noise",
            f"model/backbone={args.backbone}",
            *args.set,
        ]
    report["startup"] = {}
    for name, overrides in cases.items():
        times, info = startup(overrides, args.startup_repeats, work / name.split()[0])
        report["startup"][name] = {"seconds": times, **info}
        _print_startup(name, times, info)
    if on_gpu:
        _cuda_start(args, report)
    else:
        print("    CUDA's own start: n/a (no GPU)")
    total, heavy = import_times()
    print(
        f"    `import mchad.runs.train` (python -X importtime): {total:.2f} s; heaviest: "
        + ", ".join(f"{n} {t:.2f}" for n, t in heavy[:6])
    )


def _print_startup(name: str, times: list[float], info: dict) -> None:
    lo, med = summary(times)
    print(f"    {name:22s}: {fmt(times, ' s', 2)}  [target <= 5 s: {_met(med <= 5)}]")
    print(f"    {'':22s}  CPU time of that process: {fmt(info['cpu'], ' s', 2)}")
    for phase, values in info["phases"].items():
        print(f"    {'':22s}  {phase:19s}: {fmt(values, ' s', 2)}")
    sanity = statistics.median(info["phases"]["sanity validation"])
    if sanity > 0.1:  # Lightning's 2 validation batches before training: model compute, not set-up
        rest = [t - v for t, v in zip(times, info["phases"]["sanity validation"], strict=True)]
        print(
            f"    {'':22s}  without the sanity validation: {fmt(rest, ' s', 2)}  "
            f"[target <= 5 s: {_met(statistics.median(rest) <= 5)}]"
        )
    print(
        f"    {'':22s}  Ray imported: {info['ray_imported']}; images decoded: {info['decoded_images']}; "
        f"uint8 cache files loaded: {info['cache_loads']}; also imported: {', '.join(info['imported'])}",
        flush=True,
    )


def _cuda_start(args, report: dict) -> None:
    """CUDA's own start, in fresh processes: cold, as at the start of a run."""
    costs = [first_use_seconds("cuda") for _ in range(args.startup_repeats)]
    report["cuda_start"] = {name: [c[name] for c in costs] for name in costs[0]}
    cuda_own = [sum(v for n, v in c.items() if n != "import torch") for c in costs]
    report["cuda_start"]["CUDA's own start"] = cuda_own
    print(
        "    CUDA's own start (torch.cuda.init() + first matmul + first cuDNN conv, fresh process): "
        f"{fmt(cuda_own, ' s', 2)}"
    )
    print("      " + "; ".join(f"{n} {statistics.median(v):.2f} s" for n, v in report["cuda_start"].items()
                               if n != "CUDA's own start"))  # fmt: skip


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
