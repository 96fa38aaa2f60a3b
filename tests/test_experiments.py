"""The 24 experiment configs (<dataset>-<method>): PAPER.md's hyperparameters, and each one
composes and runs a training and a test step on tiny offline data; outlier exposure."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import EXPERIMENTS, compose_config, make_image_folder
from mchad.errors import ConfigError, DataNotFoundError
from mchad.train import build, run

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
METHODS = {
    "mchad": "MCHAD", "gmchad": "G-MCHAD", "center": "Center", "gcenter": "G-Center",
    "cac": "CAC", "gcac": "G-CAC", "ii": "II", "softmax": "Softmax",
}  # fmt: skip
OUTLIER_EXPOSURE = {"gmchad", "gcenter", "gcac"}
#: the one experiment that keeps the WideResNet-40-2 backbone (the others use a small CNN)
WRN_EXPERIMENT = "cifar10-gmchad"

# PAPER.md's table; rows it does not list follow the cifar10 row, n_classes/n_embedding adapted
PAPER = {
    "cifar10-mchad": dict(n_embedding=16, margin=4.0, weight_center=0.5, weight_ce=1.0, weight_oe=0.0),
    "cifar10-gmchad": dict(n_embedding=16, margin=4.0, weight_center=1.0, weight_ce=1.5, weight_oe=1e-5),
    "cifar10-center": dict(n_embedding=16, weight_center=0.5, weight_oe=0.0),
    "cifar10-gcenter": dict(n_embedding=16, margin=4.0, weight_center=1.0, weight_ce=1.5, weight_oe=8e-6),
    "cifar10-cac": dict(n_embedding=10, weight_center=2.0, magnitude=2.0, weight_oe=0.0),
    "cifar10-gcac": dict(n_embedding=10, margin=1.0, weight_center=2.0, weight_ce=1.5, weight_oe=5e-4, magnitude=2.0),
    "cifar10-ii": dict(n_embedding=16, weight_sep=100.0),
    "cifar100-mchad": dict(n_embedding=64, margin=8.0, weight_center=0.5, weight_ce=1.5, weight_oe=0.0),
    "cifar100-gmchad": dict(n_embedding=64, margin=8.0, weight_center=1.0, weight_ce=1.5, weight_oe=5e-4),
    "cifar100-cac": dict(n_embedding=100, weight_center=2.0, magnitude=10.0),
    "cifar100-gcac": dict(n_embedding=100, margin=1.0, weight_center=2.0, weight_ce=1.5, weight_oe=5e-4, magnitude=2.0),
    "svhn-mchad": dict(n_embedding=16, margin=4.0, weight_center=0.5, weight_ce=1.5, weight_oe=0.0),
    "svhn-gmchad": dict(n_embedding=16, margin=4.0, weight_center=1.0, weight_ce=1.5, weight_oe=5e-4),
    "svhn-cac": dict(n_embedding=10, weight_center=1.0, magnitude=1.0),
    "svhn-gcac": dict(n_embedding=10, margin=1.0, weight_center=2.0, weight_ce=1.5, weight_oe=5e-4, magnitude=2.0),
    "svhn-ii": dict(n_embedding=16, weight_sep=100.0),
}


def test_every_dataset_method_pair_has_an_experiment():
    assert sorted(EXPERIMENTS) == sorted(f"{d}-{m}" for d, m in product(DATASETS, METHODS))


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_published_hyperparameters(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    for key, value in PAPER[experiment].items():
        assert cfg.model[key] == pytest.approx(value), key
    dataset, method = experiment.split("-")
    assert cfg.model.name == METHODS[method]
    assert cfg.datamodule.n_classes == DATASETS[dataset]
    assert cfg.trainer.max_epochs == (20 if dataset == "cifar100" else 10)
    assert cfg.trainer.limit_train_batches == 392 and cfg.datamodule.batch_size == 128
    assert cfg.model.backbone._target_ == "mchad.backbones.WideResNetBackbone"
    if method in OUTLIER_EXPOSURE:
        assert cfg.datamodule.outliers._target_ == "mchad.data.TinyImages300kSource"
        assert cfg.datamodule.outlier_batch_size == 256
    else:
        assert cfg.datamodule.get("outliers") is None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny") / "images", classes=3, per_class=5)


def tiny_overrides(experiment: str, folder: Path, tmp_path: Path) -> list[str]:
    """Replace the experiment's data with tiny offline data; keep its model and losses."""
    dataset, method = experiment.split("-")
    overrides = [
        f"experiment={experiment}",
        "datamodule=imagefolder",
        f"datamodule.root={folder}",
        f"datamodule.n_classes={DATASETS[dataset]}",
        "datamodule.batch_size=4",
        "datamodule.outlier_batch_size=4",
        "datamodule.test_batch_size=16",
        "datamodule.val_fraction=0.2",
        "testmodules=noise",
        "datamodule.test_cases.GaussianNoise.n=8",
        "datamodule.test_cases.UniformNoise.n=8",
        f"dataset_dir={tmp_path / 'datasets'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "~callbacks",
        "~logger",
    ]
    if experiment != WRN_EXPERIMENT:
        overrides += ["model/backbone=convnet", "model.backbone.width=4"]
    if method in OUTLIER_EXPOSURE:
        overrides += ["datamodule/outliers=noise", "datamodule.outliers.n=8"]
    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_training_and_test_step(experiment, tiny_folder, tmp_path):
    cfg = compose_config([*tiny_overrides(experiment, tiny_folder, tmp_path), "++trainer.fast_dev_run=true"], output_dir=tmp_path / "run")
    frame = pd.read_csv(run(cfg))
    method = experiment.split("-")[1]
    assert (frame.method == METHODS[method]).all()
    assert (frame.experiment == experiment).all()
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    scores = list(dict.fromkeys(frame.score))
    assert scores[0] == ("msp" if method == "softmax" else "distance")
    assert ("cac" in scores) == (method in {"cac", "gcac"})
    assert frame[["Accuracy", "AUROC"]].notna().all().all()


@pytest.mark.parametrize("experiment", ["cifar10-gmchad", "svhn-gcenter", "cifar100-gcac"])
def test_g_variants_see_outliers_in_training(experiment, tiny_folder, tmp_path):
    """A training batch holds ID images and outliers (label -1); the push term is non-zero on
    it (with a margin wide enough to reach the untrained embeddings) and zero without them."""
    overrides = tiny_overrides(experiment, tiny_folder, tmp_path)
    overrides = [o for o in overrides if o != "model.backbone.width=4"] + ["model/backbone=convnet", "model.margin=1000"]
    datamodule, model = build(compose_config(overrides, output_dir=tmp_path / "run"))
    images, labels = next(iter(datamodule.train_dataloader()))
    assert (labels < 0).sum() == 4 and (labels >= 0).sum() == 4
    out = model(datamodule.transform(images, augment=True))
    assert model.method.loss(out, labels)["oe"].item() > 0
    known = labels >= 0
    assert model.method.loss({k: v[known] for k, v in out.items()}, labels[known])["oe"].item() == 0.0


def test_g_variant_without_outliers_is_refused(tiny_folder, tmp_path):
    overrides = [o for o in tiny_overrides("cifar10-gcac", tiny_folder, tmp_path) if not o.startswith("datamodule/outliers")]
    overrides = [o for o in overrides if not o.startswith("datamodule.outliers")]
    with pytest.raises(ConfigError, match="needs outliers"):
        build(compose_config([*overrides, "~datamodule/outliers"], output_dir=tmp_path / "run"))


def test_tinyimages_missing_offline_is_one_line(tiny_folder, tmp_path):
    overrides = [o for o in tiny_overrides("cifar10-gmchad", tiny_folder, tmp_path) if not o.startswith("datamodule/outliers")]
    overrides = [o for o in overrides if not o.startswith("datamodule.outliers")]
    cfg = compose_config([*overrides, "+datamodule.outliers.download=false"], output_dir=tmp_path / "run")
    with pytest.raises(DataNotFoundError, match="TinyImages300k not found") as error:
        build(cfg)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("model", sorted(METHODS))
def test_model_configs_work_on_the_quick_start(model, tmp_path):
    """`python run.py model=<method>` (G- variants with the photo-patch outliers) builds on digits."""
    overrides = [f"model={model}", f"dataset_dir={tmp_path}"]
    if model in OUTLIER_EXPOSURE:
        overrides.append("datamodule/outliers=photos")
    datamodule, built = build(compose_config(overrides, output_dir=tmp_path / "run"))
    assert datamodule.n_classes == 6
    if model in OUTLIER_EXPOSURE:
        assert datamodule.outliers.images.shape[1:] == (1, 8, 8)
        _, labels = next(iter(datamodule.train_dataloader()))
        assert (labels == -1).sum() == datamodule.outlier_batch_size
    z = built(torch.zeros(2, 1, 8, 8))
    assert set(built.method.scores(z)) == set(built.method.score_names)


def test_pretrained_checkpoint_through_the_config(tiny_folder, tmp_path):
    """`++model.pretrained_checkpoint=PATH` loads a Hendrycks-format checkpoint into the WRN."""
    from mchad.backbones import WideResNetBackbone

    source = WideResNetBackbone(1000).net  # WRN-40-2 with ImageNet's 1000 outputs
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "imagenet_wrn.pt")
    overrides = tiny_overrides("cifar10-mchad", tiny_folder, tmp_path)
    overrides = [o for o in overrides if not o.startswith("model/backbone") and not o.startswith("model.backbone")]
    cfg = compose_config([*overrides, f"++model.pretrained_checkpoint={tmp_path / 'imagenet_wrn.pt'}"], output_dir=tmp_path / "run")
    _, model = build(cfg)
    loaded = model.backbone.net.state_dict()
    assert torch.equal(loaded["conv1.weight"], source.state_dict()["conv1.weight"])
    assert loaded["fc.weight"].shape == (16, 128)
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
        build(compose_config([*overrides, f"++model.pretrained_checkpoint={tmp_path / 'bad.pt'}"], output_dir=tmp_path / "run"))
