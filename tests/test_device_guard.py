"""CPU-side guards against tensors on the wrong device (CI has no GPU), see mchad.devices.

1. Static: every tensor factory call in ``src/mchad`` (``torch.zeros``, ``torch.from_numpy``,
   ``torch.Generator``, ... and ``torch.load``) says where its tensor goes: a ``device=``
   (``map_location=`` for ``torch.load``) argument, or a ``# cpu: <why>`` comment on the call
   or the line above it. A new factory cannot slip in without a decision.
2. Dynamic: training, validation with the default callbacks and testing run with the model
   and the batches on an emulated second device (:mod:`device_emulation`): a tensor made on
   the host and mixed into device computations fails there as it would on a GPU.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, compose_config
from device_emulation import EMULATED, DeviceMismatch, on_emulated_device

from mchad import registry

SRC = ROOT / "src" / "mchad"

#: torch functions that create a tensor (or generator) from nothing: the device must be chosen
FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
    "randint", "randperm", "normal", "tensor", "as_tensor", "asarray", "from_numpy", "frombuffer",
    "empty_strided", "scalar_tensor", "tril_indices", "triu_indices", "Generator", "load",
}  # fmt: skip
DEVICE_KEYWORD = {"load": "map_location"}
MARKER = re.compile(r"#\s*cpu:\s*\S")


def unplaced_factories(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: torch.<factory>(...)`` for each factory call without a device decision."""
    tree = ast.parse(source)
    lines = source.splitlines()
    # the first line of the statement holding each node: a marker may sit on the line above it
    statement_line: dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    statement_line[id(child)] = node.lineno  # ast.walk goes outside in: the innermost
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            for alias in node.names:
                if alias.name in FACTORIES:
                    problems.append(
                        f"{filename}:{node.lineno}: `from torch import {alias.name}` hides a factory from this check"
                    )
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
        ):
            continue
        keyword = DEVICE_KEYWORD.get(node.func.attr, "device")
        if any(k.arg == keyword for k in node.keywords):
            continue
        first = statement_line.get(id(node), node.lineno)
        span = lines[max(0, first - 2) : node.end_lineno]
        if any(MARKER.search(line) for line in span):
            continue
        problems.append(
            f"{filename}:{node.lineno}: torch.{node.func.attr}(...) without {keyword}= or a `# cpu: <why>` comment"
        )
    return problems


def test_every_tensor_factory_in_the_package_says_where_its_tensor_goes():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += unplaced_factories(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "code, flagged",
    [
        ("x = torch.zeros(3)", True),
        ("x = torch.from_numpy(a)", True),
        ("x = torch.load(p)", True),
        ("from torch import zeros", True),
        ("x = torch.zeros(3,\n    dtype=torch.long)", True),
        ("x = torch.zeros(3, device=y.device)", False),
        ("x = torch.load(p, map_location='cpu')", False),
        ("x = torch.from_numpy(a)  # cpu: host data", False),
        ("# cpu: host data\nx = torch.full((n,), -1)", False),
        ("x = torch.cat([a, b])", False),
        ("x = torch.zeros_like(a)", False),
        ("x = torch.tensor(3)  # cpu:", True),  # a marker needs a reason
    ],
)
def test_the_static_check_flags_factories_without_a_decision(code, flagged):
    assert bool(unplaced_factories(code)) == flagged


# ----------------------------------------------------------------------------- dynamic


def test_the_emulated_device_refuses_what_a_gpu_refuses():
    import numpy as np

    with on_emulated_device() as mode:
        x = torch.ones(3).to(EMULATED)
        assert x.device == EMULATED and (x + 1).device == EMULATED
        assert (torch.zeros(3, device=x.device) + x).device == EMULATED
        assert (x + torch.tensor(2.0)).device == EMULATED  # a host 0-dim tensor mixes, as on CUDA
        assert x[torch.tensor([0, 2])].device == EMULATED  # a host index into a device tensor
        assert x.cpu().device == torch.device("cpu") and mode.is_device(x)
        for mix in (
            lambda: torch.cat([x, torch.zeros(3)]),
            lambda: x * torch.from_numpy(np.ones(3)),
            lambda: x.numpy(),
            lambda: torch.nn.Linear(3, 2)(x.view(1, 3)),
        ):
            with pytest.raises(DeviceMismatch):
                mix()


def _emulated_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "model.backbone.width=8",
        "datamodule.test_cases.GaussianNoise.n=64",
        "datamodule.test_cases.UniformNoise.n=64",
        *(
            f"callbacks.{c}.{k}=64"
            for c in ("validation_views", "embedding_animation")
            for k in ("max_samples", "unknown_samples")
        ),
        "+trainer.strategy._target_=pytorch_lightning.strategies.SingleDeviceStrategy",
        f"+trainer.strategy.device={EMULATED}",
        f"dataset_dir={tmp_path / 'data'}",
        *extra,
    ]


@pytest.fixture
def emulated_data_device(monkeypatch):
    """``datamodule.data_on_device=true`` gathers on the emulated device (the datamodule only
    puts data on CUDA devices otherwise)."""
    from mchad.data.datamodule import OODDataModule

    original = OODDataModule._device

    def device(self):
        root = self.trainer.strategy.root_device if self.trainer is not None else None
        return root if root == EMULATED and self.data_on_device is True else original(self)

    monkeypatch.setattr(OODDataModule, "_device", device)


@pytest.mark.parametrize(
    "overrides",
    [
        # the original bug: validation images on the device, the callbacks' noise on the host
        ["model.n_embedding=2", "model.weight_center=10", "++datamodule.data_on_device=true"],
        ["model=gmchad", "datamodule/outliers=photos", "++datamodule.data_on_device=true"],
        ["model=ii", "++datamodule.data_on_device=false"],
    ],
    ids=["mchad-2d", "gmchad", "ii-host-data"],
)
def test_training_callbacks_and_testing_keep_to_the_device(overrides, tmp_path, emulated_data_device):
    """The quick-start with the default callbacks, the model on the emulated device (and with
    data_on_device its data sets too): nothing mixes a host tensor into device computations,
    and results.csv, the plots and (2-D) the GIF are written."""
    from mchad.runs.train import run

    cfg = compose_config(_emulated_overrides(tmp_path, *overrides), output_dir=tmp_path / "run")
    with on_emulated_device():
        path = run(cfg)
    frame = pd.read_csv(path)
    assert frame[["Accuracy", "AUROC"]].notna().all().all()
    assert list((tmp_path / "run" / "plots").glob("*_roc.png"))
    if "model.n_embedding=2" in overrides:
        assert (tmp_path / "run" / "embedding.gif").is_file()


def test_resume_and_evaluation_only_keep_to_the_device(tmp_path, emulated_data_device):
    from mchad.runs.train import run

    overrides = _emulated_overrides(tmp_path, "++datamodule.data_on_device=true")
    with on_emulated_device():
        run(compose_config(overrides, output_dir=tmp_path / "run"))
        resumed = compose_config(
            [*overrides, f"resume={tmp_path / 'run'}", "trainer.max_epochs=2"], output_dir=tmp_path / "run"
        )
        run(resumed)
        tested = compose_config(
            [*overrides, "train=false", f"ckpt_path={tmp_path / 'run'}"], output_dir=tmp_path / "eval"
        )
        assert pd.read_csv(run(tested))["AUROC"].notna().all()


def test_the_non_finite_loss_guard_on_the_device():
    """The guard's device path (no host sync per step) on device tensors."""
    from types import SimpleNamespace

    from mchad.errors import NonFiniteLossError
    from mchad.runs.nan_guard import NonFiniteLossGuard

    guard = NonFiniteLossGuard(sync_every_step=False)
    trainer = SimpleNamespace(global_step=1, log_every_n_steps=2, current_epoch=0)
    with on_emulated_device():
        guard.on_train_batch_end(trainer, None, torch.tensor(1.0).to(EMULATED), None, 0)
        trainer.global_step = 2
        with pytest.raises(NonFiniteLossError, match="at step 1"):
            guard.on_train_batch_end(trainer, None, torch.tensor(float("nan")).to(EMULATED), None, 1)


# ----------------------------------------------------------------------------- host synchronisation
#: every method, the G- variants with the quick-start's outlier photos
METHODS = {m.key: ["datamodule/outliers=photos"] if m.outliers else [] for m in registry.methods().values()}


def test_the_recorder_sees_what_a_gpu_waits_for():
    with on_emulated_device() as mode:
        x = torch.arange(6.0).to(EMULATED)
        host = torch.arange(6.0)
        mode.recording = True
        waits = [
            lambda: x.sum().item(), lambda: bool(x[0] > 1), lambda: float(x[1]), lambda: x.tolist(),
            lambda: x.cpu(), lambda: x.to("cpu"), lambda: x.nonzero(), lambda: x[x > 2], lambda: torch.where(x > 2),
            lambda: x.unique(), lambda: f"{x[0]:.1f}",
        ]  # fmt: skip
        for i, wait in enumerate(waits):
            before = len(mode.syncs)
            wait()
            assert len(mode.syncs) == before + 1, f"operation {i} not recorded"
        mode.syncs.clear()
        # what does not wait: device computations, host values, masks used arithmetically
        (x * (x > 2)).sum(), torch.where(x > 2, x, 0.0), x[torch.tensor([0, 2])], host.sum().item(), x.to(EMULATED)
        assert mode.syncs == []


def _step_recorder(mode, first: int, last: int):
    import pytorch_lightning as pl

    class StepRecorder(pl.Callback):
        """Records from the start of training batch ``first`` to the end of batch ``last``:
        whole steps, the loop's and every callback's work included."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                mode.recording = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == last:
                mode.recording = False

    return StepRecorder()


def _recorded_steps(tmp_path, overrides: list[str], first: int, last: int) -> list[str]:
    from mchad.runs.train import build, make_trainer

    cfg = compose_config(
        _emulated_overrides(
            tmp_path, "++datamodule.data_on_device=true", f"trainer.limit_train_batches={last + 1}", *overrides
        ),
        output_dir=tmp_path / "run",
    )
    with on_emulated_device() as mode:
        datamodule, model = build(cfg)
        # training steps only: the validation (and its callbacks) come after them
        trainer = make_trainer(
            cfg, extra_callbacks=(_step_recorder(mode, first, last),), num_sanity_val_steps=0, limit_val_batches=0
        )
        trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == last + 1
    return mode.syncs


@pytest.mark.parametrize("method, progress_bar", [*((m, False) for m in METHODS), ("mchad", True)])
def test_the_training_step_never_waits_for_the_device(method, progress_bar, tmp_path, emulated_data_device):
    """Steps 1-4 of every method with the default callbacks (and steps 1-9 with the progress bar
    drawn, which refreshes after the 10th), data on the (emulated) device and no logging step among
    them: nothing makes the host wait for the GPU (no ``.item()``, no copy to the host, no
    data-dependent shape), so the host can queue steps ahead of the device."""
    overrides = [f"model={method}", "trainer.log_every_n_steps=50", f"trainer.enable_progress_bar={progress_bar}"]
    syncs = _recorded_steps(tmp_path, [*overrides, *METHODS[method]], 1, 9 if progress_bar else 4)
    assert syncs == [], "\n".join(syncs)


def test_logging_steps_are_the_only_ones_that_wait(tmp_path, emulated_data_device):
    """With ``trainer.log_every_n_steps=3`` the values logged at steps 2 and 5 are read on the
    host (Lightning hands them to the loggers as numbers): a few waits on those steps, none on
    the others."""
    import pytorch_lightning as pl

    per_step: dict[int, int] = {}

    class PerStep(pl.Callback):
        def __init__(self):
            self.mode = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            per_step[batch_idx] = len(self.mode.syncs)

    from mchad.runs.train import build, make_trainer

    cfg = compose_config(
        _emulated_overrides(
            tmp_path, "++datamodule.data_on_device=true", "trainer.limit_train_batches=6", "trainer.log_every_n_steps=3"
        ),
        output_dir=tmp_path / "run",
    )
    counter = PerStep()
    with on_emulated_device() as mode:
        counter.mode = mode
        datamodule, model = build(cfg)
        trainer = make_trainer(cfg, extra_callbacks=(_step_recorder(mode, 0, 5), counter))
        trainer.fit(model, datamodule=datamodule)
    # Lightning logs at the end of a step, after the callbacks' on_train_batch_end: a logging
    # step's waits show up in the next step's count
    waits = [per_step[i] - per_step.get(i - 1, 0) for i in range(6)]
    assert sum(waits) > 0, "the logged values never reached the host"
    assert all(waits[i] == 0 for i in (0, 1, 2, 4)), waits
