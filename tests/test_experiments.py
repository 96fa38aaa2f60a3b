"""The 24 experiment configs (<dataset>-<method>): PAPER.md's hyperparameters, and each one
composes and runs a training and a test step on tiny offline data; outlier exposure."""

from __future__ import annotations

import functools
import re
from itertools import product
from pathlib import Path

import composed_snapshot
import pandas as pd
import pytest
import torch
import yaml
from conftest import EXPERIMENTS, compose_config, make_image_folder
from hydra.utils import instantiate

from mchad import registry
from mchad.errors import ConfigError, DataNotFoundError
from mchad.models.module import OODModel
from mchad.runs.train import build, run

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn": 10}
assert tuple(DATASETS) == registry.DATASETS
METHODS = {m.key: m.name for m in registry.methods().values()}
OUTLIER_EXPOSURE = {m.key for m in registry.methods().values() if m.outliers}
#: the experiments with published values (their readable files), checked against the table below
PUBLISHED = registry.experiments("paper", [m.key for m in registry.methods().values() if m.published])
#: the one experiment that keeps the WideResNet-40-2 backbone (the others use a small CNN)
WRN_EXPERIMENT = "cifar10-gmchad"

#: the published runs' effective values, one row per experiment, with their source in
#: published-mchad (see the method tables of docs/methods.md)
EFFECTIVE = pd.read_csv(Path(__file__).parent / "data" / "published_effective.csv").set_index("experiment")
WEIGHT_COLUMNS = {c[2:]: c for c in EFFECTIVE.columns if c.startswith("w_")}


def test_every_dataset_method_pair_has_an_experiment():
    """Each method of the registry has an experiment per dataset: the published ones as readable
    files (with a row of published values), the others generated from the registry."""
    assert sorted(registry.experiments("paper")) == sorted(f"{d}-{m}" for d, m in product(DATASETS, METHODS))
    assert sorted(EXPERIMENTS) == sorted(PUBLISHED)
    assert sorted(EFFECTIVE.index) == sorted(PUBLISHED)
    for name in registry.experiments("paper"):
        assert compose_config([f"experiment={name}"]).name == name


def given(row: pd.Series, column: str) -> bool:
    return not pd.isna(row[column])


@pytest.mark.parametrize("experiment", PUBLISHED)
def test_experiment_builds_the_published_loss(experiment):
    """Compose the experiment, build its method, optimiser and scheduler, and compare every
    effective value with the table: the weight of each loss term (the method's own weights and
    the loss it computes), margin, radius, magnitude, n_embedding, epochs, batch sizes, batch
    limits, optimiser and scheduler period."""
    row = EFFECTIVE.loc[experiment]
    cfg = compose_config([f"experiment={experiment}"])
    dataset, method_key = experiment.split("-")
    assert cfg.model.name == row.method == METHODS[method_key]
    assert cfg.datamodule.n_classes == DATASETS[dataset]
    method = instantiate(cfg.model.method)
    expected = {term: row[column] for term, column in WEIGHT_COLUMNS.items() if given(row, column)}
    assert method.weights == pytest.approx(expected)
    # the loss built from them: sum of weight * term
    torch.manual_seed(0)
    z = torch.randn(6, int(row.n_embedding))
    labels = torch.tensor([0, 1, 2, 0, -1, -1] if method_key in OUTLIER_EXPOSURE else [0, 1, 2, 0, 1, 2])
    terms = method.loss(method(z), labels)
    assert terms["loss"].item() == pytest.approx(sum(w * terms[t].item() for t, w in expected.items()), rel=1e-5)
    if given(row, "margin"):
        assert method.push.margin == row.margin
    if given(row, "radius"):
        assert getattr(method, "pull_radius", 0.0) == row.radius
    if given(row, "magnitude"):
        assert torch.equal(method.centers, row.magnitude * torch.eye(int(row.n_embedding)))
    width = {"II": lambda: method.norm.num_features, "Softmax": lambda: method.head.in_features}
    assert width.get(row.method, lambda: method.centers.shape[1])() == row.n_embedding == cfg.model.n_embedding
    # training
    assert (cfg.trainer.min_epochs, cfg.trainer.max_epochs) == (row.min_epochs, row.max_epochs)
    assert cfg.datamodule.batch_size == row.batch_size
    assert (cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (
        row.limit_train_batches,
        row.limit_val_batches,
    )
    assert cfg.model.backbone._target_ == "mchad.models.backbones.WideResNetBackbone"
    if method_key in OUTLIER_EXPOSURE:
        assert cfg.datamodule.outliers._target_ == "mchad.data.TinyImages300kSource"
        assert cfg.datamodule.outlier_batch_size == row.outlier_batch_size
    else:
        assert cfg.datamodule.get("outliers") is None and not given(row, "outlier_batch_size")
    model = OODModel(torch.nn.Linear(1, 1), method, instantiate(cfg.model.optimizer), instantiate(cfg.model.scheduler))
    built = model.configure_optimizers()
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]
    assert type(optimizer).__name__ == row.optimizer
    assert optimizer.defaults["lr"] == row.lr and optimizer.defaults["weight_decay"] == row.weight_decay
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler["interval"] == "step" and scheduler["scheduler"].T_max == row.scheduler_period


class TinyFolders(dict):
    """Tiny image folders named ``images``, one per number of classes, made when first asked for."""

    name = "images"

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, classes: int) -> Path:
        # 100 classes: 2 images each (200 training images, every class in train or validation)
        self[classes] = make_image_folder(
            self.root / str(classes) / self.name, classes=classes, per_class=5 if classes <= 10 else 2
        )
        return self[classes]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> TinyFolders:
    return TinyFolders(tmp_path_factory.mktemp("tiny"))


def tiny_overrides(experiment: str, folders: TinyFolders, tmp_path: Path) -> list[str]:
    """Replace the experiment's data with tiny offline data of as many classes (n_classes
    follows from the folder); keep its model and losses."""
    dataset, method = experiment.split("-")
    overrides = [
        f"experiment={experiment}",
        "datamodule=imagefolder",
        f"datamodule.root={folders[DATASETS[dataset]]}",
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


@pytest.mark.parametrize("experiment", registry.experiments("paper"))
def test_experiment_runs_one_training_and_test_step(experiment, tiny_folder, tmp_path):
    cfg = compose_config(
        [*tiny_overrides(experiment, tiny_folder, tmp_path), "++trainer.fast_dev_run=true"], output_dir=tmp_path / "run"
    )
    frame = pd.read_csv(run(cfg))
    method = experiment.split("-")[1]
    assert (frame.method == METHODS[method]).all()
    assert (frame.experiment == f"{tiny_folder.name}-{method}").all()  # what ran: the experiment's model on the folder
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    scores = list(dict.fromkeys(frame.score))
    assert scores[0] == registry.methods()[method].score
    assert ("cac" in scores) == (method in {"cac", "gcac"})
    assert frame[["Accuracy", "AUROC"]].notna().all().all()


@pytest.mark.parametrize("experiment", ["cifar10-gmchad", "svhn-gcenter", "cifar100-gcac"])
def test_g_variants_see_outliers_in_training(experiment, tiny_folder, tmp_path):
    """A training batch holds ID images and outliers (label -1); the push term is non-zero on
    it (with a margin wide enough to reach the untrained embeddings, also CAC's published ||.||^4) and zero without
    them."""
    overrides = tiny_overrides(experiment, tiny_folder, tmp_path)
    overrides = [o for o in overrides if o != "model.backbone.width=4"] + [
        "model/backbone=convnet",
        "model.margin=1000000",
    ]
    datamodule, model = build(compose_config(overrides, output_dir=tmp_path / "run"))
    images, labels = next(iter(datamodule.train_dataloader()))
    assert (labels < 0).sum() == 4 and (labels >= 0).sum() == 4
    out = model(datamodule.transform(images, augment=True))
    assert model.method.loss(out, labels)["oe"].item() > 0
    known = labels >= 0
    assert model.method.loss(out.rows(known), labels[known])["oe"].item() == 0.0


def test_g_variant_without_outliers_is_refused(tiny_folder, tmp_path):
    overrides = [
        o for o in tiny_overrides("cifar10-gcac", tiny_folder, tmp_path) if not o.startswith("datamodule/outliers")
    ]
    overrides = [o for o in overrides if not o.startswith("datamodule.outliers")]
    with pytest.raises(ConfigError, match="needs outliers"):
        build(compose_config([*overrides, "~datamodule/outliers"], output_dir=tmp_path / "run"))


def test_tinyimages_missing_offline_is_one_line(tiny_folder, tmp_path):
    overrides = [
        o for o in tiny_overrides("cifar10-gmchad", tiny_folder, tmp_path) if not o.startswith("datamodule/outliers")
    ]
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
    from mchad.models.backbones import WideResNetBackbone

    source = WideResNetBackbone(1000).net  # WRN-40-2 with ImageNet's 1000 outputs
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "imagenet_wrn.pt")
    overrides = tiny_overrides("cifar10-mchad", tiny_folder, tmp_path)
    overrides = [o for o in overrides if not o.startswith("model/backbone") and not o.startswith("model.backbone")]
    cfg = compose_config(
        [*overrides, f"++model.pretrained_checkpoint={tmp_path / 'imagenet_wrn.pt'}"], output_dir=tmp_path / "run"
    )
    _, model = build(cfg)
    loaded = model.backbone.net.state_dict()
    assert torch.equal(loaded["conv1.weight"], source.state_dict()["conv1.weight"])
    assert loaded["fc.weight"].shape == (16, 128)
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
        build(
            compose_config(
                [*overrides, f"++model.pretrained_checkpoint={tmp_path / 'bad.pt'}"], output_dir=tmp_path / "run"
            )
        )


# ----------------------------------------------------------------------------- the registry


@functools.cache
def _saved() -> dict:
    text = (Path(__file__).parent / "data" / "composed_experiments.yaml").read_text()
    return yaml.load(text, composed_snapshot.LOADER)


@pytest.mark.parametrize("experiment", composed_snapshot.experiment_names())
def test_composed_config_is_as_saved(experiment):
    """Every published, OpenOOD and open-set experiment of the published methods composes to the
    config saved before the method registry (``python tests/composed_snapshot.py <file>``)."""
    # composed through the suite's cache (conftest.compose_config), shared with the other tests of every experiment
    cfg = compose_config([f"experiment={experiment}"], output_dir=Path(composed_snapshot.OUTPUT_DIR))
    assert composed_snapshot.as_saved(cfg) == _saved()[experiment]


def test_the_snapshot_holds_every_published_experiment():
    assert sorted(_saved()) == sorted(composed_snapshot.experiment_names())
    assert len(_saved()) == 3 * 8 + 2 * 8 + 4 * 8


#: where the method keys may appear as a list besides the registry: the docs, the published-values
#: data and the composed-config snapshot (data), and this test
KEY_LIST_ALLOWED = ("docs/", "tests/data/", "tests/test_experiments.py", "notebooks/", "README.md")


def test_the_method_keys_are_listed_in_the_registry_only():
    """No file but the registry names three or more method keys on one line (a hand-kept list)."""
    root = Path(__file__).resolve().parents[1]
    keys = [m.key for m in registry.methods().values()]
    pattern = re.compile(r"(?<![\\w/.-])(" + "|".join(map(re.escape, keys)) + r")(?![\\w/.-])")
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.suffix not in (".py", ".sh", ".yaml", ".yml", ".md", ".csv") or relative.startswith(KEY_LIST_ALLOWED):
            continue
        if path == registry.REGISTRY_FILE or any(part.startswith(".") for part in path.parts):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if len(set(pattern.findall(line))) >= 3:
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "method keys listed outside src/mchad/registry/methods.yaml:\n" + "\n".join(found)
