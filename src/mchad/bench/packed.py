"""Section (e): K short trials on one device at once against one alone, and a whole seed row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mchad.bench.common import REPO, bench_overrides, fmt
from mchad.bench.gpu import UtilisationSampler

# --- (e) packed trials --------------------------------------------------------------------------------
TIMER_OVERRIDES = [
    "+callbacks.gpu_check_timer._target_=mchad.bench.gpu_check.run_timer",
    "+callbacks.gpu_check_timer.out=${paths.output_dir}/timing.json",
]


def barrier_overrides(folder: Path, parties: int) -> list[str]:
    """The trials wait at their first step until ``parties`` of them got there: the throughput
    then measures K trials training at once, not the spread of their start-ups (which is
    measured apart: seconds to the first step)."""
    return [f"+callbacks.gpu_check_timer.barrier={folder}", f"+callbacks.gpu_check_timer.parties={parties}"]


def trial_overrides(args, short: bool = True) -> list[str]:
    """run.py overrides of one trial of (e): the benchmark's configuration (or the quick-start's),
    short (one epoch of ``--packed-steps`` steps, one validation batch, small noise test sets)."""
    if args.packed_config == "quickstart":
        overrides = list(args.set)
    else:
        overrides = bench_overrides(args) + [
            f"datamodule.test_cases.{case}.n={args.eval_size}" for case in ("GaussianNoise", "UniformNoise")
        ]
    if short:
        overrides += [
            "trainer.min_epochs=1",
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={args.packed_steps}",
            "trainer.limit_val_batches=1",
        ]
    return overrides + ["trainer.enable_progress_bar=false"]


def share(total: float, k: int) -> str:
    """``total / k`` rounded down to Ray's resource precision (1e-4), so that k shares fit."""
    import math

    return f"{max(math.floor(total / k * 1e4) / 1e4, 1e-4):g}"


def packed_threads(args) -> int:
    """CPU threads of each packed trial run as a process: ``--threads``, else the trial's share
    of the cores (as a Ray trial of 1/K of the CPUs gets)."""
    return args.threads or max(1, (os.cpu_count() or 1) // args.packed)


def packing_way(requested: str, on_gpu: bool) -> str:
    import importlib.util

    if requested != "auto":
        return requested
    return "ray" if on_gpu and importlib.util.find_spec("ray") is not None else "processes"


def run_processes(commands: list[tuple[list[str], Path]], concurrency: int, threads: int | None = None) -> list[float]:
    """Run ``(command, log file)`` pairs, at most ``concurrency`` at once, each with ``threads``
    CPU threads (as a Ray trial of that CPU share would have); a failure raises with its log's
    tail. Returns each command's launch time (epoch seconds)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running, launched, failed = list(enumerate(commands)), [], [0.0] * len(commands), []
    while pending or running:
        while pending and len(running) < concurrency:
            i, (command, log) = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            launched[i] = time.time()
            handle = log.open("w")
            running.append(
                (
                    subprocess.Popen(
                        [*command, f"+callbacks.gpu_check_timer.started={launched[i]}"],
                        cwd=REPO,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    ),
                    handle,
                    log,
                )
            )
        time.sleep(0.05)
        for entry in [e for e in running if e[0].poll() is not None]:
            running.remove(entry)
            entry[1].close()
            if entry[0].returncode:
                failed.append(f"{entry[2]} (exit {entry[0].returncode}):\n{entry[2].read_text()[-2000:]}")
    if failed:
        raise RuntimeError("packed trial failed: " + "\n".join(failed))
    return launched


def multirun(overrides: list[str], seeds: int, k: int, on_gpu: bool, sweep_dir: Path) -> float:
    """One ``python run.py -m`` of ``seeds`` seeds on Ray, k trials at once (each 1/k of the GPU,
    or of the CPUs without one); returns its launch time. Fails unless every trial succeeded."""
    cores = os.cpu_count() or 1
    launcher = (
        ["hydra/launcher=ray_gpu", f"hydra.launcher.ray.remote.num_gpus={share(1, k)}"]
        if on_gpu
        else ["hydra/launcher=ray"]
    )
    # ray_gpu reserves 4 CPUs a trial: 8 trials would wait for 32 cores; give each 1/k of them
    launcher.append(f"hydra.launcher.ray.remote.num_cpus={share(cores, k)}")
    seed_list = ",".join(str(s) for s in range(1, seeds + 1))
    started = time.time()
    command = [sys.executable, str(REPO / "run.py"), "-m", *overrides, *launcher, f"seed={seed_list}",
               f"hydra.sweep.dir={sweep_dir}", f"+callbacks.gpu_check_timer.started={started}"]  # fmt: skip
    log = sweep_dir.parent / f"{sweep_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    done = len(list(sweep_dir.glob("*/results.csv")))
    if proc.returncode or done != seeds:
        raise RuntimeError(
            f"Ray sweep failed (exit {proc.returncode}, {done}/{seeds} trials done):\n{log.read_text()[-3000:]}"
        )
    return started


def read_timings(folders: list[Path]) -> list[dict]:
    missing = [str(f) for f in folders if not (f / "timing.json").is_file()]
    if missing:
        raise RuntimeError(f"no timing.json in {', '.join(missing)}")
    return [json.loads((f / "timing.json").read_text()) for f in folders]


def packed_trials(args, work: Path, on_gpu: bool, way: str, gpu_index: int | None) -> dict:
    """One trial alone, then ``args.packed`` at once; throughput alone and combined, each from
    the moment every trial of the group reached its first step (``barrier_overrides``)."""
    k = args.packed
    overrides = trial_overrides(args) + TIMER_OVERRIDES
    run_py = [sys.executable, str(REPO / "run.py")]
    # alone: as a user runs one trial (torch's default threads), unless --threads says otherwise
    run_processes(
        [
            (
                [
                    *run_py,
                    *overrides,
                    *barrier_overrides(work / "barrier-alone", 1),
                    "seed=1",
                    f"hydra.run.dir={work / 'alone'}",
                ],
                work / "alone.log",
            )
        ],
        1,
        threads=args.threads or None,
    )
    alone = read_timings([work / "alone"])[0]
    overrides += barrier_overrides(work / "barrier-packed", k)
    with UtilisationSampler(gpu_index) as sampler:  # GPU busy while the k trials train
        if way == "ray":
            multirun(overrides, k, k, on_gpu, work / "ray")
            folders = sorted(p.parent for p in (work / "ray").glob("*/results.csv"))
        else:
            folders = [work / f"trial{s}" for s in range(1, k + 1)]
            commands = [([*run_py, *overrides, f"seed={s}", f"hydra.run.dir={f}"], work / f"trial{s}.log")
                        for s, f in zip(range(1, k + 1), folders, strict=True)]  # fmt: skip
            run_processes(commands, k, threads=packed_threads(args))
    trials = read_timings(folders)
    window = (min(t["released"] for t in trials), max(t["train_end"] for t in trials))
    alone_rate = alone["images"] / (alone["train_end"] - alone["released"])
    combined = sum(t["images"] for t in trials) / (window[1] - window[0])
    return {
        "way": way,
        "k": k,
        "alone": alone_rate,
        "combined": combined,
        "ratio": combined / alone_rate,
        "alone_first_step_s": alone["first_step"] - alone["started"],
        "first_step_s": [t["first_step"] - t["started"] for t in trials],
        # launch of the first trial to the end of the last one's training: what the start-ups add
        "wall_s": max(t["train_end"] for t in trials) - min(t["started"] for t in trials),
        "images": [t["images"] for t in trials],
        "gpu_util": sampler.median([window]),
        "gpu_util_text": sampler.describe([window]),
    }


def seed_row(args, work: Path, on_gpu: bool, way: str) -> float:
    """Wall seconds of a whole ``--row-seeds``-seed sweep at the configuration's own length,
    ``--packed`` trials at once (Ray, or plain processes)."""
    overrides = trial_overrides(args, short=False) + TIMER_OVERRIDES
    n, k = args.row_seeds, args.packed
    t0 = time.time()
    if way == "ray":
        multirun(overrides, n, k, on_gpu, work / "row")
    else:
        run_py = [sys.executable, str(REPO / "run.py")]
        commands = [([*run_py, *overrides, f"seed={s}", f"hydra.run.dir={work / 'row' / str(s)}"], work / f"row{s}.log")
                    for s in range(1, n + 1)]  # fmt: skip
        run_processes(commands, k, threads=packed_threads(args))
    return time.time() - t0


def packed_section(args, work: Path, on_gpu: bool, gpu_index: int | None, report: dict) -> None:
    """(e): run, print and report the packed trials (and the seed row); a failed trial raises."""
    way = packing_way(args.packing, on_gpu)
    k = args.packed
    how = {
        "processes": f"{k} plain `python run.py` processes, {packed_threads(args)} CPU thread(s) each"
        + (", sharing the GPU (time-sliced between their CUDA contexts)" if on_gpu else ""),
        "ray": f"one `python run.py -m` sweep on Ray, each trial 1/{k} of the " + ("GPU" if on_gpu else "CPUs"),
    }[way]
    name = "the quick-start (digits)" if args.packed_config == "quickstart" else "the benchmark's configuration"
    alone_threads = f"{args.threads} CPU thread(s)" if args.threads else "torch's default CPU threads"
    print(
        f"(e) packed trials: {name}, {args.packed_steps} training steps each; 1 trial alone ({alone_threads}), "
        f"then {how}"
    )
    pk = packed_trials(args, work / "packed", on_gpu, way, gpu_index)
    report["packed"] = pk
    goal = "target >= 4x for 8 trials on one GPU"
    mark = f"{goal}: {'MET' if pk['ratio'] >= 4 else 'MISSED'}" if on_gpu and k == 8 else f"{goal}: not this case"
    print(
        f"    alone                 : {pk['alone']:,.0f} img/s (first step to end of training, its validation "
        f"batch included)"
    )
    print(
        f"    {f'{k} at once, combined':22s}: {pk['combined']:,.0f} img/s (all their images / from the moment "
        f"all {k} reached their first step to the end of the last one's training)"
    )
    print(f"    ratio packed/alone    : {pk['ratio']:.2f}x  [{mark}]")
    print(
        f"    seconds to 1st step   : alone {pk['alone_first_step_s']:.1f} s; packed "
        f"{fmt(pk['first_step_s'], ' s', 1)}; "
        f"first launch to the end of the last one's training {pk['wall_s']:.1f} s"
    )
    print(f"    GPU busy while packed : {pk['gpu_util_text']}")
    print(f"    measured with         : {way}", flush=True)
    if args.row_seeds:
        seconds = seed_row(args, work / "row", on_gpu, way)
        report["row"] = {"seeds": args.row_seeds, "seconds": seconds, "way": way, "k": k}
        print(
            f"    {args.row_seeds}-seed sweep, {k} at once ({way}), full length: {seconds:.0f} s"
            + (
                f"  [target <= 180 s on one H200: {'MET' if seconds <= 180 else 'MISSED'}]"
                if on_gpu
                else "  (the target, <= 180 s, is for one H200)"
            ),
            flush=True,
        )
