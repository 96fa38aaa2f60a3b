"""Open-set recognition: the published class splits, the generated experiments, a tiny run on
an image folder, the data checks, the aggregation over splits and the sweep script."""

from __future__ import annotations

import functools
import random
import shlex
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from PIL import Image
from test_docs import documented_openset_files, documented_result_columns

from mchad import registry
from mchad.data.osr import CIFAR10_CLASSES, CIFAR100_CLASSES, SplitError, class_split, splits
from mchad.errors import ConfigError, DataError, DataNotFoundError
from mchad.registry import OSR_SETTINGS
from mchad.results.aggregate import main as aggregate_main
from mchad.results.openset_tables import openset_table
from mchad.runs.train import build, run

OSR_METHODS = registry.keys()

# (known, unknown) classes per split and the size of the unknown dataset
COUNTS = {
    "cifar10": (6, 4, 10),
    "cifarplus10": (4, 10, 100),
    "cifarplus50": (4, 50, 100),
    "tinyimagenet": (20, 180, 200),
}
PROTOCOLS = ["neal", "cac"]


@pytest.mark.parametrize("protocol, setting", list(product(PROTOCOLS, OSR_SETTINGS)))
def test_every_split_has_the_published_counts_and_disjoint_classes(protocol, setting):
    n_known, n_unknown, n_total = COUNTS[setting]
    assert len(splits()[protocol][setting]) == 5
    for split in range(5):
        known, unknown = class_split(setting, split, protocol)
        assert (len(known), len(unknown)) == (n_known, n_unknown)
        assert len(set(known)) == n_known and len(set(unknown)) == n_unknown
        assert set(known) <= set(range(10 if setting.startswith("cifarplus") else n_total))
        assert set(unknown) <= set(range(n_total))
        if not setting.startswith("cifarplus"):  # one dataset: known and unknown partition it
            assert not set(known) & set(unknown)
            assert set(known) | set(unknown) == set(range(n_total))


def test_published_values():
    # Vaze et al.'s osr_splits.py / ARPL's split.py, split 0 and 4
    assert class_split("cifar10", 0) == ([0, 6, 4, 9, 1, 7], [2, 3, 5, 8])
    assert class_split("cifar10", 4)[0] == [2, 4, 1, 7, 9, 6]
    assert class_split("cifarplus10", 0) == ([4, 7, 9, 1], [30, 25, 1, 9, 8, 0, 46, 52, 49, 71])
    assert class_split("tinyimagenet", 0)[0][:5] == [108, 147, 17, 58, 193]
    # the example of CAC's README: CIFAR10/class_splits/0.json
    assert class_split("cifar10", 0, "cac") == ([6, 8, 2, 4, 9, 3], [1, 5, 7, 0])


def test_neal_cifarplus50_lists_extend_the_cifarplus10_lists():
    """As published: each CIFAR+50 list ends with the CIFAR+10 list of the same split."""
    for split in range(5):
        assert class_split("cifarplus50", split)[1][-10:] == class_split("cifarplus10", split)[1]


def test_cac_lists_are_those_its_generator_produces():
    """CAC's datasets/generate_class_splits.py (random.seed(1000); MNIST, SVHN, CIFAR10
    shuffled in turn, then CIFAR+10/+50 sampled from its 50 CIFAR-100 animal classes, then
    TinyImageNet), re-run here: an independent check of the copied lists."""
    animals = (
        "beaver dolphin otter seal whale aquarium_fish flatfish ray shark trout bee beetle butterfly "
        "caterpillar cockroach bear leopard lion tiger wolf camel cattle chimpanzee elephant kangaroo fox "
        "porcupine possum raccoon skunk crab lobster snail spider worm baby boy girl man woman crocodile "
        "dinosaur lizard snake turtle hamster mouse rabbit shrew squirrel"
    ).split()
    rng = random.Random(1000)
    for dataset in ["MNIST", "SVHN", "CIFAR10"]:
        for split in range(5):
            classes = list(range(10))
            rng.shuffle(classes)
            if dataset == "CIFAR10":
                assert class_split("cifar10", split, "cac") == (classes[4:], classes[:4])
    for n in [10, 50]:
        for split in range(5):
            unknown = [CIFAR100_CLASSES.index(name) for name in rng.sample(animals, n)]
            assert class_split(f"cifarplus{n}", split, "cac") == ([0, 1, 8, 9], unknown)
    for split in range(5):
        classes = list(range(200))
        rng.shuffle(classes)
        assert class_split("tinyimagenet", split, "cac")[0] == classes[180:]


@pytest.mark.parametrize("args", [("cifar10", 5), ("cifar10", -1), ("cifar10", "0"), ("svhn", 0), ("cifar10", 0, "x")])
def test_bad_split_arguments_are_refused(args):
    with pytest.raises(SplitError):
        class_split(*args)


@functools.cache
@functools.cache  # read only: composed once per method, not once per setting
def _reference(method: str):
    return compose_config([f"experiment=cifar10-{method}"])


@pytest.mark.parametrize("setting, method", list(product(OSR_SETTINGS, OSR_METHODS)))
def test_every_setting_method_pair_composes(setting, method):
    cfg = compose_config([f"experiment=osr-{setting}-{method}", "split=3"])
    reference = _reference(method)
    n_known = COUNTS[setting][0]
    assert cfg.name == f"osr-{setting}-{method}"
    assert cfg.datamodule._target_ == "mchad.data.OpenSetDataModule"
    assert (cfg.datamodule.setting, cfg.datamodule.split, cfg.datamodule.protocol) == (setting, 3, "neal")
    assert cfg.datamodule.n_classes == n_known and cfg.model.method.n_classes == n_known
    assert dict(cfg.datamodule.test_cases) == {}
    # the method's CIFAR-10 hyperparameters; CAC's embedding has one dimension per known class
    for key in ("name", "weight_center", "weight_ce", "weight_oe", "margin"):
        assert cfg.model.get(key) == reference.model.get(key), key
    entry = registry.methods()[method]
    expected_embedding = n_known if entry.embedding_is_classes else reference.model.n_embedding
    assert cfg.model.n_embedding == expected_embedding
    assert ("outliers" in cfg.datamodule) == entry.outliers
    for node in ("datamodule", "model", "trainer"):  # every interpolation resolves
        OmegaConf.to_container(cfg[node], resolve=True)


def make_cifar_folder(root: Path, names: list[str], per_class: dict[str, int], size: int = 12) -> Path:
    """``root/<split>/<name>/*.png``; class i is a plain colour that identifies it."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for index, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(index * 97) % 256, (index * 57 + 80) % 256, (index * 31 + 160) % 256], dtype=float)
            for i in range(n):
                image = np.clip(colour + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    return make_cifar_folder(tmp_path_factory.mktemp("cifar"), CIFAR10_CLASSES, {"train": 10, "test": 4})


def _tiny_overrides(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "model/backbone=convnet",
        "model.backbone.width=8",
        "datamodule=imagefolder",
        f"datamodule.root={root}",
        f"dataset_dir={tmp_path / 'cache'}",
        "datamodule.batch_size=8",
        "datamodule.val_fraction=0.2",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "~callbacks.embedding_animation",
        *extra,
    ]


def test_image_folder_open_set_data_hold_the_split_classes(cifar_folder, tmp_path):
    cfg = compose_config(["experiment=osr-cifar10-mchad", "split=1", *_tiny_overrides(cifar_folder, tmp_path)])
    datamodule, _ = build(cfg)
    datamodule.setup()
    known, unknown = class_split("cifar10", 1)
    # 60 known training images, 20 % held out for validation; 6 x 4 known and 4 x 4 unknown test images
    assert (len(datamodule.data["train"]), len(datamodule.data["val"])) == (48, 12)
    assert len(datamodule.data["test"]) == 24 and list(datamodule.test_cases) == ["Unknown"]
    assert len(datamodule.test_cases["Unknown"]) == 16 and (datamodule.test_cases["Unknown"].labels == -1).all()
    assert datamodule.data["test"].classes == [CIFAR10_CLASSES[c] for c in known]
    for part in ("train", "val", "test"):
        assert set(datamodule.data[part].labels.tolist()) == set(range(6))
    # class k's images (colour of the folder known[k]) carry label k
    test = datamodule.data["test"]
    first = test.images[test.labels == 0][0, :, 0, 0].float()
    expected = [(known[0] * 97) % 256, (known[0] * 57 + 80) % 256, (known[0] * 31 + 160) % 256]
    assert np.allclose(first.numpy(), expected, atol=50)


@pytest.mark.parametrize("experiment, method", [("osr-cifar10-mchad", "MCHAD"), ("osr-cifar10-cac", "CAC")])
def test_tiny_image_folder_open_set_run_writes_rows(cifar_folder, tmp_path, experiment, method, caplog):
    cfg = compose_config(
        [f"experiment={experiment}", "split=2", *_tiny_overrides(cifar_folder, tmp_path)], output_dir=tmp_path / "run"
    )
    with caplog.at_level("INFO", logger="mchad.runs.train"):
        frame = pd.read_csv(run(cfg))
    # the console's table has results.csv's columns, the split included (issue 32)
    (table,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Results: ")]
    assert table.splitlines()[1].split() == list(frame.columns)
    assert documented_result_columns("open-set") == list(frame.columns)
    assert set(frame.test_case) == {"Unknown"} and (frame.split == 2).all()
    assert (frame.experiment == experiment).all() and (frame.id_dataset == "CIFAR10 6/4").all()
    assert (frame.method == method).all() and frame.score.iloc[0] == "distance"
    for column in ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95", "OSCR"]:
        assert frame[column].between(0, 1).all(), column
    assert (frame.OSCR <= frame.Accuracy + 1e-9).all()
    # the aggregation writes the files docs/open-set.md and docs/results.md name
    assert aggregate_main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    written = {p.name for p in (tmp_path / "out").glob("openset_*")}
    assert written == {f"openset_CIFAR10_6_4.{ext}" for ext in ("csv", "md", "html", "tex")}
    for page in ("open-set.md", "results.md"):
        assert "openset_CIFAR10_6_4" in documented_openset_files(page)[0], page


def test_wrong_class_folders_are_refused(tmp_path):
    names = [f"class{i}" for i in range(10)]
    root = make_cifar_folder(tmp_path / "other", names, {"train": 2, "test": 1}, size=8)
    cfg = compose_config(["experiment=osr-cifar10-mchad", *_tiny_overrides(root, tmp_path)])
    with pytest.raises(DataError, match="not CIFAR10's"):
        build(cfg)


def test_too_few_class_folders_are_refused(tmp_path):
    root = make_cifar_folder(tmp_path / "few", CIFAR10_CLASSES[:8], {"train": 2, "test": 1}, size=8)
    cfg = compose_config(["experiment=osr-cifar10-mchad", *_tiny_overrides(root, tmp_path)])
    with pytest.raises(DataError, match="has 8 classes"):
        build(cfg)


def test_split_out_of_range_is_a_config_error(tmp_path):
    cfg = compose_config(["experiment=osr-cifar10-mchad", "split=7"])
    with pytest.raises(ConfigError, match="split must be an integer 0..4"):
        build(cfg)


# ----------------------------------------------------------------------------- aggregation

# AUROC and accuracy per model, split and seed (fractions), chosen by hand
FAKE = {
    "MCHAD": {
        "AUROC": [[0.90, 0.92], [0.80, 0.84], [0.70, 0.74]],
        "Accuracy": [[0.95, 0.93], [0.90, 0.92], [0.85, 0.87]],
    },
    "CAC": {
        "AUROC": [[0.60, 0.70], [0.65, 0.75], [0.50, 0.60]],
        "Accuracy": [[0.90, 0.90], [0.80, 0.80], [0.70, 0.70]],
    },
}


def _write_fake_sweep(root: Path) -> None:
    for (method, values), split, seed in product(FAKE.items(), range(3), range(2)):
        folder = root / f"{method}-{split}-{seed}"
        folder.mkdir(parents=True)
        rows = [
            {
                "experiment": f"osr-cifar10-{method.lower()}",
                "id_dataset": "CIFAR10 6/4",
                "method": method,
                "test_case": "Unknown",
                "score": score,
                "seed": seed + 1,
                "Accuracy": values["Accuracy"][split][seed],
                "AUROC": values["AUROC"][split][seed] if score == "distance" else 0.5,
                "AUPR-IN": 0.5,
                "AUPR-OUT": 0.5,
                "FPR95": 0.5,
                "OSCR": 0.9 * values["Accuracy"][split][seed],
                "split": split,
            }
            for score in ("distance", "msp")
        ]
        pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)


def test_openset_aggregation_gives_the_means_over_splits_and_seeds(tmp_path):
    _write_fake_sweep(tmp_path / "sweep")
    assert aggregate_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "openset_CIFAR10_6_4.csv")
    assert list(table.Model) == ["MCHAD", "CAC"]
    for _, row in table.iterrows():
        for metric in ("AUROC", "Accuracy"):
            values = np.array(FAKE[row["Model"]][metric]).ravel() * 100
            assert row[f"{metric} mean"] == pytest.approx(values.mean())
            assert row[f"{metric} std"] == pytest.approx(values.std(ddof=1))
        assert (row["Splits"], row["Seeds"], row["Runs"]) == (3, 2, 6)
        assert row["OSCR mean"] == pytest.approx(0.9 * row["Accuracy mean"])
    # by hand: MCHAD's AUROC over the six runs
    assert table["AUROC mean"][0] == pytest.approx((90 + 92 + 80 + 84 + 70 + 74) / 6)
    for ext in ("md", "html", "tex"):
        assert (tmp_path / "out" / f"openset_CIFAR10_6_4.{ext}").is_file()
    assert not (tmp_path / "out" / "table.csv").exists()  # no OOD runs, no OOD table


def test_a_single_run_prints_no_spread_as_the_ood_table_does(tmp_path, capsys):
    """Issue 32: one seed printed `± nan` in the open-set table and `± –` in the OOD table."""
    _write_fake_sweep(tmp_path / "sweep")
    for folder in (tmp_path / "sweep").iterdir():
        if folder.name != "MCHAD-0-0":
            shutil.rmtree(folder)
    assert aggregate_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "90.00 ± –" in printed and "nan" not in printed
    # and so do the written tables (the .csv keeps the empty std for machines)
    written = {ext: (tmp_path / "out" / f"openset_CIFAR10_6_4.{ext}").read_text() for ext in ("md", "html", "tex")}
    assert "90.00 ± –" in written["md"] and "90.00 ± –" in written["html"]
    assert r"90.00 \pm \mbox{--}" in written["tex"]
    assert not any("nan" in text for text in written.values())


def test_openset_table_other_score(tmp_path):
    _write_fake_sweep(tmp_path / "sweep")
    from mchad.results.read_results import find_results

    results, _ = find_results(tmp_path / "sweep")
    table = openset_table(results, "msp")
    assert table["AUROC mean"].tolist() == pytest.approx([50.0, 50.0])


# ----------------------------------------------------------------------------- script


def test_run_openset_dry_run_lists_every_setting_method_and_split(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "bash" / "run-openset.sh"), "--dry-run", "dataset_dir=/data"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    args = shlex.split(line[2:])
    assert args[1:3] == [str(ROOT / "run.py"), "-m"]
    experiments = args[3].removeprefix("experiment=").split(",")
    assert experiments == [f"osr-{s}-{m}" for s, m in product(OSR_SETTINGS, OSR_METHODS)]
    assert args[4:] == ["split=0,1,2,3,4", "osr.protocol=neal", "seed=1", "dataset_dir=/data"]
    bad = subprocess.run(
        ["bash", str(ROOT / "bash" / "run-openset.sh"), "-n"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SETTINGS": "mnist"},
    )
    assert bad.returncode == 2 and "unknown setting mnist" in bad.stderr


def test_tinyimagenet_source_reads_pytorch_oods_layout(tmp_path):
    """train/<wnid>/images/* and val/images/* with val_annotations.txt, labels = sorted wnid index."""
    from mchad.data import TinyImageNetSource

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # sorted: n01, n02, n03
    for index, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (index * 100, 0, 0)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    annotations = []
    for i, wnid in enumerate(["n03", "n01"]):
        Image.new("RGB", (16, 16), (0, 0, 0)).save(base / "val" / "images" / f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t16\t16")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    train = TinyImageNetSource("train", size=8, download=False).load(tmp_path)
    val = TinyImageNetSource("val", size=8, download=False).load(tmp_path)
    assert train.classes == ["n01", "n02", "n03"] and tuple(train.images.shape) == (6, 3, 8, 8)
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert val.labels.tolist() == [2, 0]
    # class n02 (index 0 in the listing, red 0) has label 1
    assert (train.images[train.labels == 1][:, 0] <= 5).all() and (train.images[train.labels == 2][:, 0] > 150).all()
    with pytest.raises(DataNotFoundError, match="TinyImageNet/train not found"):
        TinyImageNetSource("train", download=False).load(tmp_path / "nothing")


def test_oscr_by_hand():
    import torch

    from mchad.results.metrics import oscr

    # sorted: 0.1 ID right, 0.2 ID wrong, 0.25 OOD, 0.3 ID right, 0.4 OOD; the curve (CCR over FPR)
    # (0,0) (0,1/3) (0,1/3) (1/2,1/3) (1/2,2/3) (1,2/3): area 1/2 * 1/3 + 1/2 * 2/3 = 1/2
    value = oscr(torch.tensor([0.3, 0.1, 0.2]), torch.tensor([True, True, False]), torch.tensor([0.4, 0.25]))
    assert value == pytest.approx(0.5)
    # a tie between an ID and an OOD sample is one step: a trapezoid from (0,0) to (1,1)
    assert oscr(torch.tensor([0.1]), torch.tensor([True]), torch.tensor([0.1])) == pytest.approx(0.5)
    # perfect separation and classification: 1; all wrong: 0
    assert oscr(torch.tensor([0.0, 0.1]), torch.tensor([True, True]), torch.tensor([0.5])) == pytest.approx(1.0)
    assert oscr(torch.tensor([0.0, 0.1]), torch.tensor([False, False]), torch.tensor([0.5])) == 0.0
    with pytest.raises(ValueError):
        oscr(torch.tensor([]), torch.tensor([], dtype=torch.bool), torch.tensor([0.5]))
