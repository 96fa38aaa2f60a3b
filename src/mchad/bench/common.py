"""What every section of the benchmark shares: where the repository and data are, the run.py
configuration it composes, synthetic data, the start-up probe, timers and formatting."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
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
            import resource

            from mchad.data import sources

            usage = resource.getrusage(resource.RUSAGE_SELF)
            info = {
                "time": time.time(),
                **self.marks,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "ray_imported": "ray" in sys.modules,
                "imported": [
                    m for m in ("pandas", "sklearn", "scipy", "matplotlib", "tensorboard") if m in sys.modules
                ],
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
        size = args.synthetic_size
        for split, n, seed in (("train", size, 1), ("test", max(1, size // 5), 2)):
            overrides += [
                f"~datamodule.{split}",
                f"+datamodule.{split}={{_target_:mchad.bench.common.synthetic_source,n:{n},seed:{seed}}}",
            ]
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
    from mchad.targets import VERSION_BASE_KWARGS

    overrides = [*bench_overrides(args), f"seed={args.seed}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "config"), **VERSION_BASE_KWARGS):
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
                    "_target_": "mchad.bench.common.synthetic_source",
                    "n": n,
                    "seed": 100 + i,
                    "labelled": False,
                    "name": f"synthetic{i}",
                }
        cfg.datamodule.test_cases = cases
    return cfg


def lightning_trainer(cfg, limit_train_batches: int, extra_callbacks: list):
    """The trainer run.py makes (loggers, callbacks, trainer config), limited to one short epoch."""
    from mchad.runs.train import make_trainer

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


def resolve_device(cfg):
    import torch

    from mchad.runs.train import _on_gpu

    return torch.device("cuda") if _on_gpu(cfg) else torch.device("cpu")
