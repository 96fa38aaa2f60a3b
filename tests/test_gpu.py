"""The GPU suite: the paths users take on a GPU, on ``cuda`` (marker ``gpu``).

Deselected by default (CI has no GPU); ``pytest -m gpu`` runs it, and skips it cleanly where
CUDA is not available. ``MCHAD_GPU_TESTS_DEVICE=cpu pytest -m gpu`` runs the same tests on the
CPU, to check the suite itself on a machine without a GPU (the device-specific assertions
then check the CPU). ``bash/gpu-check.sh`` runs it before the paper-scale runs.

Every experiment config trains a few steps, validates and tests with the default callbacks on
a tiny image folder the test makes (tests/test_experiments.py's tiny set-up); resume and
evaluation only; bf16-mixed; torch.compile (also with CUDA graphs); no host synchronisation in
the training step; the 2-D embedding GIF; data on the device or not;
the NaN guard's device path; a checkpoint trained on the GPU tested on the CPU, and back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import EXPERIMENTS, compose_config, make_image_folder
from test_experiments import tiny_overrides

DEVICE = os.environ.get("MCHAD_GPU_TESTS_DEVICE", "cuda")
ACCELERATOR = {"cuda": "gpu", "cpu": "cpu"}[DEVICE]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: a few steps, one validation, one test; the default callbacks and loggers stay on
SHORT = [
    f"trainer.accelerator={ACCELERATOR}",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.min_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("gpu") / "images", classes=3, per_class=6)


def experiment_overrides(experiment: str, folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    """tests/test_experiments.py's tiny data for ``experiment``, with the default callbacks and
    loggers, on the device under test."""
    keep = [o for o in tiny_overrides(experiment, folder, tmp_path) if o not in ("~callbacks", "~logger")]
    return [*keep, *SHORT, *extra]


def train_and_test(overrides: list[str], output_dir: Path) -> pd.DataFrame:
    from mchad.runs.train import run

    frame = pd.read_csv(run(compose_config(overrides, output_dir=output_dir)))
    assert frame[["Accuracy", "AUROC"]].notna().all().all()
    assert list((output_dir / "plots").glob("*_roc.png")), "the test plots are missing"
    assert list((output_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"
    return frame


@pytest.fixture
def loader_devices(monkeypatch) -> list[str]:
    """The device type of every tensor set the batch loaders gather from."""
    from mchad.data.loaders import TensorBatchLoader

    seen: list[str] = []
    original = TensorBatchLoader.tensors

    def tensors(self):
        images, labels = original(self)
        seen.append(images.device.type)
        return images, labels

    monkeypatch.setattr(TensorBatchLoader, "tensors", tensors)
    return seen


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_validates_and_tests(experiment, tiny_folder, tmp_path, loader_devices):
    frame = train_and_test(experiment_overrides(experiment, tiny_folder, tmp_path), tmp_path / "run")
    assert (frame.experiment == experiment).all()
    # data_on_device=auto: the tiny sets fit, so batches are gathered on the device
    assert set(loader_devices) == {DEVICE}


@pytest.mark.parametrize("on_device", [True, False])
def test_data_on_device_or_on_the_host(on_device, tiny_folder, tmp_path, loader_devices):
    """Both data paths with every default callback (the first crashed at validation when the
    validation images lived on the GPU and the callbacks' noise on the host)."""
    overrides = experiment_overrides(
        "cifar10-gmchad", tiny_folder, tmp_path, f"++datamodule.data_on_device={on_device}"
    )
    train_and_test(overrides, tmp_path / "run")
    assert set(loader_devices) == {DEVICE if on_device else "cpu"}


def test_bf16_mixed_and_channels_last(tiny_folder, tmp_path):
    overrides = experiment_overrides(
        "cifar10-mchad", tiny_folder, tmp_path, "trainer.precision=bf16-mixed", "model.channels_last=true"
    )
    train_and_test(overrides, tmp_path / "run")


def test_compiled_step_with_cuda_graphs_and_bf16(tiny_folder, tmp_path):
    """The fastest settings: the whole step's forward and backward as CUDA graphs
    (``reduce-overhead``; on the CPU inductor skips the graphs), bf16-mixed, outliers."""
    overrides = experiment_overrides(
        "cifar10-gmchad",
        tiny_folder,
        tmp_path,
        "model.compile=reduce-overhead",
        "trainer.precision=bf16-mixed",
        "trainer.limit_train_batches=4",
    )
    frame = train_and_test(overrides, tmp_path / "run")
    assert frame.AUROC.notna().all()


def test_the_training_step_never_synchronises(tiny_folder, tmp_path):
    """Training step 1 (not a logging step) under ``torch.cuda.set_sync_debug_mode("error")``:
    any host synchronisation in the step, the loop or a callback raises there. Fused Adam."""
    import pytorch_lightning as pl

    from mchad.runs.train import build, make_trainer

    class SyncError(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1 and DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1 and DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")

    overrides = experiment_overrides(
        "cifar10-gmchad",
        tiny_folder,
        tmp_path,
        "trainer.limit_train_batches=3",
        "trainer.log_every_n_steps=50",
        "++datamodule.data_on_device=true",
    )
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    datamodule, model = build(cfg)
    trainer = make_trainer(cfg, extra_callbacks=(SyncError(),), num_sanity_val_steps=0, limit_val_batches=0)
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step >= 2
    assert trainer.optimizers[0].defaults.get("fused") is (True if DEVICE == "cuda" else None)


def test_embedding_gif(tmp_path):
    """The quick-start with a 2-D embedding: one frame per epoch and the GIF."""
    overrides = [*SHORT, "trainer.max_epochs=2", "trainer.min_epochs=2", "model.n_embedding=2",
                 "model.weight_center=10", f"dataset_dir={tmp_path / 'data'}"]  # fmt: skip
    train_and_test(overrides, tmp_path / "run")
    assert len(list((tmp_path / "run" / "plots" / "embedding").glob("epoch_*.png"))) == 2
    assert (tmp_path / "run" / "embedding.gif").stat().st_size > 0


def test_resume_and_evaluation_only(tiny_folder, tmp_path):
    overrides = experiment_overrides("cifar10-mchad", tiny_folder, tmp_path)
    train_and_test(overrides, tmp_path / "run")
    # as `python run.py resume=<run> trainer.max_epochs=2`: the run's own config, one value changed
    train_and_test([f"resume={tmp_path / 'run'}", "trainer.max_epochs=2"], tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1
    train_and_test([*overrides, "train=false", f"ckpt_path={tmp_path / 'run'}"], tmp_path / "eval")


def test_checkpoint_moves_between_gpu_and_cpu(tiny_folder, tmp_path):
    """Trained on the device under test and tested on the CPU, and the other way round: the
    same model gives the same accuracy and nearly the same AUROC wherever it is tested."""
    on_device = experiment_overrides("cifar10-mchad", tiny_folder, tmp_path)
    on_cpu = [o for o in on_device if not o.startswith("trainer.accelerator=")] + ["trainer.accelerator=cpu"]
    for trained, tested, name in ((on_device, on_cpu, "there"), (on_cpu, on_device, "back")):
        here = train_and_test(trained, tmp_path / f"{name}-trained")
        moved = train_and_test(
            [*tested, "train=false", f"ckpt_path={tmp_path / f'{name}-trained'}"], tmp_path / f"{name}-tested"
        )
        assert moved.Accuracy.to_numpy() == pytest.approx(here.Accuracy.to_numpy(), abs=0.06), name  # one flip of 18
        assert moved.AUROC.to_numpy() == pytest.approx(here.AUROC.to_numpy(), abs=0.05), name


def test_non_finite_loss_stops_on_the_device(tiny_folder, tmp_path, monkeypatch):
    """The NaN guard's device path (no host sync per step) stops the run and names the step."""
    from mchad.errors import NonFiniteLossError
    from mchad.models.module import OODModel
    from mchad.runs.train import run

    original = OODModel.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        assert loss.device.type == DEVICE
        return loss * float("nan") if self.global_step == 1 else loss

    monkeypatch.setattr(OODModel, "training_step", poisoned)
    overrides = experiment_overrides("cifar10-mchad", tiny_folder, tmp_path, "trainer.limit_train_batches=3")
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        run(compose_config(overrides, output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "results.csv").exists()
