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
    wall time from the first launch (``mchad.gpu_check.run_timer``). ``--row-seeds N`` also times a whole N-seed sweep at the
    configuration's own length, K at once (the paper's 21-seed CIFAR-10 row: target <= 180 s
    on one H200).

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


def bench_overrides(args) -> list[str]:
    """The run.py overrides of the benchmark's configuration (experiment, data, backbone, batch,
    precision, device, ``--set``), without the seed: the in-process sections compose them and
    the packed trials (e) pass them to ``python run.py``."""
    overrides = [
        "experiment=cifar10-mchad",
        f"model/backbone={args.backbone}",
        "testmodules=noise",
        f"datamodule.batch_size={args.batch_size}",
        f"datamodule.test_batch_size={args.test_batch_size}",
        f"trainer.precision={args.precision}",
        f"model.channels_last={args.channels_last}",
        f"model.compile={args.compile}",
    ]
    if args.data == "cifar10":
        overrides += ["datamodule=imagefolder", f"datamodule.root={args.root}"]
    else:  # a merge would keep the torchvision source's keys: drop the node, then add ours
        for split, n, seed in (("train", 50000, 1), ("test", 10000, 2)):
            overrides += [f"~datamodule.{split}",
                          f"+datamodule.{split}={{_target_:mchad.bench.synthetic_source,n:{n},seed:{seed}}}"]
    if args.device != "auto":
        overrides += [f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    return overrides + list(args.set)


def compose(args, output_dir: Path, eval_sets: bool = False):
    """The run.py configuration for the benchmark's data, backbone, batch size and device."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import mchad  # noqa: F401  (resolvers)

    overrides = [*bench_overrides(args), f"seed={args.seed}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a run: the task sees the job's config only
        cfg.paths.output_dir = str(output_dir)
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
        """Wall time from the start of training batch ``first`` to the end of batch ``last``;
        ``window``: the same span in epoch seconds (for the GPU utilisation samples)."""

        seconds: float | None = None
        window: tuple[float, float] | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                sync(pl_module.device)
                self._t0, self._wall0 = time.perf_counter(), time.time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == last:
                sync(pl_module.device)
                self.seconds = time.perf_counter() - self._t0
                self.window = (self._wall0, time.time())

    return StepTimer()


# --- (a) training: Lightning against a bare loop --------------------------------------------------
def train_lightning(cfg, args) -> tuple[float, tuple[float, float]]:
    """Images/s of the timed steps and their span in epoch seconds."""
    import pytorch_lightning as pl

    from mchad.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    timer = step_timer(args.warmup, args.warmup + args.steps - 1)
    trainer = lightning_trainer(cfg, args.warmup + args.steps, [timer])
    trainer.fit(model, datamodule=datamodule)
    return args.steps * args.batch_size / timer.seconds, timer.window


def resolve_device(cfg):
    import torch

    from mchad.train import _on_gpu

    return torch.device("cuda") if _on_gpu(cfg) else torch.device("cpu")


def train_bare(cfg, args) -> tuple[float, tuple[float, float]]:
    """The same training as a hand-written loop: data -> device -> transform -> model -> loss ->
    backward -> Adam -> scheduler, nothing else. Images/s and the timed span (epoch seconds)."""
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
            t0, wall0 = time.perf_counter(), time.time()
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
    return args.steps * args.batch_size / seconds, (wall0, time.time())


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


# --- (a) GPU utilisation, sampled while the timed steps run----------------------------------------
def nvidia_smi_id(index: int) -> str:
    """nvidia-smi's ``-i`` for torch's CUDA device ``index``: nvidia-smi counts every GPU of the
    machine, torch only those in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, both of which
    ``-i`` accepts)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class UtilisationSampler:
    """GPU utilisation (% of the time a kernel ran, as nvidia-smi reports it), sampled every
    ``interval`` seconds in a background thread between ``start()`` and ``stop()`` (or as a
    context manager); ``samples`` holds ``(epoch seconds, percent)``.

    ``reader``: ``nvml`` (``torch.cuda.utilization``, needs pynvml / nvidia-ml-py: in-process,
    cheap), ``nvidia-smi`` (one ``nvidia-smi --query-gpu`` process per sample: each sample's time
    is known; a ``-lms`` loop would buffer its output in a pipe), or ``auto`` (nvml if pynvml is
    importable, else nvidia-smi). ``index=None`` (no GPU) samples nothing; ``unavailable`` then
    says why, as it does when no reader works.
    """

    def __init__(self, index: int | None, interval: float = 0.1, reader: str = "auto"):
        import importlib.util

        self.index, self.interval = index, interval
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.unavailable: str | None = None
        self.reader = reader
        if reader == "auto":
            self.reader = "nvml" if importlib.util.find_spec("pynvml") is not None else "nvidia-smi"
        self._smi = shutil.which("nvidia-smi") if self.reader == "nvidia-smi" else None
        if index is None:
            self.unavailable = "n/a (no GPU)"
        elif self.reader == "nvidia-smi" and self._smi is None:
            self.unavailable = "n/a (no nvidia-smi)"
        self._thread = None

    def read(self) -> float:
        if self.reader == "nvml":
            import torch

            return float(torch.cuda.utilization(self.index))
        proc = subprocess.run(
            [self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", nvidia_smi_id(self.index)],
            capture_output=True, text=True, timeout=10,
        )
        lines = proc.stdout.split()
        if proc.returncode or not lines:
            raise RuntimeError(f"nvidia-smi exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}")
        return float(lines[0])

    def _run(self) -> None:
        while True:
            before = time.time()
            try:
                value = self.read()
            except Exception as error:  # noqa: BLE001  (a failed sample is skipped and reported)
                self.errors.append(str(error))
            else:
                self.samples.append(((before + time.time()) / 2, value))
            if self._stop.wait(self.interval):
                return

    def start(self) -> UtilisationSampler:
        import threading

        if self.unavailable is None and self.reader == "nvml":
            try:
                self.read()
            except Exception as error:  # noqa: BLE001  (e.g. NVML not initialised: nvidia-smi may still work)
                self._smi = shutil.which("nvidia-smi")
                self.reader = "nvidia-smi" if self._smi else "nvml"
                if self._smi is None:
                    self.unavailable = f"n/a (nvml failed: {error}; no nvidia-smi)"
        if self.unavailable is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="gpu-utilisation", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.unavailable is None and not self.samples and self.errors:
            self.unavailable = f"n/a ({self.reader} failed: {self.errors[-1]})"

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def values(self, windows: list[tuple[float, float]] | None = None) -> list[float]:
        """The percentages sampled inside any of ``windows`` (all with None)."""
        return [v for t, v in self.samples if windows is None or any(a <= t <= b for a, b in windows)]

    def median(self, windows: list[tuple[float, float]] | None = None) -> float | None:
        values = self.values(windows)
        return statistics.median(values) if values else None

    def describe(self, windows: list[tuple[float, float]] | None = None) -> str:
        """``median 27 % (n=70, nvidia-smi every 0.1 s)`` or why there is no figure."""
        values = self.values(windows)
        if self.unavailable or not values:
            return self.unavailable or "n/a (no sample inside the timed steps)"
        return f"median {statistics.median(values):.0f} % (n={len(values)}, {self.reader} every {self.interval:g} s)"


# --- (a) host synchronisations per training step (CUDA) -----------------------------------------------
def sync_counter(first: int, steps: int, set_mode=None):
    """A callback that counts the host synchronisations of training steps ``first`` to
    ``first + steps - 1`` with ``torch.cuda.set_sync_debug_mode("warn")`` (``set_mode``: that
    function; the tests pass a stand-in). A step runs from its batch's start to the next one's,
    so that Lightning's logging after ``on_train_batch_end`` counts: the trainer must run
    ``first + steps + 1`` batches."""
    import collections
    import traceback
    import warnings

    import pytorch_lightning as pl

    if set_mode is None:
        import torch

        set_mode = torch.cuda.set_sync_debug_mode

    class SyncCounter(pl.Callback):
        def __init__(self) -> None:
            self.per_step: list[int] = []
            self.logging_steps: list[int] = []
            self.locations: collections.Counter = collections.Counter()
            self._catcher = None
            self._count = 0

        def _record(self, message, category, filename, lineno, file=None, line=None):
            # torch's message: "called a synchronizing CUDA operation"; other warnings do not count
            if "synchroniz" not in str(message):
                return
            self._count += 1
            ours = [f for f in traceback.extract_stack()[:-1] if "/src/mchad/" in f.filename]
            where = f"{short_path(filename)}:{lineno}"
            if ours and ours[-1].filename != filename:
                where += f" (from {short_path(ours[-1].filename)}:{ours[-1].lineno})"
            self.locations[where] += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                self._catcher = warnings.catch_warnings()
                self._catcher.__enter__()
                warnings.simplefilter("always")  # every occurrence, not once per location
                warnings.showwarning = self._record
                set_mode("warn")
            elif first < batch_idx <= first + steps and self._catcher is not None:
                self.per_step.append(self._count)
                self._count = 0
                if batch_idx == first + steps:
                    self._finish()
            if first <= batch_idx < first + steps:
                # Lightning logs when (steps done + 1) % log_every_n_steps == 0 (one optimizer)
                if trainer.log_every_n_steps and (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
                    self.logging_steps.append(batch_idx - first)

        def _finish(self) -> None:
            set_mode(0)
            self._catcher.__exit__(None, None, None)
            self._catcher = None

        def on_train_end(self, trainer, pl_module):  # fewer batches than asked: close anyway
            if self._catcher is not None:
                self._finish()

    return SyncCounter()


def short_path(filename: str) -> str:
    """A source file's path from the repository or from site-packages."""
    for anchor in (str(REPO) + os.sep, "site-packages" + os.sep, "dist-packages" + os.sep):
        if anchor in filename:
            return filename.split(anchor, 1)[1]
    return filename


def host_syncs(cfg, warmup: int, steps: int, set_mode=None):
    """Train ``warmup`` steps, then count the host synchronisations of ``steps`` more."""
    import pytorch_lightning as pl

    from mchad.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    counter = sync_counter(warmup, steps, set_mode)
    trainer = lightning_trainer(cfg, warmup + steps + 1, [counter])
    trainer.fit(model, datamodule=datamodule)
    return counter


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


# --- (e) packed trials --------------------------------------------------------------------------------
TIMER_OVERRIDES = [
    "+callbacks.gpu_check_timer._target_=mchad.gpu_check.run_timer",
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
        overrides += ["trainer.min_epochs=1", "trainer.max_epochs=1", f"trainer.limit_train_batches={args.packed_steps}",
                      "trainer.limit_val_batches=1"]  # fmt: skip
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
            running.append((subprocess.Popen([*command, f"+callbacks.gpu_check_timer.started={launched[i]}"],
                                             cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT), handle, log))
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
    launcher = ["hydra/launcher=ray_gpu", f"hydra.launcher.ray.remote.num_gpus={share(1, k)}"] if on_gpu else ["hydra/launcher=ray"]
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
        raise RuntimeError(f"Ray sweep failed (exit {proc.returncode}, {done}/{seeds} trials done):\n{log.read_text()[-3000:]}")
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
    run_processes([([*run_py, *overrides, *barrier_overrides(work / "barrier-alone", 1), "seed=1",
                     f"hydra.run.dir={work / 'alone'}"], work / "alone.log")], 1, threads=args.threads or None)  # fmt: skip
    alone = read_timings([work / "alone"])[0]
    overrides += barrier_overrides(work / "barrier-packed", k)
    with UtilisationSampler(gpu_index) as sampler:  # GPU busy while the k trials train
        if way == "ray":
            multirun(overrides, k, k, on_gpu, work / "ray")
            folders = sorted(p.parent for p in (work / "ray").glob("*/results.csv"))
        else:
            folders = [work / f"trial{s}" for s in range(1, k + 1)]
            commands = [([*run_py, *overrides, f"seed={s}", f"hydra.run.dir={f}"], work / f"trial{s}.log")
                        for s, f in zip(range(1, k + 1), folders)]  # fmt: skip
            run_processes(commands, k, threads=packed_threads(args))
    trials = read_timings(folders)
    window = (min(t["released"] for t in trials), max(t["train_end"] for t in trials))
    alone_rate = alone["images"] / (alone["train_end"] - alone["released"])
    combined = sum(t["images"] for t in trials) / (window[1] - window[0])
    return {
        "way": way, "k": k, "alone": alone_rate, "combined": combined, "ratio": combined / alone_rate,
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
    print(f"(e) packed trials: {name}, {args.packed_steps} training steps each; 1 trial alone ({alone_threads}), "
          f"then {how}")
    pk = packed_trials(args, work / "packed", on_gpu, way, gpu_index)
    report["packed"] = pk
    goal = "target >= 4x for 8 trials on one GPU"
    mark = f"{goal}: {'MET' if pk['ratio'] >= 4 else 'MISSED'}" if on_gpu and k == 8 else f"{goal}: not this case"
    print(f"    alone                 : {pk['alone']:,.0f} img/s (first step to end of training, its validation "
          f"batch included)")
    print(f"    {f'{k} at once, combined':22s}: {pk['combined']:,.0f} img/s (all their images / from the moment "
          f"all {k} reached their first step to the end of the last one's training)")
    print(f"    ratio packed/alone    : {pk['ratio']:.2f}x  [{mark}]")
    print(f"    seconds to 1st step   : alone {pk['alone_first_step_s']:.1f} s; packed {fmt(pk['first_step_s'], ' s', 1)}; "
          f"first launch to the end of the last one's training {pk['wall_s']:.1f} s")
    print(f"    GPU busy while packed : {pk['gpu_util_text']}")
    print(f"    measured with         : {way}", flush=True)
    if args.row_seeds:
        seconds = seed_row(args, work / "row", on_gpu, way)
        report["row"] = {"seeds": args.row_seeds, "seconds": seconds, "way": way, "k": k}
        print(f"    {args.row_seeds}-seed sweep, {k} at once ({way}), full length: {seconds:.0f} s"
              + (f"  [target <= 180 s on one H200: {'MET' if seconds <= 180 else 'MISSED'}]" if on_gpu else
                 "  (the target, <= 180 s, is for one H200)"), flush=True)


# --- main -------------------------------------------------------------------------------------------
SECTIONS = ("train", "data", "eval", "startup", "packed")
#: (e) starts 1 + K runs of run.py: by default only where it measures something (a GPU)
DEFAULT_SECTIONS = ("train", "data", "eval", "startup")


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
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); in (e), of every trial run as a process (0: the "
                        "trial alone torch's default, each packed one its share of the cores)")
    p.add_argument("--sync-steps", type=int, default=20,
                   help="(a), CUDA only: training steps whose host synchronisations are counted")
    p.add_argument("--packed", type=int, default=8, metavar="K", help="(e): trials trained at once")
    p.add_argument("--packed-steps", type=int, default=100, help="(e): training steps of each trial")
    p.add_argument("--packing", choices=["auto", "processes", "ray"], default="auto",
                   help="(e): K plain processes, one Ray sweep (hydra/launcher=ray_gpu, or ray on a CPU), "
                        "or auto = Ray if importable and on a GPU, else processes")
    p.add_argument("--packed-config", choices=["bench", "quickstart"], default="bench",
                   help="(e): the trials' configuration: the benchmark's (cifar10-mchad, --data, --backbone, ...) "
                        "or the quick-start's (digits)")
    p.add_argument("--row-seeds", type=int, default=0, metavar="N",
                   help="(e): also time a whole N-seed sweep, K at once (0: off; the paper's CIFAR-10 row: 21)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections of {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)}, "
                        "and packed on a GPU)")
    p.add_argument("--work-dir", default=None,
                   help="keep the timed runs' folders and logs here (a new or empty folder; default: a temporary "
                        "folder, removed at the end)")
    args = p.parse_args(argv)
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        p.error(f"--work-dir {args.work_dir} is not empty (its runs would mix with this benchmark's)")
    unknown = set((args.only or "").split(",")) - {"", *SECTIONS}
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    for name in ("packed", "packed_steps", "sync_steps"):
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
        gpu = torch.cuda.get_device_name(device) if on_gpu else None
        gpu_index = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        sections = set(args.only.split(",")) if args.only else {*DEFAULT_SECTIONS, *(("packed",) if on_gpu else ())}
        print("=" * 78)
        print("mchad benchmark:", " ".join(argv) or "(defaults)")
        print(f"machine: {gpu or 'CPU only'}; {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load average {load:.1f} at start")
        print(f"data: {args.data}" + (f" ({args.root})" if args.data == "cifar10" else " (uint8 3x32x32, 50k/10k)")
              + f"; backbone {args.backbone}; batch {args.batch_size}; Adam + cosine; precision {args.precision}; "
              f"device {device}; channels_last {args.channels_last}; compile {args.compile}")
        print("=" * 78, flush=True)

        if "train" in sections:
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
            ratios = [a / b for a, b in zip(light, bare)]
            busy = sampler.median(light_windows)
            report["train"] = {"lightning": light, "bare": bare, "ratio": ratios,
                               "gpu_util": {"lightning": busy, "bare": sampler.median(bare_windows),
                                            "text": sampler.describe(light_windows)}}  # fmt: skip
            ratio = statistics.median(ratios)  # paired: each Lightning repeat with the bare one next to it
            of_medians = statistics.median(light) / statistics.median(bare)
            print(f"(a) training, {args.steps} steps x {args.batch_size} images after {args.warmup} warm-up steps, {args.repeats} repeats")
            print(f"    run.py Lightning path : {fmt(light, ' img/s')}")
            print(f"    bare PyTorch loop     : {fmt(bare, ' img/s')}")
            print(f"    ratio Lightning/bare  : {ratio:.3f} (median of the paired repeats {', '.join(f'{r:.3f}' for r in ratios)}); "
                  f"ratio of the medians {of_medians:.3f}  [target >= 0.95: {'MET' if ratio >= 0.95 else 'MISSED'}]")
            per_step = (args.batch_size / statistics.median(light) - args.batch_size / statistics.median(bare)) * 1e3
            print(f"    framework overhead    : {per_step:+.1f} ms per step", flush=True)
            print(f"    GPU busy, Lightning   : {sampler.describe(light_windows)}"
                  + (f"  [target >= 80 %: {'MET' if busy >= 80 else 'MISSED'}]" if busy is not None else ""))
            print(f"    GPU busy, bare loop   : {sampler.describe(bare_windows)}", flush=True)
            if on_gpu:
                warm = args.warmup + 3  # past the first steps' one-off work (compilation, CUDA graph capture)
                counter = host_syncs(compose(args, next(runs)), warm, args.sync_steps)
                per, logging_steps = counter.per_step or [float("nan")], counter.logging_steps  # nan: no step counted
                outside = sum(c for i, c in enumerate(per) if i not in logging_steps)
                report["syncs"] = {"per_step": per, "logging_steps": logging_steps, "outside_logging": outside,
                                   "locations": dict(counter.locations)}  # fmt: skip
                print(f"    host syncs per step   : median {statistics.median(per):g}, max {max(per)} over {len(per)} steps "
                      f"after {warm} warm-up steps; {sum(per)} in all, {outside} outside the logging steps "
                      f"({', '.join(map(str, logging_steps)) or 'none'}; trainer.log_every_n_steps="
                      f"{cfg.trainer.log_every_n_steps})  [target 0 outside logging steps: {'MET' if outside == 0 else 'MISSED'}]")
                for where, n in counter.locations.most_common(8):
                    print(f"      {n:4d} x {where}")
            else:
                print("    host syncs per step   : n/a (CUDA only; the CPU test suite checks the step with an emulated device)")

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
                    "testmodules=noise", f"model/backbone={args.backbone}", *args.set,
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
            if on_gpu:  # in fresh processes: cold, as at the start of a run
                costs = [first_use_seconds("cuda") for _ in range(args.startup_repeats)]
                report["cuda_start"] = {name: [c[name] for c in costs] for name in costs[0]}
                cuda_own = [sum(v for n, v in c.items() if n != "import torch") for c in costs]
                report["cuda_start"]["CUDA's own start"] = cuda_own
                print(f"    CUDA's own start (torch.cuda.init() + first matmul + first cuDNN conv, fresh process): "
                      f"{fmt(cuda_own, ' s', 2)}")
                print("      " + "; ".join(f"{n} {statistics.median(v):.2f} s" for n, v in report["cuda_start"].items()
                                           if n != "CUDA's own start"))  # fmt: skip
            else:
                print("    CUDA's own start: n/a (no GPU)")
            total, heavy = import_times()
            print(f"    `import mchad.train` (python -X importtime): {total:.2f} s; heaviest: "
                  + ", ".join(f"{n} {t:.2f}" for n, t in heavy[:6]))
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


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
