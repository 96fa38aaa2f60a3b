"""Post-hoc detectors, the per-sample score file and the OSCR metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import compose_config
from test_robustness import SHORT, _light_overrides

from mchad.errors import ConfigError
from mchad.models.detectors import SPECS, DetectorBank, check_detectors
from mchad.models.methods import MCHAD, Softmax
from mchad.results.aggregate import main as aggregate_main
from mchad.results.metrics import METRIC_COLUMNS, case_metrics, oscr
from mchad.results.scores import SCORES_FILE, load_scores, recompute_metrics
from mchad.runs.train import RESULT_COLUMNS, run

# ----------------------------------------------------------------------------- OSCR


def test_oscr_hand_computed_with_ties():
    """ID scores 0.1 0.2 0.2 0.5 (the second 0.2 misclassified), OOD 0.2 0.4 0.6. Accepting
    score <= t, the curve (FPR, CCR) passes (0,0) (0,1/4) (1/3,2/4) (2/3,2/4) (2/3,3/4) (1,3/4):
    the tie at 0.2 (two ID, one OOD) is one diagonal step. Area = 1/8 + 1/6 + 1/4 = 13/24."""
    id_scores = torch.tensor([0.1, 0.2, 0.2, 0.5])
    correct = torch.tensor([True, True, False, True])
    ood_scores = torch.tensor([0.2, 0.4, 0.6])
    assert oscr(id_scores, correct, ood_scores) == pytest.approx(13 / 24, abs=1e-12)
    # the order of tied samples does not matter
    assert oscr(id_scores.flip(0), correct.flip(0), ood_scores.flip(0)) == pytest.approx(13 / 24, abs=1e-12)


def test_oscr_bounds():
    id_scores, ood_scores = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, 0.9])
    correct = torch.tensor([True, False, True, True])
    # perfect separation: the OSCR is the accuracy
    assert oscr(id_scores, correct, ood_scores) == pytest.approx(0.75)
    # OOD accepted first: nothing correct before every OOD sample is in
    assert oscr(-id_scores, correct, -ood_scores) == pytest.approx(0.0)
    # one shared score for everything: a single diagonal from (0, 0) to (1, accuracy)
    assert oscr(torch.zeros(4), correct, torch.zeros(2)) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        oscr(id_scores, correct, torch.tensor([]))


def test_case_metrics_columns():
    row = case_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0.3]))
    assert list(row) == METRIC_COLUMNS
    assert row["Accuracy"] == 0.5 and row["AUROC"] == 1.0 and row["OSCR"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- detectors on a toy case

# two classes along e0 and e1 (non-negative, like rectified features), OOD along e2 + e3
CENTRES = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])


def _toy(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    id_features = CENTRES[labels] + 0.1 * torch.randn(n, 4, generator=generator)
    ood_features = torch.tensor([0, 0, 5.0, 5.0]) + 0.1 * torch.randn(n, 4, generator=generator)
    return id_features, labels, ood_features


def _softmax_toy() -> Softmax:
    method = Softmax(n_classes=2, n_embedding=4)
    with torch.no_grad():
        method.head.weight.copy_(torch.eye(4)[:2])
        method.head.bias.zero_()
    return method


def _mchad_toy() -> MCHAD:
    method = MCHAD(n_classes=2, n_embedding=4)
    with torch.no_grad():
        method.class_centers.params.copy_(CENTRES)
    return method


@pytest.mark.parametrize("make_method", [_softmax_toy, _mchad_toy], ids=["softmax", "mchad"])
def test_every_detector_scores_ood_higher_on_a_toy_case(make_method):
    """ID samples sit at their class centre (confident logits, in the training subspace), OOD
    samples away from both (equal logits, off the subspace): every applicable detector must
    give every OOD sample a larger score than every ID sample (larger = more anomalous)."""
    method = make_method().eval()
    names = [n for n in SPECS if not (SPECS[n].needs_linear_head and method.linear_head is None)]
    train_x, train_y, _ = _toy(200, seed=0)
    test_x, _, ood_x = _toy(50, seed=1)
    bank = DetectorBank(names, {"knn": {"k": 5}, "dice": {"p": 0.5}}, fit_samples=200, seed=0)
    bank.fit(method, method, train_x, train_y, lambda x: x, torch.device("cpu"), batch_size=64)
    id_scores = bank.scores(method, method(test_x))
    ood_scores = bank.scores(method, method(ood_x))
    assert set(id_scores) == set(names)
    for name in names:
        assert id_scores[name].shape == (50,) and id_scores[name].dtype == torch.float32
        assert ood_scores[name].min() > id_scores[name].max(), name


def test_vim_and_dice_refused_for_centre_methods_and_unknown_names_listed():
    with pytest.raises(ConfigError, match="vim, dice need a linear classifier head, which MCHAD"):
        check_detectors(["energy", "vim", "dice"], _mchad_toy(), "MCHAD")
    assert check_detectors(["VIM", "dice"], _softmax_toy(), "Softmax") == ["vim", "dice"]
    with pytest.raises(ConfigError, match=r"unknown detector\(s\) odin; valid: energy, maxlogit"):
        check_detectors(["odin"], _softmax_toy(), "Softmax")
    with pytest.raises(ConfigError, match="more than once"):
        check_detectors(["knn", "knn"], _softmax_toy(), "Softmax")
    with pytest.raises(ConfigError, match=r"detector_args.knn: unknown argument\(s\) kk"):
        check_detectors(["knn"], _softmax_toy(), "Softmax", {"knn": {"kk": 3}})
    with pytest.raises(ConfigError, match="detector_fit_samples"):
        check_detectors(["knn"], _softmax_toy(), "Softmax", {}, 0)


def test_fit_sees_only_the_seeded_training_subset():
    """The fit forwards exactly the training images of its seeded subset, nothing else."""
    method = _softmax_toy().eval()
    train_x, train_y, _ = _toy(100, seed=0)
    seen = []

    def forward(x):
        seen.append(x.clone())
        return method(x)

    bank = DetectorBank(["mahalanobis", "energy"], fit_samples=30, seed=7)
    bank.fit(forward, method, train_x, train_y, lambda x: x, torch.device("cpu"), batch_size=8)
    index = bank.fit_indices
    assert len(index) == 30 == len(set(index.tolist()))
    assert torch.equal(torch.cat(seen), train_x[index])
    # the Gaussian's class means are those of the fitted samples
    means = torch.stack([train_x[index][train_y[index] == c].mean(0) for c in range(2)])
    assert torch.allclose(bank.detectors["mahalanobis"].mu, means, atol=1e-6)
    again = DetectorBank(["mahalanobis"], fit_samples=30, seed=7)
    again.fit(method, method, train_x, train_y, lambda x: x, torch.device("cpu"))
    assert torch.equal(again.fit_indices, index)  # seeded


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def fast() -> list[str]:
    return SHORT + _light_overrides()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast) -> Path:
    """A short quick-start MCHAD run without detectors (its folder)."""
    folder = tmp_path_factory.mktemp("trained")
    run(compose_config(fast, folder))
    return folder


# she needs a correctly classified training sample of every class, which 9 training steps do not give
MCHAD_DETECTORS = [n for n in SPECS if not SPECS[n].needs_linear_head and n != "she"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained, fast):
    """`train=false ckpt_path=<trained>` with every detector that applies to MCHAD; records
    what the detectors' fit forwarded and the training split it came from."""
    folder = tmp_path_factory.mktemp("evaluated")
    record: dict = {"inputs": []}
    original = DetectorBank.fit

    def spy(self, forward, method, images, labels, transform, device, batch_size=512):
        record.update(bank=self, train_images=images, transform=transform)

        def recording(x):
            record["inputs"].append(x.clone())
            return forward(x)

        return original(self, recording, method, images, labels, transform, device, batch_size)

    detectors = f"detectors=[{','.join(MCHAD_DETECTORS)}]"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DetectorBank, "fit", spy)
        before = (trained / "results.csv").read_bytes()
        run(
            compose_config(
                [*fast, "train=false", f"ckpt_path={trained}", detectors, "detector_fit_samples=300"], folder
            )
        )
    record["reference_unchanged"] = before == (trained / "results.csv").read_bytes()
    return folder, record


def test_eval_only_adds_detector_rows_and_keeps_the_others(trained, evaluated):
    folder, record = evaluated
    old, new = pd.read_csv(trained / "results.csv"), pd.read_csv(folder / "results.csv")
    assert list(new.columns) == RESULT_COLUMNS
    assert record["reference_unchanged"]
    kept = new[new.score.isin(old.score.unique())].reset_index(drop=True)
    # the same numbers; what differs is where they come from (evaluated_from, the detectors in the config hash)
    measured = [*RESULT_COLUMNS[:6], *METRIC_COLUMNS]
    pd.testing.assert_frame_equal(kept[measured], old[measured], check_exact=True)
    assert (new.evaluated_from == str(trained / "checkpoints" / "last.ckpt")).all()
    added = new[~new.score.isin(old.score.unique())]
    assert sorted(added.score.unique()) == sorted(MCHAD_DETECTORS)
    assert len(added) == len(MCHAD_DETECTORS) * old.test_case.nunique()
    assert new.score.iloc[0] == "distance"  # the headline score stays first
    assert new[METRIC_COLUMNS].apply(lambda c: c.between(0, 1)).all().all()
    # MaxLogit of the negated distances is the distance score itself
    by = new.set_index(["test_case", "score"]).AUROC
    for case in new.test_case.unique():
        assert by[(case, "maxlogit")] == pytest.approx(by[(case, "distance")], abs=1e-9)


def test_detectors_are_fitted_on_training_data_only(evaluated):
    """What the fit forwarded is exactly the transformed training images of the seeded subset,
    and the training split is disjoint from every test set (by content)."""
    folder, record = evaluated
    bank = record["bank"]
    index = bank.fit_indices
    assert len(index) == 300 and index.max() < len(record["train_images"])
    expected = record["transform"](record["train_images"][index])
    assert torch.equal(torch.cat(record["inputs"]), expected)
    from mchad.runs.train import build

    datamodule, _ = build(compose_config([], folder / "again"))
    assert record["train_images"] is not datamodule.data["test"].images
    flat = {bytes(image.numpy()) for image in record["train_images"][index]}
    for test_set in [datamodule.data["test"], *datamodule.test_cases.values()]:
        assert not flat & {bytes(image.numpy()) for image in test_set.images}


def test_score_file_round_trips_to_the_same_metrics(evaluated, tmp_path):
    folder, _ = evaluated
    scores = load_scores(folder)
    results = pd.read_csv(folder / "results.csv")
    measured = [*RESULT_COLUMNS[:6], *METRIC_COLUMNS]  # the scores hold no provenance
    recomputed = pd.DataFrame(recompute_metrics(folder / SCORES_FILE), columns=measured)
    pd.testing.assert_frame_equal(recomputed, results[measured], check_exact=False, rtol=0, atol=1e-12)
    assert scores.score_names == list(results.score.unique())
    frame = scores.to_frame()
    assert set(frame.set) == {"ID", *results.test_case}
    assert len(frame[frame.set == "ID"]) == len(scores.sets["ID"]["labels"])
    # any metric, e.g. the mean OOD score gap
    extra = recompute_metrics(scores, {"gap": lambda i, y, p, o: float(o.mean() - i.mean())})
    assert all(np.isfinite(row["gap"]) for row in extra)
    # the aggregation from the score files gives the tables of the results.csv files
    assert aggregate_main([str(folder), "--out", str(tmp_path / "a"), "--score", "knn"]) == 0
    assert aggregate_main([str(folder), "--out", str(tmp_path / "b"), "--score", "knn", "--from-scores"]) == 0
    for table in ("table.csv", "table_per_ood.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / table), pd.read_csv(tmp_path / "b" / table))


def test_inapplicable_detectors_refused_before_training(fast, tmp_path):
    with pytest.raises(ConfigError, match="vim need a linear classifier head"):
        run(compose_config([*fast, "detectors=[energy,vim]"], tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.csv").exists()
