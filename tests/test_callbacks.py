"""Tests of mchad.callbacks: the views of the hyperspheres on the quick-start (digits).

Two short runs (module-scoped): MCHAD with a 2-D embedding for 3 epochs (frames, GIF,
per-test-case plots, TensorBoard histogram / projector / hparams) and Softmax (no centres,
128-D) for 1 epoch (nothing breaks, no GIF). Plus fast unit tests of the helpers.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate
from PIL import Image

from mchad import registry
from mchad.callbacks.animation import sphere_geometry
from mchad.callbacks.hparams import flatten_config
from mchad.callbacks.sample import headline_score, method_centers, unknown_images
from mchad.models.methods import MCHAD, Softmax

TEST_CASES = ["Digits6-9", "GaussianNoise", "UniformNoise"]


def _train(output_dir: Path, overrides: list[str]) -> Path:
    from hydra.core.global_hydra import GlobalHydra

    from mchad.runs.train import run

    cfg = compose_config(["trainer.enable_progress_bar=false", *overrides], output_dir)
    try:
        run(cfg)
    finally:
        GlobalHydra.instance().clear()
    return output_dir


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run2d")
    return _train(
        out,
        [
            "model.n_embedding=2",
            "model.weight_center=10",
            "trainer.max_epochs=3",
            "trainer.min_epochs=3",
            "trainer.limit_train_batches=4",
        ],
    )


@pytest.fixture(scope="module")
def run_softmax(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runsoftmax")
    return _train(
        out, ["model=softmax", "trainer.max_epochs=1", "trainer.min_epochs=1", "trainer.limit_train_batches=2"]
    )


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
        return im.size


@functools.lru_cache(maxsize=8)
def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulators = []
    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"histograms": 0, "images": 0, "tensors": 0, "scalars": 0})
        ea.Reload()
        accumulators.append(ea)
    assert accumulators, "no TensorBoard event files"
    return tuple(accumulators)


def _tags(run: Path, kind: str) -> set[str]:
    return {t for ea in _events(run) for t in ea.Tags()[kind]}


# ------------------------------------------------------------------------- 2-D run


def test_embedding_frames_and_gif(run_2d):
    frames = sorted((run_2d / "plots" / "embedding").glob("epoch_*.png"))
    assert [f.name for f in frames] == ["epoch_000.png", "epoch_001.png", "epoch_002.png"]
    sizes = {_assert_png(f) for f in frames}
    assert len(sizes) == 1  # fixed figure size: frames stack into one animation
    gif = run_2d / "embedding.gif"
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames == 3  # one per epoch (titles differ, so Pillow merges none)
        assert im.size == sizes.pop()


def test_per_test_case_plots(run_2d):
    for case in TEST_CASES:
        for score in ("distance",):
            _assert_png(run_2d / "plots" / f"{case}_{score}_hist.png")
            _assert_png(run_2d / "plots" / f"{case}_{score}_roc.png")
    _assert_png(run_2d / "plots" / "val_distance_hist.png")


def test_tensorboard_views(run_2d):
    scalars = _tags(run_2d, "scalars")
    # loss terms, accuracy and AUROC per score and test case reach TensorBoard
    for tag in ("train/center_epoch", "train/nll_epoch", "val/loss", "val/acc", "train/acc", "test/acc"):
        assert tag in scalars, tag
    for case in TEST_CASES:
        assert f"test/{case}/distance/AUROC" in scalars
    assert "val/unknown/distance/AUROC" in scalars
    # known vs unknown histograms at validation, one per epoch
    histograms = _tags(run_2d, "histograms")
    assert {"val/distance_known", "val/distance_unknown"} <= histograms
    counts = [
        len(ea.Histograms("val/distance_known"))
        for ea in _events(run_2d)
        if "val/distance_known" in ea.Tags()["histograms"]
    ]
    assert sum(counts) == 3
    # test plots as images
    images = _tags(run_2d, "images")
    assert "test/Digits6-9/distance/roc" in images and "val/distance_hist" in images
    # hparams: the plugin's summaries and the hp/ metrics
    content = {}
    for ea in _events(run_2d):
        try:
            content.update(ea.PluginTagToContent("hparams"))
        except KeyError:  # this event file has no hparams summaries
            pass
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    assert {"hp/test_acc", "hp/distance/AUROC", "hp/val_acc"} <= scalars
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    info = data.session_start_info
    assert info.hparams["model.n_embedding"].number_value == 2
    assert info.hparams["model.weight_center"].number_value == 10
    assert info.hparams["datamodule.name"].string_value == "Digits"


def test_projector(run_2d):
    config = (run_2d / "tb" / "projector_config.pbtxt").read_text()
    assert "val_embedding" in config
    folders = list((run_2d / "tb").glob("*/val_embedding"))
    assert len(folders) == 1
    tensors = np.loadtxt(folders[0] / "tensors.tsv", ndmin=2)
    metadata = (folders[0] / "metadata.tsv").read_text().splitlines()
    assert tensors.shape[1] == 2 and len(metadata) == len(tensors) + 1  # + header
    assert metadata[0].split("\t")[:2] == ["label", "kind"]
    kinds = {line.split("\t")[1] for line in metadata[1:]}
    assert kinds == {"known", "unknown"}
    assert (folders[0] / "sprite.png").is_file()


# ------------------------------------------------------------------------- no centres, not 2-D


def test_softmax_run_skips_animation(run_softmax):
    assert not (run_softmax / "embedding.gif").exists()
    assert not list((run_softmax / "plots").glob("embedding/*.png"))
    for case in TEST_CASES:
        _assert_png(run_softmax / "plots" / f"{case}_msp_hist.png")
        _assert_png(run_softmax / "plots" / f"{case}_msp_roc.png")
    histograms = _tags(run_softmax, "histograms")
    assert {"val/msp_known", "val/msp_unknown"} <= histograms  # first score without "distance"
    folders = list((run_softmax / "tb").glob("*/val_embedding"))
    assert len(folders) == 1 and np.loadtxt(folders[0] / "tensors.tsv", ndmin=2).shape[1] == 128


def test_callbacks_can_be_switched_off(tmp_path):
    cfg = compose_config(["~callbacks.embedding_animation", "callbacks.validation_views.projector=false"], tmp_path)
    assert "embedding_animation" not in cfg.callbacks
    assert {"model_checkpoint", "lr_monitor", "validation_views", "test_plots", "hparams"} <= set(cfg.callbacks)
    assert cfg.callbacks.validation_views.projector is False
    assert cfg.callbacks.test_plots.dirpath == f"{tmp_path}/plots"


# ------------------------------------------------------------------------- helpers


def test_sphere_geometry_respects_semantics():
    published = sphere_geometry(MCHAD(3, 2, radius=1.0, margin=4.0))
    assert published == {"radius": 1.0, "margin": 4.0, "squared": True}  # circles sqrt(1), sqrt(4)
    paper = sphere_geometry(MCHAD(3, 2, radius=1.0, margin=4.0, semantics="paper"))
    assert paper == {"radius": 1.0, "margin": 5.0, "squared": False}  # circles r and r + m
    assert sphere_geometry(MCHAD(3, 2, radius=0.0, margin=0.0))["margin"] is None
    assert sphere_geometry(Softmax(3, 2)) == {"radius": 0.0, "margin": None, "squared": True}
    assert method_centers(Softmax(3, 2)) is None
    assert method_centers(MCHAD(3, 2)).shape == (3, 2)


def test_headline_score():
    assert headline_score({"msp": 1, "distance": 2}) == "distance"
    assert headline_score({"msp": 1, "energy": 2}) == "msp"
    with pytest.raises(ValueError):
        headline_score({})


def test_unknown_images_from_outliers_or_seeded_noise():
    class WithOutliers:
        outliers = type(
            "A", (), {"images": torch.arange(50 * 3 * 4 * 4, dtype=torch.int32).view(50, 3, 4, 4).to(torch.uint8)}
        )()

    images, source = unknown_images(WithOutliers(), (3, 4, 4), torch.uint8, 10, seed=1)
    assert source == "outliers" and images.shape == (10, 3, 4, 4)
    again, _ = unknown_images(WithOutliers(), (3, 4, 4), torch.uint8, 10, seed=1)
    assert torch.equal(images, again)
    noise, source = unknown_images(object(), (1, 8, 8), torch.uint8, 7, seed=3)
    assert source == "noise" and noise.shape == (7, 1, 8, 8) and noise.dtype == torch.uint8
    assert torch.equal(noise, unknown_images(None, (1, 8, 8), torch.uint8, 7, seed=3)[0])
    # outliers of another shape are not used
    assert unknown_images(WithOutliers(), (1, 8, 8), torch.uint8, 5, seed=1)[1] == "noise"


def test_flatten_config():
    flat = flatten_config({"hydra": {"x": 1}, "a": {"b": 1, "c": [1, 2], "d": None}, "e": "s"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "None", "e": "s"}


def _attribute_geometry(method) -> dict:
    """The views' geometry as read before the explicit interface (attributes guessed by name):
    the reference that the pictures stay the same."""
    holder = None
    for candidate in (getattr(method, "terms", None), getattr(method, "push", None), method):
        if candidate is not None and hasattr(candidate, "margin") and hasattr(candidate, "radius"):
            holder = candidate
            break
    if holder is None:
        return {"radius": 0.0, "margin": None, "squared": True}
    radius, margin = float(holder.radius or 0.0), float(holder.margin or 0.0)
    if getattr(holder, "semantics", "published") == "paper":
        return {"radius": radius, "margin": radius + margin if margin > 0 else None, "squared": False}
    return {"radius": radius, "margin": margin if margin > 0 else None, "squared": True}


#: the built-in methods: those that the views drew before the explicit interface
BUILT_IN = [key for key, method in registry.methods().items() if method.cls.startswith("mchad.")]


@pytest.mark.parametrize("semantics", ["published", "paper"])
@pytest.mark.parametrize("key", BUILT_IN)
def test_the_views_draw_what_they_drew_before_through_the_interface(key, semantics):
    """Each registered method's circles and centres, from Method.geometry(), are those the views
    found by attribute names before (same frames); CAC's embedding is its number of classes."""
    entry = registry.methods()[key]
    cfg = compose_config([f"model={entry.model}", f"model.semantics={semantics}"])
    for name, value in (("radius", 0.5), ("margin", 3.0)):
        if name in cfg.model:
            cfg.model[name] = value
    if not entry.embedding_is_classes:
        cfg.model.n_embedding = 2
    method = instantiate(cfg.model.method)
    assert sphere_geometry(method) == _attribute_geometry(method)
    old_centers = getattr(method, "centers", None)
    new_centers = method_centers(method)
    if old_centers is None:
        assert new_centers is None
    else:
        assert torch.equal(new_centers, old_centers.detach().cpu().float())
