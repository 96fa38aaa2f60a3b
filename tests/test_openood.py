"""OpenOOD v1.5 (testmodules=openood, experiment=openood-*): a miniature OpenOOD layout (image
lists in pytorch-ood's benchmark's file names, a few tiny images per set) runs a short training
and test; the group column, the group means, the leaderboard table, the offline error line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from forked_runs import run_py
from PIL import Image
from test_docs import documented_result_columns

from mchad import registry
from mchad.data.openood import OpenOODSource, benchmark_class, ood_groups
from mchad.errors import DataNotFoundError
from mchad.results.leaderboard import PUBLISHED, QUOTED_SOURCE, leaderboard, split_openood
from mchad.runs.train import run

OPENOOD_EXPERIMENTS = sorted(registry.experiments("openood"))
METHODS = registry.keys()
CLASSES = ["airplane", "automobile", "bird"]
# the folder of each OOD set (as in OpenOOD's lists), its image size and channels
OOD_FOLDERS = {
    "cifar100": (32, "RGB"),
    "cifar10": (32, "RGB"),
    "tin": (64, "RGB"),
    "mnist": (28, "L"),
    "svhn": (32, "RGB"),
    "texture": (45, "RGB"),
    "places365": (32, "RGB"),
}


def _image(path: Path, size: int, mode: str, rng: np.random.Generator, colour: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    if colour is None:
        pixels = rng.integers(0, 256, shape)
    else:  # ID classes differ in colour so that a tiny model can learn them
        pixels = np.zeros(shape)
        pixels[..., colour] = 200
        pixels = np.clip(pixels + rng.normal(0, 30, shape), 0, 255)
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)


def make_openood(root: Path, id_name: str = "CIFAR10", per_class: int = 8, per_ood: int = 6) -> Path:
    """``root/benchmark_imglist/<id>/<list>`` with the list names pytorch-ood's benchmark class
    declares, and ``root/images_classic/<set>/...`` (OpenOOD's download layout)."""
    cls = benchmark_class(id_name)
    rng = np.random.default_rng(0)
    lists = root / "benchmark_imglist" / cls._subdir
    lists.mkdir(parents=True)
    images = root / "images_classic"
    own = cls._subdir  # the ID set's folder, e.g. cifar10
    for split, list_name in [
        ("train", cls._train_imglist),
        ("test", cls._test_id_imglist),
        ("val", cls._val_id_imglist),
    ]:
        lines = []
        for label, name in enumerate(CLASSES):
            for i in range({"train": per_class, "test": per_class // 2, "val": per_class // 4}[split]):
                relative = f"{own}/{'train' if split == 'train' else 'test'}/{name}/{split}{i:03d}.png"
                _image(images / relative, 32, "RGB", rng, colour=label)
                lines.append(f"{relative} {label}")
        (lists / list_name).write_text("\n".join(lines) + "\n")
    folders = {name: file.split("_", 1)[1].rsplit(".", 1)[0] for name, file in cls._ood_imglists}
    for list_name, folder, split in [
        (cls._val_ood_imglist, "tin", "val"),
        *[(f, folders[n], "test") for n, f in cls._ood_imglists],
    ]:
        size, mode = OOD_FOLDERS[folder]
        relative = [f"{folder}/{split}/{i:03d}.{'jpg' if folder == 'texture' else 'png'}" for i in range(per_ood)]
        for name in relative:
            _image(images / name, size, mode, rng)
        (lists / list_name).write_text("".join(f"{r} -1\n" for r in relative))
    return root


@pytest.fixture(scope="module")
def openood_dir(tmp_path_factory) -> Path:
    return make_openood(tmp_path_factory.mktemp("openood") / "OpenOOD-data")


def tiny_overrides(experiment: str, openood: Path, tmp_path: Path, *extra: str) -> list[str]:
    """The experiment on the miniature layout: OpenOOD's splits, a tiny CNN, two steps."""
    overrides = [
        f"experiment={experiment}",
        f"openood_dir={openood}",
        f"dataset_dir={tmp_path / 'datasets'}",
        "datamodule.n_classes=3",
        "datamodule.batch_size=4",
        "datamodule.outlier_batch_size=4",
        "datamodule.test_batch_size=16",
        "model/backbone=convnet",
        "model.backbone.width=4",
        "trainer.max_epochs=1",
        "trainer.min_epochs=1",
        "trainer.limit_train_batches=2",
        f"paths.log_dir={tmp_path / 'logs'}",
        "~callbacks",
        "~logger",
    ]
    if experiment.split("-")[2].startswith("g"):
        overrides += ["datamodule/outliers=noise", "datamodule.outliers.n=8"]
    return [*overrides, *extra]


def test_openood_experiment_for_every_method_and_id_dataset():
    assert OPENOOD_EXPERIMENTS == sorted(f"openood-{d}-{m}" for d in ("cifar10", "cifar100") for m in METHODS)


@pytest.mark.parametrize("experiment", OPENOOD_EXPERIMENTS)
def test_openood_experiment_composes_with_the_recipe(experiment, tmp_path):
    """OpenOOD's backbone, recipe and splits; the method's head and weights as in the paper's
    experiment of the same dataset and method."""
    cfg = compose_config([f"experiment={experiment}"], output_dir=tmp_path)
    paper = compose_config([f"experiment={experiment.removeprefix('openood-')}"], output_dir=tmp_path)
    assert cfg.name == experiment
    assert cfg.model.backbone._target_ == "mchad.models.backbones.ResNet18_32x32"
    optimizer = cfg.model.optimizer
    assert (optimizer._target_, optimizer.lr, optimizer.momentum, optimizer.nesterov, optimizer.weight_decay) == (
        "torch.optim.SGD",
        0.1,
        0.9,
        True,
        5e-4,
    )
    assert (cfg.trainer.min_epochs, cfg.trainer.max_epochs, cfg.trainer.limit_train_batches) == (100, 100, 391)
    assert (cfg.model.scheduler.T_max, cfg.model.scheduler.eta_min) == (100 * 391, 1e-6)
    assert (cfg.datamodule.batch_size, cfg.datamodule.crop_padding, cfg.datamodule.flip) == (128, 4, True)
    for split in ("train", "test", "val", "val_unknowns"):
        assert cfg.datamodule[split]._target_ == "mchad.data.OpenOODSource"
    assert cfg.datamodule.test_cases.OpenOOD._target_ == "mchad.data.OpenOODTestSets"
    own = {k: v for k, v in cfg.model.items() if k not in ("backbone", "optimizer", "scheduler")}
    kept = {k: v for k, v in paper.model.items() if k not in ("backbone", "optimizer", "scheduler")}
    assert own == kept
    assert cfg.datamodule.get("outliers") == paper.datamodule.get("outliers")
    assert cfg.datamodule.name == paper.datamodule.name and cfg.datamodule.n_classes == paper.datamodule.n_classes


def test_resnet18_32x32_is_openoods_backbone():
    from mchad.models.backbones import ResNet18_32x32

    net = ResNet18_32x32(10)
    # OpenOOD's ResNet18_32x32 with 10 classes: 11,173,962 parameters
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    assert net.net.conv1.kernel_size == (3, 3) and net.net.conv1.stride == (1, 1)
    assert isinstance(net.net.maxpool, torch.nn.Identity)
    assert [len(layer) for layer in (net.net.layer1, net.net.layer2, net.net.layer3, net.net.layer4)] == [2, 2, 2, 2]
    assert net.net.fc.in_features == 512
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_sources_read_the_lists_of_pytorch_oods_benchmark(openood_dir, tmp_path):
    test = OpenOODSource("CIFAR10", "test", openood_dir, download=False).load(tmp_path)
    assert test.images.shape == (12, 3, 32, 32) and test.classes == CLASSES
    assert sorted(test.labels.unique().tolist()) == [0, 1, 2]
    mnist = OpenOODSource("CIFAR10", "MNIST", openood_dir, download=False)
    array = mnist.load(tmp_path)
    assert mnist.group == "far" and array.images.shape == (6, 3, 32, 32) and (array.labels == -1).all()
    assert OpenOODSource("CIFAR10", "TinyImageNet", openood_dir).group == "near"
    assert ood_groups("CIFAR100") == {
        "CIFAR10": "near",
        "TinyImageNet": "near",
        "MNIST": "far",
        "SVHN": "far",
        "Textures": "far",
        "Places365": "far",
    }
    # decoded once: the second load is the cache
    from mchad.data import sources

    before = sources.DECODED_IMAGES
    OpenOODSource("CIFAR10", "MNIST", openood_dir, download=False).load(tmp_path)
    assert sources.DECODED_IMAGES == before


def test_missing_list_or_folder_is_one_line_naming_it(openood_dir, tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        OpenOODSource("CIFAR10", "test", tmp_path / "nothing", download=True).load(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "benchmark_imglist/cifar10/test_cifar10.txt not found in" in message
    assert str(tmp_path / "nothing" / "benchmark_imglist") in message and "gdown" in message
    assert "openood_dir=" in message and "download.py" in message
    # the lists there, an image folder missing
    partial = tmp_path / "partial"
    (partial / "benchmark_imglist").mkdir(parents=True)
    (partial / "benchmark_imglist" / "cifar10").symlink_to(openood_dir / "benchmark_imglist" / "cifar10")
    with pytest.raises(DataNotFoundError, match=r"image folder places365/ not found in .*images_classic") as error:
        OpenOODSource("CIFAR10", "Places365", partial, download=False).load(tmp_path)
    assert "\n" not in str(error.value)


def test_offline_run_stops_with_one_error_line(tmp_path):
    overrides = [f"openood_dir={tmp_path / 'none'}", f"dataset_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}"]
    command = ["experiment=openood-cifar10-mchad", *overrides, "~callbacks", "~logger"]
    result = run_py(command, cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "error: OpenOOD v1.5 CIFAR10 train: image list benchmark_imglist/cifar10/train_cifar10.txt"
    )
    assert str(tmp_path / "none" / "benchmark_imglist") in lines[0]


def _per_seed_groups(frame: pd.DataFrame, score: str) -> dict[str, float]:
    rows = frame[frame.score == score]
    return {group: rows[rows.group == group].AUROC.mean() for group in ("near", "far")}


@pytest.fixture(scope="module")
def two_runs(openood_dir, tmp_path_factory) -> Path:
    """Two seeds of openood-cifar10-mchad (one with a detector) and one Softmax run."""
    sweep = tmp_path_factory.mktemp("sweep")
    for index, (experiment, seed) in enumerate(
        [("openood-cifar10-mchad", 1), ("openood-cifar10-mchad", 2), ("openood-cifar10-softmax", 1)]
    ):
        cfg = compose_config(
            tiny_overrides(experiment, openood_dir, sweep, f"seed={seed}", "detectors=[energy]"),
            output_dir=sweep / str(index),
        )
        run(cfg)
    return sweep


def test_miniature_run_writes_grouped_rows(two_runs):
    frame = pd.read_csv(two_runs / "0" / "results.csv")
    assert (frame.experiment == "openood-cifar10-mchad").all()
    expected = ood_groups("CIFAR10")
    assert list(dict.fromkeys(frame.test_case)) == list(expected)
    assert dict(zip(frame.test_case, frame.group, strict=True)) == expected
    assert list(frame.columns) == documented_result_columns("OpenOOD")  # as docs/results.md lists them
    assert set(frame.score) == {"distance", "msp", "energy"} and len(frame) == 6 * 3  # one row per set and score
    assert frame[["Accuracy", "AUROC", "FPR95"]].notna().all().all()
    # the ID test split is OpenOOD's: 12 images in the miniature (Accuracy in twelfths)
    assert all(math.isclose(a * 12, round(a * 12), abs_tol=1e-6) for a in frame.Accuracy)
    objective = (two_runs / "0" / "objective.yaml").read_text()
    assert "unknowns: val_unknowns" in objective and "n_unknown: 6" in objective and "n_known: 6" in objective


def test_ungrouped_test_cases_have_an_empty_group(openood_dir, tmp_path):
    cfg = compose_config(
        tiny_overrides(
            "openood-cifar10-ii",
            openood_dir,
            tmp_path,
            "testmodules=[openood,noise]",
            "datamodule.test_cases.GaussianNoise.n=8",
            "datamodule.test_cases.UniformNoise.n=8",
        ),
        output_dir=tmp_path / "run",
    )
    frame = pd.read_csv(run(cfg))
    noise = frame.test_case.isin(["GaussianNoise", "UniformNoise"])
    assert (
        noise.sum() == 2 * frame.score.nunique()
        and frame.group[noise].isna().all()
        and frame.group[~noise].notna().all()
    )


def test_leaderboard_group_means_by_hand(two_runs):
    results = pd.concat([pd.read_csv(two_runs / str(i) / "results.csv").assign(run_dir=str(i)) for i in range(3)])
    openood, rest = split_openood(results)
    assert rest.empty and len(openood) == len(results)
    table = leaderboard(openood)
    row = table[(table.Training == "MCHAD") & (table.Postprocessor == "distance")].iloc[0]
    per_seed = [_per_seed_groups(pd.read_csv(two_runs / str(i) / "results.csv"), "distance") for i in (0, 1)]
    near = [100 * s["near"] for s in per_seed]
    far = [100 * s["far"] for s in per_seed]
    assert row["Near-OOD AUROC"] == pytest.approx(np.mean(near))
    assert row["Near-OOD AUROC std"] == pytest.approx(np.std(near, ddof=1))
    assert row["Far-OOD AUROC"] == pytest.approx(np.mean(far))
    assert row["Runs"] == 2 and row["Source"] == "measured"
    frames = [pd.read_csv(two_runs / str(i) / "results.csv") for i in (0, 1)]
    fpr_near = [100 * f[(f.score == "distance") & (f.group == "near")].FPR95.mean() for f in frames]
    assert row["Near-OOD FPR95"] == pytest.approx(np.mean(fpr_near))
    assert row["ID Accuracy"] == pytest.approx(np.mean([100 * f.Accuracy.iloc[0] for f in frames]))
    softmax = table[(table.Training == "Softmax") & (table.Postprocessor == "msp")].iloc[0]
    assert softmax["Runs"] == 1 and math.isnan(softmax["Near-OOD AUROC std"])
    # the published rows beside ours, quoted with their source
    quoted = table[table.Source == QUOTED_SOURCE]
    assert len(quoted) == len([p for p in PUBLISHED if p[0] == "CIFAR10"])
    msp = quoted[quoted.Training == "Cross-entropy"].set_index("Postprocessor").loc["MSP"]
    assert (msp["Near-OOD AUROC"], msp["Far-OOD AUROC"], msp["ID Accuracy"]) == (88.03, 90.73, 95.06)


def test_aggregate_writes_the_leaderboard(two_runs, tmp_path, capsys):
    from mchad.results.aggregate import main

    out = tmp_path / "aggregate"
    assert main([str(two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(out / "leaderboard.csv")
    assert {
        "ID dataset",
        "Training",
        "Postprocessor",
        "Near-OOD AUROC",
        "Far-OOD AUROC",
        "ID Accuracy",
        "Near-OOD FPR95",
        "Far-OOD FPR95",
        "Runs",
        "Source",
    } <= set(csv.columns)
    assert set(csv.Postprocessor[csv.Training == "MCHAD"]) == {"distance", "msp", "energy"}
    markdown = (out / "leaderboard.md").read_text()
    assert "quoted" in markdown and "OpenOOD v1.5 leaderboard, Jingkang50/OpenOOD, ResNet-18, 3 runs" in markdown
    assert "± " in markdown and "OpenOOD v1.5" in printed


def test_objective_scores_a_detector_on_openoods_validation_split(openood_dir, tmp_path):
    """objective.score=knn: the detector (fitted on the training split) judged on OpenOOD's
    val split against its validation OOD images; an unknown score is refused before training."""
    from omegaconf import OmegaConf

    from mchad.errors import ConfigError

    overrides = tiny_overrides(
        "openood-cifar10-center",
        openood_dir,
        tmp_path,
        "detectors=[knn]",
        "detector_args.knn.k=2",
        "objective.score=knn",
        "objective.metric=val_auroc",
    )
    run(compose_config(overrides, output_dir=tmp_path / "run"))
    objective = OmegaConf.load(tmp_path / "run" / "objective.yaml")
    assert (objective.score, objective.unknowns, objective.n_known, objective.n_unknown) == (
        "knn",
        "val_unknowns",
        6,
        6,
    )
    assert 0 <= objective.value <= 1 and objective.value == objective.val_auroc
    with pytest.raises(ConfigError, match="objective.score=nearest is not a score of this run"):
        run(compose_config([*overrides, "objective.score=nearest"], output_dir=tmp_path / "bad"))
    assert not (tmp_path / "bad" / "objective.yaml").exists()


def test_run_openood_dry_run_sweeps_every_method_both_datasets_three_seeds():
    from test_bash import _commands, _overrides, _script, _sweep

    (command,) = _commands(_script("run-openood.sh", "-n", "openood_dir=/data/openood"))
    args = _overrides(command)
    assert _sweep(args["experiment"]) == [f"openood-{d}-{m}" for d in ("cifar10", "cifar100") for m in METHODS]
    assert _sweep(args["seed"]) == ["1", "2", "3"]
    assert command[-1] == "openood_dir=/data/openood"
