"""Tests of mchad.results.plots: files are valid images, GIF frame counts, ROC/AUROC correctness."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from mchad.results import plots
from mchad.results.plots import (
    assemble_gif,
    axis_limits,
    distance_histogram,
    embedding_frame,
    roc_curve_plot,
    roc_points,
)


def _blobs(n_per_class=200, n_outliers=100, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    emb = np.concatenate([c + 0.5 * rng.standard_normal((n_per_class, 2)) for c in centers])
    labels = np.repeat(np.arange(len(centers)), n_per_class)
    out = rng.uniform(-3, 7, size=(n_outliers, 2))
    return np.concatenate([emb, out]), np.concatenate([labels, -np.ones(n_outliers, dtype=int)]), centers


def _assert_image(path, fmt):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == fmt
        assert im.size[0] > 50 and im.size[1] > 50
        return im.size


# ------------------------------------------------------------------ embedding frames


def test_embedding_frame_numpy_writes_png_in_new_dir(tmp_path):
    emb, lab, cen = _blobs()
    out = embedding_frame(emb, lab, cen, radius=1.0, margin=4.0, path=tmp_path / "a" / "b" / "f.png", title="epoch 0")
    assert out == tmp_path / "a" / "b" / "f.png"
    _assert_image(out, "PNG")


def test_embedding_frame_torch_inputs(tmp_path):
    emb, lab, cen = _blobs()
    emb_t = torch.tensor(emb, dtype=torch.float32, requires_grad=True)  # grad must be detached
    out = embedding_frame(
        emb_t, torch.tensor(lab), torch.tensor(cen).half(), torch.tensor(2.0), None, tmp_path / "t.png"
    )
    _assert_image(out, "PNG")


def test_embedding_frame_circle_radius_squared_semantics(tmp_path, monkeypatch):
    """With squared=True the drawn circle radius is sqrt(r) (and sqrt(m)); else r (m)."""
    drawn = []
    orig = plots.Circle

    def spy(center, radius, **kw):
        drawn.append((tuple(center), radius, kw.get("ls")))
        return orig(center, radius, **kw)

    monkeypatch.setattr(plots, "Circle", spy)
    emb, lab, cen = _blobs()
    embedding_frame(emb, lab, cen, radius=4.0, margin=9.0, path=tmp_path / "sq.png")
    assert sorted(r for _, r, ls in drawn if ls == "-") == pytest.approx([2.0] * 3)
    assert sorted(r for _, r, ls in drawn if ls == "--") == pytest.approx([3.0] * 3)
    assert {c for c, _, _ in drawn} == {tuple(c) for c in cen}
    drawn.clear()
    embedding_frame(emb, lab, cen, radius=4.0, margin=9.0, path=tmp_path / "eu.png", squared=False)
    assert sorted(r for _, r, ls in drawn if ls == "-") == pytest.approx([4.0] * 3)
    assert sorted(r for _, r, ls in drawn if ls == "--") == pytest.approx([9.0] * 3)
    drawn.clear()
    embedding_frame(emb, lab, cen, radius=[1.0, 4.0, 0.0], margin=None, path=tmp_path / "pc.png")
    assert sorted(r for _, r, _ in drawn) == pytest.approx([1.0, 2.0])  # zero radius: no circle


def test_embedding_frame_fixed_limits_give_equal_frame_sizes(tmp_path):
    emb, lab, cen = _blobs()
    lim = axis_limits(np.concatenate([emb, 3 * emb]), cen, radius=1.0)
    s1 = _assert_image(embedding_frame(emb, lab, cen, 1.0, 4.0, tmp_path / "1.png", limits=lim), "PNG")
    s2 = _assert_image(embedding_frame(3 * emb, lab, cen, 1.0, 4.0, tmp_path / "2.png", limits=lim), "PNG")
    assert s1 == s2


def test_embedding_frame_rejects_bad_input(tmp_path):
    emb, lab, cen = _blobs()
    with pytest.raises(ValueError):
        embedding_frame(emb[:, :1], lab, cen, 1.0, None, tmp_path / "x.png")
    with pytest.raises(ValueError):
        embedding_frame(emb, lab[:-1], cen, 1.0, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no centre"):
        embedding_frame(emb, np.where(lab == 2, 5, lab), cen, 1.0, None, tmp_path / "x.png")
    with pytest.raises(ValueError):
        embedding_frame(emb, lab, cen, -1.0, None, tmp_path / "x.png")


def test_embedding_frame_many_points_is_fast(tmp_path):
    rng = np.random.default_rng(1)
    n = 50_000
    emb = rng.standard_normal((n, 2)) * 3
    lab = rng.integers(-1, 10, size=n)
    cen = rng.standard_normal((10, 2)) * 3
    embedding_frame(emb, lab, cen, 1.0, 4.0, tmp_path / "warm.png")  # warm-up (font cache, mathtext)
    t0 = time.perf_counter()
    embedding_frame(emb, lab, cen, 1.0, 4.0, tmp_path / "fast.png")
    assert time.perf_counter() - t0 < 1.5  # target < 0.5 s; generous bound for loaded CI machines


def test_subsample_is_deterministic_and_capped():
    a = plots._subsample_indices(20_000, 5000)
    b = plots._subsample_indices(20_000, 5000)
    assert len(a) == 5000 and len(np.unique(a)) == 5000
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plots._subsample_indices(10, 5000), np.arange(10))


# ------------------------------------------------------------------ axis limits


def test_axis_limits_include_points_centres_and_circles():
    emb = np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 100.0]])  # non-finite row ignored
    cen = np.array([[5.0, 0.0]])
    xmin, xmax, ymin, ymax = axis_limits(emb, cen, radius=4.0, pad=0.0)  # circle radius 2
    assert (xmin, xmax, ymin, ymax) == pytest.approx((0.0, 7.0, -2.0, 2.0))
    xmin, xmax, ymin, ymax = axis_limits(emb, cen, radius=4.0, pad=0.0, squared=False)
    assert (xmin, xmax, ymin, ymax) == pytest.approx((0.0, 9.0, -4.0, 4.0))
    xmin, xmax, ymin, ymax = axis_limits(emb, cen, radius=4.0, pad=0.1)
    assert xmin == pytest.approx(-0.7) and xmax == pytest.approx(7.7)


def test_axis_limits_torch_and_degenerate():
    lim = axis_limits(torch.zeros(5, 2), torch.zeros(1, 2), 0.0)
    assert lim[0] < lim[1] and lim[2] < lim[3]


# ------------------------------------------------------------------ GIF


def test_assemble_gif_frame_count(tmp_path):
    frames = []
    emb, lab, cen = _blobs(n_per_class=50, n_outliers=20)
    lim = axis_limits(emb * 2, cen, 1.0)
    for i in range(4):
        frames.append(
            embedding_frame(emb * (1 + 0.3 * i), lab, cen, 1.0, 4.0, tmp_path / f"f{i}.png", f"epoch {i}", lim)
        )
    out = assemble_gif(frames, tmp_path / "gif" / "anim.gif", duration_ms=120)
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 4
        assert im.info.get("loop") == 0
        assert im.info.get("duration") == 120


def test_assemble_gif_single_and_resized_frames(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (60, 40), "red").save(a)
    Image.new("RGBA", (80, 50), "blue").save(b)
    out = assemble_gif([a, b], tmp_path / "x.gif")
    with Image.open(out) as im:
        assert im.n_frames == 2 and im.size == (60, 40)
    with Image.open(assemble_gif([str(a)], tmp_path / "one.gif")) as im:
        assert im.n_frames == 1


def test_assemble_gif_empty_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        assemble_gif([], tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()


# ------------------------------------------------------------------ histogram


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_distance_histogram_writes_png(tmp_path, kind):
    rng = np.random.default_rng(0)
    ids, ood = rng.gamma(2.0, 1.0, 1000), rng.gamma(6.0, 1.0, 800)
    if kind == "torch":
        ids, ood = torch.tensor(ids), torch.tensor(ood, dtype=torch.float32)
    _assert_image(distance_histogram(ids, ood, tmp_path / kind / "h.png", title="t"), "PNG")


def test_distance_histogram_log_scale_and_edge_cases(tmp_path, monkeypatch):
    scales = []
    orig = plots._save

    def spy(fig, path, dpi):
        scales.append(fig.axes[0].get_xscale())  # recorded before the figure is cleared
        return orig(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", spy)
    rng = np.random.default_rng(0)
    distance_histogram(10 ** rng.uniform(-2, 3, 500), 10 ** rng.uniform(0, 4, 500), tmp_path / "log.png")
    assert scales[-1] == "log"
    distance_histogram(rng.normal(0, 1, 500), rng.normal(3, 1, 500), tmp_path / "lin.png")
    assert scales[-1] == "linear"
    distance_histogram(rng.uniform(1, 50, 500), rng.uniform(1, 50, 500), tmp_path / "lin2.png")
    assert scales[-1] == "linear"  # positive, but < 2 orders of magnitude
    # constant scores, an empty set and non-finite values still give an image
    _assert_image(distance_histogram(np.ones(10), [], tmp_path / "c.png"), "PNG")
    _assert_image(distance_histogram([1.0, np.inf, np.nan], [2.0, 3.0], tmp_path / "nf.png"), "PNG")
    with pytest.raises(ValueError):
        distance_histogram([], [np.nan], tmp_path / "e.png")


def test_distance_histogram_densities_integrate_to_one(tmp_path, monkeypatch):
    """Linear x: density per unit score; log x: density per decade. Each integrates to 1."""
    steps = []
    orig = plots._save

    def spy(fig, path, dpi):
        ax = fig.axes[0]
        steps.append((ax.get_xscale(), [p.get_data() for p in ax.patches]))
        return orig(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", spy)
    rng = np.random.default_rng(1)
    distance_histogram(10 ** rng.uniform(-3, 2, 400), 10 ** rng.uniform(0, 3, 300), tmp_path / "log.png")
    distance_histogram(rng.normal(0, 1, 400), rng.normal(2, 1, 300), tmp_path / "lin.png")
    for scale, data in steps:
        assert len(data) == 4  # filled + outline per set
        for d in data:
            widths = np.diff(np.log10(d.edges)) if scale == "log" else np.diff(d.edges)
            assert np.sum(d.values * widths) == pytest.approx(1.0)


def test_class_colors_never_grey_like_outliers():
    for n in (1, 8, 10, 11, 20, 30):
        cols = plots._class_colors(n)
        assert cols.shape == (n, 4)
        spread = cols[:, :3].max(axis=1) - cols[:, :3].min(axis=1)
        assert np.all(spread > 0.1), n  # grey = equal R, G, B


# ------------------------------------------------------------------ ROC


def _mann_whitney(ids, ood):
    ids, ood = np.asarray(ids, float), np.asarray(ood, float)
    gt = (ood[:, None] > ids[None, :]).mean()
    eq = (ood[:, None] == ids[None, :]).mean()
    return gt + 0.5 * eq


def test_roc_perfect_separation():
    fpr, tpr, auc = roc_points([0.1, 0.2, 0.3], [1.0, 2.0])
    assert auc == 1.0
    _, _, auc_rev = roc_points([1.0, 2.0], [0.1, 0.2, 0.3])
    assert auc_rev == 0.0  # sign check: smaller OOD scores = worst detector


def test_roc_identical_distributions_near_half():
    rng = np.random.default_rng(0)
    _, _, auc = roc_points(rng.normal(size=20_000), rng.normal(size=20_000))
    assert abs(auc - 0.5) < 0.02
    _, _, auc_const = roc_points(np.ones(7), np.ones(3))  # all tied
    assert auc_const == pytest.approx(0.5)


def test_roc_hand_example_with_ties():
    # pairs (ood, id): ood=1 vs ids 0,1,1 -> 1 + .5 + .5; ood=2 vs 0,1,1 -> 3; total 5/6
    fpr, tpr, auc = roc_points([0, 1, 1], [1, 2])
    assert auc == pytest.approx(5 / 6)
    # thresholds >=2, >=1, >=0 ; the tie at 1 is a single diagonal step
    np.testing.assert_allclose(fpr, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])


def test_roc_random_ties_match_mann_whitney_and_torch_input():
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids = rng.integers(0, 6, size=rng.integers(1, 40))
        ood = rng.integers(2, 8, size=rng.integers(1, 40))
        fpr, tpr, auc = roc_points(torch.tensor(ids), torch.tensor(ood))
        assert auc == pytest.approx(_mann_whitney(ids, ood))
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_roc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(4)
    ids = np.round(rng.normal(0, 1, 500), 1)  # rounding creates many ties
    ood = np.round(rng.normal(1, 1, 300), 1)
    y = np.r_[np.zeros(ids.size), np.ones(ood.size)]
    s = np.r_[ids, ood]
    fpr, tpr, auc = roc_points(ids, ood)
    assert auc == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    sk_fpr, sk_tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_roc_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        roc_points([], [1.0])
    with pytest.raises(ValueError):
        roc_points([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        roc_points([np.nan, 1.0], [2.0])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_roc_curve_plot_writes_png(tmp_path, kind):
    rng = np.random.default_rng(0)
    ids, ood = rng.normal(0, 1, 500), rng.normal(1.5, 1, 500)
    if kind == "torch":
        ids, ood = torch.tensor(ids), torch.tensor(ood)
    _assert_image(roc_curve_plot(ids, ood, tmp_path / "r" / "roc.png", title="x"), "PNG")


# ------------------------------------------------------------------ resources


def test_no_pyplot_figures_left_open(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    emb, lab, cen = _blobs(n_per_class=20, n_outliers=5)
    for i in range(3):
        embedding_frame(emb, lab, cen, 1.0, 4.0, tmp_path / f"{i}.png")
        distance_histogram(emb[:, 0] ** 2, emb[:, 1] ** 2 + 1, tmp_path / f"h{i}.png")
        roc_curve_plot(emb[:, 0], emb[:, 1], tmp_path / f"r{i}.png")
    assert len(plt.get_fignums()) == before
