"""Tests of mchad.results.aggregate on a synthetic sweep whose statistics are known by construction."""

from __future__ import annotations

import csv
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import stats

from mchad.results.aggregate import main, plot_auroc_bars, summary_table, welch_tests
from mchad.results.read_results import AggregateError, find_results
from mchad.results.tables import write_tables

COLUMNS = [
    "experiment",
    "id_dataset",
    "method",
    "test_case",
    "score",
    "seed",
    "Accuracy",
    "AUROC",
    "AUPR-IN",
    "AUPR-OUT",
    "FPR95",
]
SEEDS = [1, 2, 3]
OODS = ["Textures", "LSUNCrop"]

# AUROC (fraction) per method, OOD set and seed, chosen by hand.
AUROC = {
    "MCHAD": {"Textures": [0.90, 0.92, 0.94], "LSUNCrop": [0.80, 0.82, 0.84]},
    "CAC": {"Textures": [0.70, 0.75, 0.80], "LSUNCrop": [0.60, 0.62, 0.70]},
}
# Accuracy depends on the seed only (it is measured on the ID test set).
ACCURACY = {"MCHAD": [0.93, 0.94, 0.95], "CAC": [0.91, 0.935, 0.94]}
# CAC also reports its own score; these rows must stay out of the 'distance' table.
CAC_SCORE_AUROC = 0.10
EXPERIMENT = {"MCHAD": "cifar10-mchad", "CAC": "cifar10-cac"}


def _write_run(run_dir, rows, overrides):
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    with open(run_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _rows(method, seed_index):
    seed = SEEDS[seed_index]
    rows = []
    for ood in OODS:
        auroc = AUROC[method][ood][seed_index]
        base = {
            "experiment": EXPERIMENT[method],
            "id_dataset": "CIFAR10",
            "method": method,
            "test_case": ood,
            "seed": seed,
            "Accuracy": ACCURACY[method][seed_index],
        }
        rows.append(
            {
                **base,
                "score": "distance",
                "AUROC": auroc,
                "AUPR-IN": auroc - 0.05,
                "AUPR-OUT": auroc - 0.10,
                "FPR95": 1.0 - auroc,
            }
        )
        if method == "CAC":
            rows.append(
                {**base, "score": "cac", "AUROC": CAC_SCORE_AUROC, "AUPR-IN": 0.1, "AUPR-OUT": 0.1, "FPR95": 0.9}
            )
    return rows


@pytest.fixture()
def sweep(tmp_path):
    """logs/multiruns/<date>/<job>/results.csv for 2 methods x 3 seeds, plus one failed job."""
    root = tmp_path / "logs" / "multiruns" / "2026-11-28_12-00-00"
    job = 0
    for method in AUROC:
        for i, seed in enumerate(SEEDS):
            _write_run(root / str(job), _rows(method, i), [f"experiment={EXPERIMENT[method]}", f"seed={seed}"])
            job += 1
    failed = root / str(job)
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text("seed: 4\n")
    (failed / ".hydra" / "overrides.yaml").write_text("- experiment=cifar10-mchad\n- seed=4\n")
    return root


def _row(table, **where):
    mask = np.ones(len(table), dtype=bool)
    for column, value in where.items():
        mask &= (table[column] == value).to_numpy()
    assert mask.sum() == 1, where
    return table[mask].iloc[0]


def test_find_results_reads_all_runs_and_lists_the_failed_one(sweep):
    results, missing = find_results([sweep])
    assert results["run_dir"].nunique() == 6
    # 3 MCHAD runs x 2 OOD sets + 3 CAC runs x 2 OOD sets x 2 scores
    assert len(results) == 6 + 12
    assert [m.path for m in missing] == [sweep / "6"]
    assert missing[0].overrides == ["experiment=cifar10-mchad", "seed=4"]


def test_summary_table_spread_is_over_seeds_after_averaging_the_ood_sets(sweep):
    results, _ = find_results(sweep)
    table = summary_table(results)
    assert list(table["Model"]) == ["MCHAD", "CAC"]  # the paper's order, not alphabetical

    mchad = _row(table, Dataset="CIFAR10", Model="MCHAD")
    # Per seed, AUROC averaged over the OOD sets: (90+80)/2, (92+82)/2, (94+84)/2 = 85, 87, 89.
    assert mchad["AUROC mean"] == pytest.approx(87.0)
    assert mchad["AUROC std"] == pytest.approx(2.0)
    assert mchad["AUROC sem"] == pytest.approx(2.0 / math.sqrt(3))
    assert mchad["FPR95 mean"] == pytest.approx(13.0)
    assert mchad["FPR95 std"] == pytest.approx(2.0)
    assert mchad["AUPR-OUT mean"] == pytest.approx(77.0)
    # Accuracy is one number per run (93, 94, 95): its spread must not shrink with the
    # number of OOD sets (over the 6 (seed, OOD set) rows the std would be sqrt(4/5)).
    assert mchad["Accuracy mean"] == pytest.approx(94.0)
    assert mchad["Accuracy std"] == pytest.approx(1.0)
    assert mchad["Accuracy sem"] == pytest.approx(1.0 / math.sqrt(3))
    assert (mchad["Seeds"], mchad["OOD sets"], mchad["Seed list"], mchad["Score"]) == (3, 2, "1 2 3", "distance")

    cac = _row(table, Dataset="CIFAR10", Model="CAC")
    cac_seeds = [65.0, 68.5, 75.0]  # (70+60)/2, (75+62)/2, (80+70)/2
    assert cac["AUROC mean"] == pytest.approx(statistics.mean(cac_seeds))
    assert cac["AUROC std"] == pytest.approx(statistics.stdev(cac_seeds))
    assert cac["AUROC sem"] == pytest.approx(statistics.stdev(cac_seeds) / math.sqrt(3))


def test_summary_table_counts_a_repeated_seed_once(sweep, tmp_path):
    """The same model evaluated twice (same seed) is one independent run, not two."""
    results, _ = find_results(sweep)
    repeated = results[(results["method"] == "MCHAD") & (results["seed"] == 1)].assign(run_dir="copy")
    table = summary_table(pd.concat([results, repeated], ignore_index=True))
    mchad = _row(table, Model="MCHAD")
    assert mchad["Seeds"] == 3 and mchad["AUROC std"] == pytest.approx(2.0)


def test_summary_table_other_score_selects_only_its_rows(sweep):
    results, _ = find_results(sweep)
    table = summary_table(results, score="cac")
    assert list(table["Model"]) == ["CAC"]
    assert table.loc[0, "AUROC mean"] == pytest.approx(100 * CAC_SCORE_AUROC)
    assert table.loc[0, "AUROC std"] == pytest.approx(0.0)
    with pytest.raises(AggregateError, match="msp"):
        summary_table(results, score="msp")


def test_summary_table_per_ood_set(sweep):
    results, _ = find_results(sweep)
    table = summary_table(results, by_ood=True)
    assert len(table) == 4
    assert list(table["OOD set"][:2]) == ["Textures", "LSUNCrop"]

    textures = _row(table, Model="MCHAD", **{"OOD set": "Textures"})
    assert textures["AUROC mean"] == pytest.approx(92.0)
    assert textures["AUROC std"] == pytest.approx(2.0)
    assert textures["AUROC sem"] == pytest.approx(2.0 / math.sqrt(3))
    lsun = _row(table, Model="MCHAD", **{"OOD set": "LSUNCrop"})
    assert lsun["AUROC mean"] == pytest.approx(82.0)
    cac_lsun = _row(table, Model="CAC", **{"OOD set": "LSUNCrop"})
    assert cac_lsun["AUROC mean"] == pytest.approx(64.0)
    assert cac_lsun["AUROC std"] == pytest.approx(statistics.stdev([60, 62, 70]))
    assert cac_lsun["Seeds"] == 3


def test_welch_tests_match_scipy_on_per_seed_means(sweep):
    results, _ = find_results(sweep)
    welch = welch_tests(results)
    assert set(welch["Model"]) == {"CAC"}

    # Per-seed AUROC averaged over the two OOD sets, by hand.
    mchad = [85.0, 87.0, 89.0]
    cac = [65.0, 68.5, 75.0]
    expected = stats.ttest_ind(mchad, cac, equal_var=False)
    auroc = _row(welch, Metric="AUROC", Model="CAC")
    assert auroc["p"] == pytest.approx(expected.pvalue)
    assert auroc["t"] == pytest.approx(expected.statistic)
    assert auroc["t"] > 0  # MCHAD is better here
    assert auroc["Difference"] == pytest.approx(statistics.mean(mchad) - statistics.mean(cac))

    accuracy = _row(welch, Metric="Accuracy", Model="CAC")
    expected_acc = stats.ttest_ind([93.0, 94.0, 95.0], [91.0, 93.5, 94.0], equal_var=False)
    assert accuracy["p"] == pytest.approx(expected_acc.pvalue)


def test_welch_tests_with_one_seed_give_nan(sweep):
    results, _ = find_results(sweep)
    single = results[results["seed"] == 1]
    welch = welch_tests(single)
    assert welch["p"].isna().all()
    assert (welch["Baseline seeds"] == 1).all()


def test_plot_auroc_bars_writes_a_png(sweep, tmp_path):
    results, _ = find_results(sweep)
    path = tmp_path / "auroc.png"
    plot_auroc_bars(results, "CIFAR10", path)
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(AggregateError):
        plot_auroc_bars(results, "SVHN", tmp_path / "none.png")


def test_write_tables_writes_four_formats(sweep, tmp_path):
    results, _ = find_results(sweep)
    paths = write_tables(summary_table(results), tmp_path / "out", "table")
    assert sorted(p.name for p in paths.values()) == ["table.csv", "table.html", "table.md", "table.tex"]
    markdown = paths["md"].read_text()
    lines = markdown.strip().splitlines()
    assert len(lines) == 2 + 2  # header, rule, MCHAD, CAC
    assert len({line.count("|") for line in lines}) == 1
    assert "| MCHAD" in lines[2] and "87.00" in lines[2] and "2.00" in lines[2]
    assert "<table" in paths["html"].read_text() and "87.00" in paths["html"].read_text()
    tex = paths["tex"].read_text()
    assert "\\begin{tabular}" in tex and "87.00" in tex
    assert paths["csv"].read_text().startswith("Dataset,Model,")


def test_main_writes_everything(sweep, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main([str(sweep), "--out", str(out)]) == 0
    for name in (
        "table.csv",
        "table.md",
        "table.tex",
        "table_per_ood.csv",
        "table_per_ood_AUROC.md",
        "table_per_ood_AUROC.tex",
        "welch.csv",
        "welch.md",
        "welch_per_ood.csv",
    ):
        assert (out / name).is_file(), name
    assert imread(out / "auroc_CIFAR10.png").ndim == 3
    missing = (out / "missing.txt").read_text()
    assert str(sweep / "6") in missing and "seed=4" in missing
    printed = capsys.readouterr().out
    assert "87.00 ± 1.15" in printed  # MCHAD's AUROC: mean ± sem over the 3 seeds
    assert "runs found: 6" in printed and "missing/failed trials: 1" in printed


def test_main_default_out_is_inside_first_folder(sweep):
    assert main([str(sweep)]) == 0
    assert (sweep / "aggregate" / "table.md").is_file()
    # A second pass must not pick up its own output as runs.
    results, missing = find_results(sweep)
    assert results["run_dir"].nunique() == 6 and len(missing) == 1


def _assert_one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err


def test_main_empty_folder_fails_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "no results.csv")


def test_main_missing_column_fails_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.csv").write_text(
        "experiment,id_dataset,method,test_case,score,seed,Accuracy,AUROC,AUPR-IN,AUPR-OUT\n"
        "cifar10-mchad,CIFAR10,MCHAD,Textures,distance,1,0.9,0.9,0.9,0.9\n"
    )
    assert main([str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "FPR95", str(run / "results.csv"))
    with pytest.raises(ValueError, match="missing column"):
        find_results(tmp_path)


def test_percent_values_are_rejected(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, [{**_rows("MCHAD", 0)[0], "AUROC": 90.0}], ["seed=1"])
    assert main([str(tmp_path)]) == 2
    _assert_one_line_error(capsys, "AUROC", "[0, 1]")


def test_nonexistent_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    _assert_one_line_error(capsys, "no such folder")


def test_headline_score_takes_each_runs_first_score(tmp_path):
    """The paper's table holds Softmax (msp only) beside the distance models: with
    score='headline' each run contributes the score it lists first."""
    softmax_auroc = [0.61, 0.65]
    for i, seed in enumerate([1, 2]):
        base = {
            "experiment": "cifar10-softmax",
            "id_dataset": "CIFAR10",
            "method": "Softmax",
            "test_case": "Textures",
            "seed": seed,
            "Accuracy": 0.9,
        }
        _write_run(
            tmp_path / f"softmax{seed}",
            [{**base, "score": "msp", "AUROC": softmax_auroc[i], "AUPR-IN": 0.5, "AUPR-OUT": 0.5, "FPR95": 0.5}],
            [],
        )
    for index in range(3):
        _write_run(tmp_path / f"cac{index}", _rows("CAC", index), [])
    df, _ = find_results(tmp_path)
    table = summary_table(df, "headline")
    assert set(table["Model"]) == {"Softmax", "CAC"}
    softmax = _row(table, Model="Softmax")
    assert softmax["AUROC mean"] == pytest.approx(100 * statistics.mean(softmax_auroc))
    cac = _row(table, Model="CAC")  # its first score is distance; the cac rows (AUROC 0.10) stay out
    assert cac["AUROC mean"] == pytest.approx(100 * statistics.mean(v for ood in OODS for v in AUROC["CAC"][ood]))


# ----------------------------------------------------------------------------- provenance


def _stamp(sweep, code="0.1.0+aaaaaaaaaaaa", data="d1", config="c1", runs=range(6)):
    """Give runs of the sweep fixture the provenance columns a run writes (mchad.runs.provenance)."""
    import pandas as pd

    for run in runs:
        path = sweep / str(run) / "results.csv"
        frame = pd.read_csv(path).assign(code_version=code, data_fingerprint=data, config_hash=config)
        frame.to_csv(path, index=False)


def test_trials_of_one_cell_from_different_commits_are_refused(sweep, tmp_path, capsys):
    """Guards the provenance check: one MCHAD seed made by another commit is refused in one
    line naming the cell, both code versions and the runs; --allow-mixed accepts it with a note."""
    _stamp(sweep)
    _stamp(sweep, code="0.1.0+bbbbbbbbbbbb.dirty-123", runs=[2])
    assert main([str(sweep), "--out", str(tmp_path / "agg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: trials with different code")
    assert "CIFAR10 / MCHAD" in err and "--allow-mixed" in err
    assert f"0.1.0+aaaaaaaaaaaa ({sweep / '0'}, {sweep / '1'})" in err
    assert f"0.1.0+bbbbbbbbbbbb.dirty-123 ({sweep / '2'})" in err
    assert not (tmp_path / "agg" / "table.csv").exists()

    assert main([str(sweep), "--out", str(tmp_path / "agg"), "--allow-mixed"]) == 0
    assert "note: --allow-mixed: trials with different code" in capsys.readouterr().out
    assert (tmp_path / "agg" / "table.csv").exists()


def test_trials_of_one_cell_on_different_data_are_refused(sweep, tmp_path, capsys):
    """Guards the data check: a CAC seed whose data fingerprint differs (another copy of a
    dataset) is refused; different code across cells (MCHAD vs CAC) is fine."""
    _stamp(sweep, code="0.1.0+aaaaaaaaaaaa", runs=[0, 1, 2])
    _stamp(sweep, code="0.1.0+cccccccccccc", runs=[3, 4, 5])
    assert main([str(sweep), "--out", str(tmp_path / "ok")]) == 0
    _stamp(sweep, code="0.1.0+cccccccccccc", data="d2", runs=[5])
    assert main([str(sweep), "--out", str(tmp_path / "agg")]) == 2
    err = capsys.readouterr().err
    assert "different data (data_fingerprint)" in err and "CIFAR10 / CAC / " in err
    assert f"d2 ({sweep / '5'})" in err


def test_results_without_provenance_still_aggregate_with_a_note(sweep, tmp_path, capsys):
    """Results written before provenance existed carry none: aggregated, and said so."""
    assert main([str(sweep), "--out", str(tmp_path / "agg")]) == 0
    assert "note: 6 run(s) record no provenance" in capsys.readouterr().out
