"""The compile path on the CPU: the training step's computation is one graph for every method,
compiles (``model.compile``) and trains to the eager model's results; bad values are refused.

The GPU side (CUDA graphs with ``model.compile=reduce-overhead``, inductor's GPU kernels) is in
tests/test_gpu.py.
"""

from __future__ import annotations

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from test_device_guard import METHODS

from mchad.errors import ConfigError
from mchad.runs.train import build, compile_options

#: a small quick-start: tiny CNN, one short epoch, two small test cases
SHORT = [
    "model.backbone.width=8", "trainer.max_epochs=1", "trainer.min_epochs=1", "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
    "datamodule.test_cases.GaussianNoise.n=64", "datamodule.test_cases.UniformNoise.n=64",
]  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_the_training_step_is_one_graph(method, tmp_path):
    """torch.compile sees backbone, method, loss and accuracy count as one graph without breaks:
    the whole step compiles (and, on a GPU, can be one CUDA graph)."""
    cfg = compose_config(
        [f"model={method}", *METHODS[method], *SHORT, "~callbacks", "~logger", f"dataset_dir={tmp_path}"],
        output_dir=tmp_path / "run",
    )
    pl.seed_everything(1)
    datamodule, model = build(cfg)
    images, labels = next(iter(datamodule.train_dataloader()))
    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train_terms)(datamodule.transform(images, augment=True), labels)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


def _results(tmp_path, name: str, *overrides: str) -> tuple[pd.DataFrame, dict]:
    from mchad.runs.train import run

    callbacks = [
        f"~callbacks.{c}"
        for c in (
            "model_checkpoint",
            "progress_bar",
            "lr_monitor",
            "validation_views",
            "embedding_animation",
            "test_plots",
            "hparams",
        )
    ]  # last.ckpt stays
    cfg = compose_config([*SHORT, *callbacks, "model=gmchad", "datamodule/outliers=photos",
                          f"dataset_dir={tmp_path}", *overrides], output_dir=tmp_path / name)  # fmt: skip
    frame = pd.read_csv(run(cfg))
    state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    return frame, state


def test_a_compiled_step_trains_as_the_eager_one(tmp_path):
    """``model.compile`` with torch's AOT-autograd graphs run by eager kernels (``aot_eager``:
    the graphs compile would hand to inductor, without a C compiler) and ``fullgraph``: the same
    weights, checkpoint names and results as the eager run of the same seed."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, eager_state = _results(tmp_path, "eager")
    assert not counters["stats"]["unique_graphs"]
    compiled, compiled_state = _results(tmp_path, "compiled", "model.compile={backend: aot_eager, fullgraph: true}")
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert list(compiled_state) == list(eager_state)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    columns = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95"]
    pd.testing.assert_frame_equal(compiled[columns], eager[columns], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "value, expected",
    [(False, None), (None, None), (True, {}), ("reduce-overhead", {"mode": "reduce-overhead"}),
     ({"mode": "max-autotune", "fullgraph": True}, {"mode": "max-autotune", "fullgraph": True})],
)  # fmt: skip
def test_compile_options(value, expected):
    assert compile_options(value) == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.compile=fastest", r"model.compile=fastest: Unrecognized mode=fastest"),
        ("model.compile={backend: nonexistent}", r"model.compile=.*Invalid backend: 'nonexistent'"),
        ("model.compile={speed: 2}", r"unknown torch.compile argument\(s\) speed"),
        ("model.compile=3", r"model.compile must be false, true, a torch.compile mode or a mapping"),
    ],
)
def test_bad_compile_values_are_refused_before_training(override, message, tmp_path):
    cfg = compose_config(
        [*SHORT, "~callbacks", "~logger", override, f"dataset_dir={tmp_path}"], output_dir=tmp_path / "run"
    )
    with pytest.raises(ConfigError, match=message):
        build(cfg)


@pytest.mark.slow
def test_inductor_compiles_the_step_on_the_cpu(tmp_path):
    """``model.compile=true`` with inductor's CPU kernels (needs a C compiler; about 1.5 minutes
    on 2 cores): trains and tests, the results close to the eager run's."""
    torch._dynamo.reset()
    eager, _ = _results(tmp_path, "eager")
    compiled, _ = _results(tmp_path, "compiled", "model.compile=true")
    assert compiled.AUROC.to_numpy() == pytest.approx(eager.AUROC.to_numpy(), abs=0.02)


def test_adam_is_fused_on_a_gpu_unless_the_config_chose():
    """``fused=True`` only for CUDA parameters, only where the optimizer has it, never over the config's choice."""
    from functools import partial

    from mchad.models.module import make_optimizer, optimizer_options

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    adam = partial(torch.optim.Adam, lr=1e-3, weight_decay=5e-5)
    assert optimizer_options(adam, cuda) == {"fused": True}
    assert optimizer_options(adam, cpu) == {}
    assert optimizer_options(partial(torch.optim.Adam, foreach=True), cuda) == {}
    assert optimizer_options(partial(torch.optim.Adam, fused=False), cuda) == {}
    assert optimizer_options(partial(torch.optim.LBFGS), cuda) == {}  # no fused variant
    optimizer = make_optimizer(adam, [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.defaults["fused"] is None and optimizer.defaults["lr"] == 1e-3  # on the CPU: as configured
