"""``model.semantics``: ``published`` (what the published code computed with pytorch-ood 0.0.7)
and ``paper`` (the equations), item by item, on hand-computed cases; and the training-set
options (full training set, outliers). See PAPER.md, "What the published pipeline actually
computed"."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from PIL import Image
from torchvision.transforms import functional as TF

from mchad.data import OODDataModule
from mchad.data.sources import ImageArray, Source, decode_files, fit_image
from mchad.models.methods import CAC, MCHAD, Center, MethodOutput


# --- 2. reductions with outliers in the batch (G-MCHAD, G-Center) -------------------------
def id_and_outliers(n_id: int = 12, n_out: int = 24):
    """n_id known rows, labels 0/1 alternating, d_y = 2 and d_other = 6; n_out outliers at d = (1, 1)."""
    y = torch.tensor([i % 2 for i in range(n_id)] + [-1] * n_out)
    d = torch.tensor([[2.0, 6.0] if i % 2 == 0 else [6.0, 2.0] for i in range(n_id)] + [[1.0, 1.0]] * n_out)
    return d, y


@pytest.mark.parametrize("semantics, rows", [("published", 36), ("paper", 12)])
def test_id_terms_are_means_over_all_rows_in_the_published_reading(semantics, rows):
    # 12 ID + 24 outliers (the case): pull entries sum to 12 x 2 = 24 over a matrix of
    # `rows` x 2 -> 24 / 72 = 1/3 published (outliers count as 0), 24 / 24 = 1 known-only: the
    # published ID terms are a third of the known-only ones (measured 1.7399 vs 5.2197)
    d, y = id_and_outliers()
    method = MCHAD(2, 2, margin=0.0, weight_oe=1.0, semantics=semantics)
    terms = method.loss(MethodOutput(distances=d), y)
    assert terms["center"].item() == pytest.approx(24 / (rows * 2), rel=1e-6)
    # separation: each ID row log(1 + e^(2 - 6)) = log(1 + e^-4)
    assert terms["nll"].item() == pytest.approx(12 * math.log1p(math.exp(-4)) / rows, rel=1e-5)
    # G-Center: the classifier's CE likewise; logits (3, 0) / (0, 3) -> log(1 + e^-3) per ID row
    center = Center(2, 2, weight_oe=1.0, semantics=semantics)
    logits = torch.tensor([[3.0, 0.0] if i % 2 == 0 else [0.0, 3.0] for i in range(12)] + [[0.0, 0.0]] * 24)
    terms = center.loss(MethodOutput(distances=d, logits=logits), y)
    assert terms["nll"].item() == pytest.approx(12 * math.log1p(math.exp(-3)) / rows, rel=1e-5)
    assert terms["center"].item() == pytest.approx(24 / (rows * 2), rel=1e-6)


def test_without_outliers_both_readings_average_alike():
    d, y = id_and_outliers(n_out=0)
    published = MCHAD(2, 2, semantics="published").loss(MethodOutput(distances=d), y)
    paper = MCHAD(2, 2, semantics="paper").loss(MethodOutput(distances=d), y)
    assert published["center"].item() == paper["center"].item() == pytest.approx(1.0)
    assert published["nll"].item() == pytest.approx(paper["nll"].item())


# --- 3. CAC distance power ------------------------------------------------------------------
@pytest.mark.parametrize(
    "semantics, distances, push",
    # anchors 2 e_0, 2 e_1; z = (3, 0): ||z - a||^2 = (1, 13); published squares them: (1, 169)
    # outlier at the origin: ||.||^2 = (4, 4); margin 20: published sum (400 - 16^2) = 2 x 144,
    # paper (r = 0) sum (400 - 4) = 2 x 396
    [("published", [1.0, 169.0], 288.0), ("paper", [1.0, 13.0], 792.0)],
)
def test_cac_distance_power(semantics, distances, push):
    method = CAC(2, 2, magnitude=2.0, margin=20.0, weight_oe=1.0, semantics=semantics)
    out = method(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert out.distances[0].tolist() == distances
    assert method.loss(out, torch.tensor([0, -1]))["oe"].item() == pytest.approx(push)
    # the anchor term is d_y in both: 1
    assert method.loss(out, torch.tensor([0, -1]))["anchor"].item() == pytest.approx(1.0)


# --- 4. CAC tuplet classes ------------------------------------------------------------------
@pytest.mark.parametrize(
    "semantics, label, expected",
    [
        # d = (1, 2, 5); y = 0: published sums classes 0..1 (y included): log(1 + e^0 + e^-1)
        ("published", 0, math.log(1 + 1 + math.exp(-1))),
        # paper: i != y: log(1 + e^-1 + e^-4)
        ("paper", 0, math.log(1 + math.exp(-1) + math.exp(-4))),
        # y = C-1 = 2: both log(1 + e^4 + e^3)
        ("published", 2, math.log(1 + math.exp(4) + math.exp(3))),
        ("paper", 2, math.log(1 + math.exp(4) + math.exp(3))),
    ],
)
def test_cac_tuplet_classes(semantics, label, expected):
    method = CAC(3, 3, semantics=semantics)
    terms = method.loss(MethodOutput(distances=torch.tensor([[1.0, 2.0, 5.0]])), torch.tensor([label]))
    assert terms["tuplet"].item() == pytest.approx(expected, rel=1e-5)


# --- 5. G-Center prediction -----------------------------------------------------------------
@pytest.mark.parametrize(
    "semantics, weight_oe, expected",
    [("published", 1e-5, 0), ("paper", 1e-5, 1), ("published", 0.0, 1), ("paper", 0.0, 1)],
)
def test_g_center_predicts_by_nearest_centre_in_the_published_reading(semantics, weight_oe, expected):
    # nearest centre: class 0; classifier: class 1
    out = MethodOutput(distances=torch.tensor([[1.0, 4.0]]), logits=torch.tensor([[0.0, 2.0]]))
    method = Center(2, 2, weight_oe=weight_oe, semantics=semantics)
    assert method.predict(out).tolist() == [expected]


# --- cac_published score ------------------------------------------------------------------
def test_published_cac_score_is_the_maximum_gamma():
    # d = (4, 4, 4): softmin 1/3 each, gamma = 8/3 each;
    # d = (0, 8, 8): gamma_1 = 8 (1 - e^-8 / (1 + 2 e^-8)) = 7.99732, gamma_0 = 0
    method = CAC(3, 3, semantics="published")
    assert "cac_published" in method.score_names and "cac_published" not in CAC(3, 3, semantics="paper").score_names
    d = torch.tensor([[4.0, 4.0, 4.0], [0.0, 8.0, 8.0]])
    scores = method.scores(MethodOutput(distances=d))
    assert scores["cac_published"][0].item() == pytest.approx(8 / 3, rel=1e-6)
    e8 = math.exp(-8)
    assert scores["cac_published"][1].item() == pytest.approx(8 * (1 - e8 / (1 + 2 * e8)), rel=1e-6)
    assert scores["cac"][1].item() == pytest.approx(0.0, abs=1e-6)


# --- 6. OOD test image resize ---------------------------------------------------------------
def test_squash_resize_is_the_published_tensor_resize(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    ours = fit_image(big, 32, "squash")
    published = TF.resize(TF.to_tensor(big), [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    expected = (published.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1  # float rounding ties
    assert (ours == expected).mean() > 0.99
    # the whole image is kept (no crop) and it is not antialiased: 4 x 4 -> 2 x 2 = 2 x 2 block means
    blocks = np.array([[0, 40, 80, 120], [40, 80, 120, 160], [0, 0, 0, 0], [80, 80, 80, 80]], dtype=np.uint8)
    small = fit_image(Image.fromarray(blocks), 2, "squash")
    assert small.tolist() == [[40, 120], [40, 40]]
    # ours: short side resized, centre cropped: a 45 x 70 image loses its left and right edges
    path = tmp_path / "big.png"
    big.save(path)
    assert (
        decode_files([str(path)], 32, resize="crop")[0].permute(1, 2, 0).numpy().tolist()
        == fit_image(big, 32, "crop").tolist()
    )
    assert not np.array_equal(fit_image(big, 32, "crop"), ours)
    assert decode_files([str(path)], 32, resize="squash")[0].permute(1, 2, 0).numpy().tolist() == ours.tolist()


@pytest.mark.parametrize("semantics, resize", [("published", "squash"), ("paper", "crop")])
def test_test_sets_follow_the_semantics(semantics, resize):
    cfg = compose_config(["experiment=cifar10-mchad", f"model.semantics={semantics}"])
    for name in ("Textures", "TinyImageNetCrop", "LSUNResize"):
        assert cfg.datamodule.test_cases[name].resize == resize
    assert cfg.datamodule.outlier_augment is (semantics == "paper")
    assert cfg.datamodule.outlier_fraction == (0.9 if semantics == "published" else 1.0)


# --- 7. outliers: no augmentation, 90 % split; 8. the full training set ----------------------
class ArraySource(Source):
    def __init__(self, n: int, label: int | None = None, size: int = 1, name: str = "array"):
        self.n, self.label, self.size, self.name = n, label, size, name

    def load(self, dataset_dir=None) -> ImageArray:
        g = torch.Generator().manual_seed(self.n)
        images = torch.randint(0, 256, (self.n, 3, self.size, self.size), generator=g, dtype=torch.uint8)
        labels = torch.arange(self.n) % 10 if self.label is None else torch.full((self.n,), self.label)
        return ImageArray(images, labels)


def datamodule(n_train: int, n_outliers: int | None, size: int = 1, **options) -> OODDataModule:
    dm = OODDataModule(
        "fake", 10, ArraySource(n_train, size=size), ArraySource(20, size=size),
        outliers=ArraySource(n_outliers, -1, size=size) if n_outliers else None,
        crop_padding=4 if size > 1 else 0, flip=size > 1, **options,
    )  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("full, steps, steps_oe", [(True, 391, 1054), (False, 351, 351)])
def test_steps_per_epoch_on_a_cifar_sized_set(full, steps, steps_oe):
    """50,000 images in batches of 128: all of them, last batch kept -> 391 steps (Lightning
    1.6's cycle with 270,000 outliers in 256s: 1,054 steps, cut to 392 by limit_train_batches);
    held out 10 % with drop_last -> 45,000 // 128 = 351."""
    dm = datamodule(50_000, None, full_train_set=full)
    assert len(dm.train_dataloader()) == steps
    assert len(dm.data["val"]) == 5_000
    oe = datamodule(50_000, 300_000, full_train_set=full, outlier_fraction=0.9)
    assert len(oe.outliers) == 270_000
    loader = oe.train_dataloader()
    assert len(loader) == steps_oe
    if full:
        batches = [labels for _, labels in (b for _, b in zip(range(392), loader, strict=False))]
        # step 391 holds the last 80 ID images, step 392 starts the ID set again (cycled)
        assert [(b >= 0).sum().item() for b in batches[389:]] == [128, 80, 128]
        assert all((b < 0).sum().item() == 256 for b in batches)


def test_full_training_set_validates_on_training_images():
    dm = datamodule(100, None, full_train_set=True)
    assert len(dm.data["train"]) == 100
    train = {tuple(x.flatten().tolist()) for x in dm.data["train"].images}
    assert all(tuple(x.flatten().tolist()) in train for x in dm.data["val"].images)
    held_out = datamodule(100, None, full_train_set=False)
    assert len(held_out.data["train"]) == 90


@pytest.mark.parametrize("augment", [True, False])
def test_outliers_augmented_or_not(augment):
    torch.manual_seed(0)
    dm = datamodule(300, 300, size=8, outlier_augment=augment)
    images, labels = next(iter(dm.train_dataloader()))
    plain = dm.batch_transform(images, labels, training=False)
    trained = dm.batch_transform(images, labels, training=True)
    outliers = labels < 0
    assert not torch.equal(trained[~outliers], plain[~outliers])  # ID images always cropped/flipped
    assert torch.equal(trained[outliers], plain[outliers]) is (not augment)


# --- 9. aggregation with the published AUPR names --------------------------------------------
def test_aggregation_prints_the_published_aupr_names(tmp_path, capsys):
    from mchad.results.aggregate import main

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    columns = "experiment,id_dataset,method,test_case,score,seed,Accuracy,AUROC,AUPR-IN,AUPR-OUT,FPR95"
    row = "cifar10-mchad,CIFAR10,MCHAD,Textures,distance,1,0.9,0.8,0.7,0.6,0.5"
    (run / "results.csv").write_text(f"{columns}\n{row}\n")
    assert main([str(run), "--out", str(tmp_path / "today")]) == 0
    today = capsys.readouterr().out
    assert main([str(run), "--out", str(tmp_path / "published"), "--published-aupr-names"]) == 0
    published = capsys.readouterr().out
    today_table = pd.read_csv(tmp_path / "today" / "table.csv")
    published_table = pd.read_csv(tmp_path / "published" / "table.csv")
    assert (today_table["AUPR-IN mean"][0], today_table["AUPR-OUT mean"][0]) == pytest.approx((70.0, 60.0))
    assert (published_table["AUPR-IN mean"][0], published_table["AUPR-OUT mean"][0]) == pytest.approx((60.0, 70.0))
    assert "AUPR-IN: OOD positive" in published and "AUPR-IN: OOD positive" not in today
