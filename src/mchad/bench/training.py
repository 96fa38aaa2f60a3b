"""Sections (a) training, Lightning against a bare loop, (b) the data pipeline alone and (c) testing."""

from __future__ import annotations

import time

from mchad.bench.common import lightning_trainer, resolve_device, step_timer, sync


# --- (a) training: Lightning against a bare loop --------------------------------------------------
def train_lightning(cfg, args) -> tuple[float, tuple[float, float]]:
    """Images/s of the timed steps and their span in epoch seconds."""
    import pytorch_lightning as pl

    from mchad.runs.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    timer = step_timer(args.warmup, args.warmup + args.steps - 1)
    trainer = lightning_trainer(cfg, args.warmup + args.steps, [timer])
    trainer.fit(model, datamodule=datamodule)
    return args.steps * args.batch_size / timer.seconds, timer.window


def train_bare(cfg, args) -> tuple[float, tuple[float, float]]:
    """The same training as a hand-written loop: data -> device -> transform -> model -> loss ->
    backward -> Adam -> scheduler, nothing else. Images/s and the timed span (epoch seconds)."""
    import contextlib

    import pytorch_lightning as pl
    import torch

    from mchad.runs.train import build

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    device = resolve_device(cfg)
    model.to(device).train()
    transform = datamodule.transform.to(device)
    from mchad.models.module import make_optimizer

    # as Lightning's path: the configured optimizer, fused on a GPU
    optimizer = make_optimizer(model.optimizer_factory, [p for p in model.parameters() if p.requires_grad])
    total = args.warmup + args.steps
    scheduler = model.scheduler_factory(optimizer, T_max=total) if model.scheduler_factory else None
    # the hand-written loop's best data path: on a GPU the uint8 set lives there
    from mchad.data.loaders import TensorBatchLoader

    loader = TensorBatchLoader(
        datamodule.data["train"],
        args.batch_size,
        shuffle=True,
        drop_last=True,
        seed=datamodule.seed,
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
        with autocast:  # the step's computation as Lightning's path runs it (compiled with model.compile)
            loss = model._train_terms(x, labels)[0]["loss"]
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

    from mchad.runs.train import _instantiate

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

    from mchad.runs.train import build

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
