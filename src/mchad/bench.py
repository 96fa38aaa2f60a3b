"""Benchmark: is training and testing as fast as the hardware allows?

    python -m mchad.bench [--data auto|cifar10|synthetic] [--backbone convnet|wrn40-2]
                          [--batch-size 128] [--steps 32] [--repeats 11] [--device auto|cpu|cuda]
                          [--precision 32-true|bf16-mixed] [--channels-last auto|true|false]
                          [--compile false|true|MODE] [--eval-size 1000] [--only train,data,eval,startup]

Prints, for the current machine, one model, data set, batch size and optimiser:

(a) training throughput (images/s) of run.py's Lightning path (``train.build``: the same
    ``OODDataModule`` + ``OODModel``, the configured loggers and callbacks, the trainer config)
    against a bare PyTorch loop in the same process (same data, transform, model, Adam, cosine
    schedule stepped per batch). The two alternate, repeat after repeat, so that a change of
    machine load hits both; target ratio >= 0.95.
(b) the data pipeline alone (permutation, batch gather, transfer, crop + flip + normalise on
    the device) against the training throughput; target >= 10x.
(c) testing: seconds to score the ID test set and seven OOD sets and compute every metric
    (``trainer.test``), and that work alone.
(d) start-up: seconds from starting ``python run.py`` to its first training step (a probe
    callback stops the process there), for the quick-start and for the CIFAR-10 image folder;
    target <= 5 s. Split into the time to ``Trainer.fit`` (imports, Hydra, data set-up),
    Lightning's sanity validation (2 validation batches: model compute, which on a CPU is
    most of the difference between the two cases) and the rest. Also: is Ray imported, was
    anything decoded (or the uint8 cache used), and the heaviest imports (``python -X importtime``).

Every timing is repeated; min and median are printed and the ratios are quoted. ``--data auto``
uses a CIFAR-10 image folder (``--root``, default ``../shared/data/cifar10-jpeg`` beside the
repository, or ``$MCHAD_BENCH_ROOT``) if it exists,
else synthetic uint8 images of CIFAR's shape, so the benchmark runs anywhere offline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = Path(os.environ.get("MCHAD_BENCH_ROOT", REPO.parent / "shared" / "data" / "cifar10-jpeg"))


# --- sources and probes used through Hydra configs ---------------------------------------------
def synthetic_source(n: int, seed: int = 0, labelled: bool = True, n_classes: int = 10, name: str = "synthetic"):
    """A :class:`~mchad.data.Source` of ``n`` random uint8 3x32x32 images (CIFAR-shaped)."""
    import torch

    from mchad.data.sources import ImageArray, Source

    class Synthetic(Source):
        def load(self, dataset_dir=None) -> ImageArray:
            # cpu: a data source, decoded into host memory like the others (mchad.devices)
            g = torch.Generator().manual_seed(seed)
            # smooth random images: 8x8 noise upsampled, plus fine noise
            coarse = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)  # cpu: as g
            images = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)
            images = images.add_(torch.randint(0, 16, images.shape, generator=g, dtype=torch.uint8))  # cpu: as g
            # cpu: as g
            labels = torch.randint(0, n_classes, (n,), generator=g) if labelled else torch.full((n,), -1)
            return ImageArray(images, labels, [str(c) for c in range(n_classes)])

    source = Synthetic()
    source.name = name
    return source


def first_step_probe(out: str):
    """A callback that writes the time and a few facts at the first training step, then ends the
    process (used by the start-up measurement)."""
    import pytorch_lightning as pl

    class FirstStepProbe(pl.Callback):
        def __init__(self):
            self.marks: dict[str, float] = {}

        def on_fit_start(self, trainer, pl_module):
            self.marks["fit"] = time.time()

        def on_sanity_check_start(self, trainer, pl_module):
            self.marks["sanity_start"] = time.time()

        def on_sanity_check_end(self, trainer, pl_module):
            self.marks["sanity_end"] = time.time()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            from mchad.data import sources

            import resource

            usage = resource.getrusage(resource.RUSAGE_SELF)
            info = {
                "time": time.time(),
                **self.marks,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "ray_imported": "ray" in sys.modules,
                "imported": [m for m in ("pandas", "sklearn", "scipy", "matplotlib", "tensorboard") if m in sys.modules],
                "decoded_images": getattr(sources, "DECODED_IMAGES", None),
                "cache_loads": getattr(sources, "CACHE_LOADS", None),
            }
            Path(out).write_text(json.dumps(info))
            sys.stdout.flush()
            os._exit(0)

    return FirstStepProbe()


# --- helpers ------------------------------------------------------------------------------------
def summary(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def fmt(values: list[float], unit: str = "", digits: int = 0) -> str:
    lo, med = summary(values)
    hi = max(values)
    return f"median {med:,.{digits}f}{unit}  (min {lo:,.{digits}f}, max {hi:,.{digits}f}, n={len(values)})"


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def compose(args, output_dir: Path, eval_sets: bool = False):
    """The run.py configuration for the benchmark's data, backbone, batch size and device."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import mchad  # noqa: F401  (resolvers)

    overrides = [
        "experiment=cifar10-mchad",
        f"model/backbone={args.backbone}",
        "testmodules=noise",
        f"datamodule.batch_size={args.batch_size}",
        f"datamodule.test_batch_size={args.test_batch_size}",
        f"trainer.precision={args.precision}",
        f"model.channels_last={args.channels_last}",
        f"model.compile={args.compile}",
        f"seed={args.seed}",
    ]
    overrides += list(args.set)
    if args.data == "cifar10":
        overrides += ["datamodule=imagefolder", f"datamodule.root={args.root}"]
    if args.device != "auto":
        overrides += [f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a run: the task sees the job's config only
        cfg.paths.output_dir = str(output_dir)
        if args.data == "synthetic":
            cfg.datamodule.train = {"_target_": "mchad.bench.synthetic_source", "n": 50000, "seed": 1}
            cfg.datamodule.test = {"_target_": "mchad.bench.synthetic_source", "n": 10000, "seed": 2}
        cases = {}
        if eval_sets:
            n = args.eval_size
            for kind in ("gaussian", "uniform"):
                cases[f"{kind.capitalize()}Noise"] = {"_target_": "mchad.data.NoiseSource", "kind": kind, "n": n}
            # stand-ins of the same size for the five downloaded sets (Textures, TinyImageNet
            # crop/resize, LSUN crop/resize): scoring cost does not depend on the content
            for i in range(1, 6):
                cases[f"synthetic{i}"] = {
                    "_target_": "mchad.bench.synthetic_source", "n": n, "seed": 100 + i, "labelled": False,
                    "name": f"synthetic{i}",
                }
        cfg.datamodule.test_cases = cases
    return cfg


def lightning_trainer(cfg, limit_train_batches: int, extra_callbacks: list):
    """The trainer run.py makes (loggers, callbacks, trainer config), limited to one short epoch."""
    from mchad.train import make_trainer

    return make_trainer(
        cfg,
        extra_callbacks=tuple(extra_callbacks),
        min_epochs=1,
        max_epochs=1,
        limit_train_batches=limit_train_batches,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )


def step_timer(first: int, last: int):
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Wall time from the start of training batch ``first`` to the end of batch ``last``."""

        seconds: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                sync(pl_module.device)
                self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == last:
                sync(pl_module.device)
                self.seconds = time.perf_counter() - self._t0

    return StepTimer()


# --- (a) training: Lightning against a bare loop --------------------------------------------------
def train_lightning(cfg, args) -> float:
    import pytorch_lightning as pl

    from mchad.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    timer = step_timer(args.warmup, args.warmup + args.steps - 1)
    trainer = lightning_trainer(cfg, args.warmup + args.steps, [timer])
    trainer.fit(model, datamodule=datamodule)
    return args.steps * args.batch_size / timer.seconds


def resolve_device(cfg):
    import torch

    from mchad.train import _on_gpu

    return torch.device("cuda") if _on_gpu(cfg) else torch.device("cpu")


def train_bare(cfg, args) -> float:
    """The same training as a hand-written loop: data -> device -> transform -> model -> loss ->
    backward -> Adam -> scheduler, nothing else."""
    import contextlib

    import pytorch_lightning as pl
    import torch

    from mchad.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    device = resolve_device(cfg)
    model.to(device).train()
    transform = datamodule.transform.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = model.optimizer_factory(params=params)
    total = args.warmup + args.steps
    scheduler = model.scheduler_factory(optimizer, T_max=total) if model.scheduler_factory else None
    # the hand-written loop's best data path: on a GPU the uint8 set lives there
    from mchad.data.loaders import TensorBatchLoader

    loader = TensorBatchLoader(
        datamodule.data["train"], args.batch_size, shuffle=True, drop_last=True, seed=datamodule.seed,
        device=device if device.type == "cuda" else None,
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.trainer.precision in ("bf16-mixed", "bf16")
        else contextlib.nullcontext()
    )
    seconds = None
    for i, (images, labels) in enumerate(loader):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = transform(images, augment=True)
        with autocast:
            out = model(x)
            loss = model._loss(out, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if i == total - 1:
            sync(device)
            seconds = time.perf_counter() - t0
            break
    return args.steps * args.batch_size / seconds


# --- (b) the data pipeline alone ---------------------------------------------------------------------
def data_pipeline(cfg, args, batches: int) -> list[float]:
    import pytorch_lightning as pl

    from mchad.train import _instantiate

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = _instantiate(cfg.datamodule, "datamodule")
    datamodule.setup("fit")
    device = resolve_device(cfg)
    transform = datamodule.transform.to(device)
    loader = datamodule.train_dataloader()
    if device.type == "cuda":  # as the trainer would: gather on the GPU if the data fit
        from mchad.data.loaders import TensorBatchLoader

        loader = TensorBatchLoader(
            datamodule.data["train"], args.batch_size, shuffle=True, drop_last=True, seed=datamodule.seed, device=device
        )
    rates = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for i, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            x = transform(images, augment=True)
            n += len(x)
            if i + 1 == batches:
                break
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


# --- (c) testing ------------------------------------------------------------------------------------
def evaluation(cfg, args) -> dict[str, list[float]]:
    import pytorch_lightning as pl
    import torch

    from mchad.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    n = args.eval_size
    subset = torch.arange(min(n, len(datamodule.data["test"])))  # cpu: indexes host data
    datamodule.data["test"] = datamodule.data["test"].subset(subset)
    images = len(datamodule.data["test"]) + sum(len(a) for a in datamodule.test_cases.values())

    class TestTimer(pl.Callback):
        def on_test_epoch_start(self, trainer, pl_module):
            sync(pl_module.device)
            self.t0 = time.perf_counter()

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.t_scored = time.perf_counter()

        def on_test_end(self, trainer, pl_module):  # before the plotting callbacks (listed first)
            sync(pl_module.device)
            self.t_metrics = time.perf_counter()

    results = {"scoring": [], "metrics": [], "test_call": [], "images": images, "cases": len(datamodule.test_cases)}
    for _ in range(args.eval_repeats):
        timer = TestTimer()
        trainer = lightning_trainer(cfg, 1, [timer])
        t0 = time.perf_counter()
        trainer.test(model, datamodule=datamodule, verbose=False)
        results["test_call"].append(time.perf_counter() - t0)
        results["scoring"].append(images / (timer.t_scored - timer.t0))
        results["metrics"].append(timer.t_metrics - timer.t0)
    results["rows"] = len(model.test_results)
    return results


# --- (d) start-up -------------------------------------------------------------------------------------
def startup(overrides: list[str], repeats: int, workdir: Path) -> tuple[list[float], dict]:
    times, cpu, info = [], [], {}
    phases = {"to Trainer.fit": [], "sanity validation": [], "rest of fit set-up": []}
    for r in range(repeats):
        out = workdir / f"probe{r}.json"
        command = [
            sys.executable, str(REPO / "run.py"), *overrides,
            f"hydra.run.dir={workdir}/run{r}",
            f"+callbacks.bench_probe._target_=mchad.bench.first_step_probe",
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


def import_times(module: str = "mchad.train", top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """Total and heaviest top-level imports of ``module`` (``python -X importtime``), seconds."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True
    )
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


# --- main -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mchad.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["auto", "cifar10", "synthetic"], default="auto")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 image folder (train/ and test/)")
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further run.py override, e.g. --set model.backbone.width=16 (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--only", default="train,data,eval,startup", help="comma-separated sections")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - {"train", "data", "eval", "startup"}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from train, data, eval, startup")
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
    quiet = {"pytorch_lightning": logging.WARNING, "lightning": logging.WARNING, "lightning_fabric": logging.WARNING,
             "lightning.pytorch": logging.WARNING, "mchad": logging.ERROR}
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

    sections = set(args.only.split(","))
    os.environ.setdefault("MCHAD_ROOT", str(REPO))
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report: dict = {}
    work = Path(tempfile.mkdtemp(prefix="mchad-bench-"))
    try:
        # a fresh folder per timed run: TensorBoard's projector warns when one is reused
        runs = (work / f"run{i}" for i in itertools.count())
        cfg = compose(args, next(runs))
        device = resolve_device(cfg)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        print("=" * 78)
        print("mchad benchmark:", " ".join(argv) or "(defaults)")
        print(f"machine: {gpu or 'CPU only'}; {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load average {load:.1f} at start")
        print(f"data: {args.data}" + (f" ({args.root})" if args.data == "cifar10" else " (uint8 3x32x32, 50k/10k)")
              + f"; backbone {args.backbone}; batch {args.batch_size}; Adam + cosine; precision {args.precision}; "
              f"device {device}; channels_last {args.channels_last}; compile {args.compile}")
        print("=" * 78, flush=True)

        if "train" in sections:
            light, bare = [], []
            for r in range(args.repeats):  # alternate (and swap who goes first), so that load changes hit both
                if r % 2:
                    bare.append(train_bare(compose(args, next(runs)), args))
                light.append(train_lightning(compose(args, next(runs)), args))
                if not r % 2:
                    bare.append(train_bare(compose(args, next(runs)), args))
            ratios = [a / b for a, b in zip(light, bare)]
            report["train"] = {"lightning": light, "bare": bare, "ratio": ratios}
            ratio = statistics.median(ratios)  # paired: each Lightning repeat with the bare one next to it
            of_medians = statistics.median(light) / statistics.median(bare)
            print(f"(a) training, {args.steps} steps x {args.batch_size} images after {args.warmup} warm-up steps, {args.repeats} repeats")
            print(f"    run.py Lightning path : {fmt(light, ' img/s')}")
            print(f"    bare PyTorch loop     : {fmt(bare, ' img/s')}")
            print(f"    ratio Lightning/bare  : {ratio:.3f} (median of the paired repeats {', '.join(f'{r:.3f}' for r in ratios)}); "
                  f"ratio of the medians {of_medians:.3f}  [target >= 0.95: {'MET' if ratio >= 0.95 else 'MISSED'}]")
            per_step = (args.batch_size / statistics.median(light) - args.batch_size / statistics.median(bare)) * 1e3
            print(f"    framework overhead    : {per_step:+.1f} ms per step", flush=True)

        if "data" in sections:
            rates = data_pipeline(compose(args, next(runs)), args, args.data_batches)
            report["data"] = rates
            reference = statistics.median(report["train"]["lightning"]) if "train" in report else None
            print(f"(b) data pipeline alone (permutation, gather, transfer, crop+flip+normalise), {args.data_batches} batches")
            print(f"    {fmt(rates, ' img/s')}")
            if reference:
                ratio = statistics.median(rates) / reference
                print(f"    ratio data/training   : {ratio:.1f}x  [target >= 10x: {'MET' if ratio >= 10 else 'MISSED'}]", flush=True)

        if "eval" in sections:
            ev = evaluation(compose(args, next(runs), eval_sets=True), args)
            report["eval"] = ev
            print(f"(c) testing: ID test set + {ev['cases']} OOD sets = {ev['images']:,} images, {ev['rows']} metric rows")
            print(f"    scoring               : {fmt(ev['scoring'], ' img/s')}")
            print(f"    scoring + all metrics : {fmt(ev['metrics'], ' s', 2)}")
            print(f"    whole trainer.test    : {fmt(ev['test_call'], ' s', 2)} (with the plotting callbacks)")
            if "train" in report:
                print(f"    scoring/training rate : {statistics.median(ev['scoring']) / statistics.median(report['train']['lightning']):.1f}x", flush=True)

        if "startup" in sections:
            print("(d) start-up: `python run.py ...` to its first training step")
            cases = {"quick-start (digits)": []}
            if args.data == "cifar10":
                cases["CIFAR-10 image folder"] = [
                    "experiment=cifar10-mchad", "datamodule=imagefolder", f"datamodule.root={args.root}",
                    "testmodules=noise", f"model/backbone={args.backbone}",
                ]
            report["startup"] = {}
            for name, overrides in cases.items():
                times, info = startup(overrides, args.startup_repeats, work / name.split()[0])
                report["startup"][name] = {"seconds": times, **info}
                lo, med = summary(times)
                print(f"    {name:22s}: {fmt(times, ' s', 2)}  [target <= 5 s: {'MET' if med <= 5 else 'MISSED'}]")
                print(f"    {'':22s}  CPU time of that process: {fmt(info['cpu'], ' s', 2)}")
                for phase, values in info["phases"].items():
                    print(f"    {'':22s}  {phase:19s}: {fmt(values, ' s', 2)}")
                sanity = statistics.median(info["phases"]["sanity validation"])
                if sanity > 0.1:  # Lightning's 2 validation batches before training: model compute, not set-up
                    rest = [t - v for t, v in zip(times, info["phases"]["sanity validation"])]
                    print(f"    {'':22s}  without the sanity validation: {fmt(rest, ' s', 2)}  "
                          f"[target <= 5 s: {'MET' if statistics.median(rest) <= 5 else 'MISSED'}]")
                print(f"    {'':22s}  Ray imported: {info['ray_imported']}; images decoded: {info['decoded_images']}; "
                      f"uint8 cache files loaded: {info['cache_loads']}; also imported: {', '.join(info['imported'])}", flush=True)
            total, heavy = import_times()
            print(f"    `import mchad.train` (python -X importtime): {total:.2f} s; heaviest: "
                  + ", ".join(f"{n} {t:.2f}" for n, t in heavy[:6]))
        load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load average {load_end:.1f} at the end (other processes share these {os.cpu_count()} cores)")
        return report
    finally:  # run folders, checkpoints and logs of the timed runs
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
