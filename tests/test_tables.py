"""Tests of the paper-form tables (mchad.results.tables, written by mchad.results.aggregate) on a synthetic
sweep whose per-seed values, best cells and significant differences are known by construction."""

from __future__ import annotations

import csv
import math
import re
import shutil
import statistics
import subprocess

import pytest
from scipy import stats

from mchad.results.aggregate import main, summary_table, welch_tests
from mchad.results.read_results import find_results
from mchad.results.tables import (
    TableConfigError,
    TableOptions,
    load_table_config,
    paper_table,
    per_ood_paper_table,
    render_latex,
    render_markdown,
)

METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95"]
COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed"] + METRICS
SEEDS = [1, 2, 3]
OOD_OFFSETS = {"Textures": 0.02, "LSUNCrop": -0.02}  # per-seed mean over OOD sets = the base AUROC
# (dataset, method) -> per-seed AUROC averaged over the OOD sets, per-seed accuracy, score
RUNS = {
    ("CIFAR10", "MCHAD"): ([0.90, 0.91, 0.92], [0.93, 0.94, 0.95], "distance"),
    ("CIFAR10", "CAC"): ([0.70, 0.72, 0.71], [0.95, 0.96, 0.97], "distance"),
    ("CIFAR10", "Softmax"): ([0.905, 0.915, 0.92], [0.93, 0.935, 0.945], "msp"),
    ("SVHN", "MCHAD"): ([0.95, 0.96, 0.97], [0.90, 0.91, 0.92], "distance"),
    ("SVHN", "CAC"): ([0.96, 0.97, 0.98], [0.89, 0.90, 0.91], "distance"),
}
CAC_OWN_SCORE_AUROC = 0.99  # CAC's 'cac' score rows: best of all, but not the configured score


def _metrics(auroc: float) -> dict[str, float]:
    return {"AUROC": auroc, "AUPR-IN": auroc - 0.05, "AUPR-OUT": auroc - 0.10, "FPR95": 1.0 - auroc}


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for job, ((dataset, method), (aurocs, accuracies, score)) in enumerate((key, value) for key, value in RUNS.items()):
        for i, seed in enumerate(SEEDS):
            run = root / f"{job}_{seed}"
            (run / ".hydra").mkdir(parents=True)
            rows = []
            for ood, offset in OOD_OFFSETS.items():
                base = {
                    "experiment": f"{dataset}-{method}".lower(),
                    "id_dataset": dataset,
                    "method": method,
                    "test_case": ood,
                    "seed": seed,
                    "Accuracy": accuracies[i],
                }
                rows.append({**base, "score": score, **_metrics(aurocs[i] + offset)})
                if method == "CAC":
                    rows.append({**base, "score": "cac", **_metrics(CAC_OWN_SCORE_AUROC)})
            with open(run / "results.csv", "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
    return root


def _per_seed_percent(dataset: str, method: str, metric: str) -> list[float]:
    aurocs, accuracies, _ = RUNS[(dataset, method)]
    if metric == "Accuracy":
        return [100 * a for a in accuracies]
    return [100 * _metrics(a)[metric] for a in aurocs]


def _expected_best(dataset: str, metric: str) -> set[str]:
    means = {m: round(statistics.mean(_per_seed_percent(d, m, metric)), 2) for d, m in RUNS if d == dataset}
    best = (min if metric == "FPR95" else max)(means.values())
    return {m for m, v in means.items() if v == best}


def _expected_significant(dataset: str, method: str, metric: str, alpha: float = 0.05) -> bool:
    if method == "MCHAD":
        return False
    p = stats.ttest_ind(
        _per_seed_percent(dataset, "MCHAD", metric), _per_seed_percent(dataset, method, metric), equal_var=False
    ).pvalue
    return p < alpha


CELL = re.compile(
    r"^\$(?P<bold>\\mathbf\{)?(?P<mean>\d+\.\d+) \\pm (?P<spread>\d+\.\d+)\}?"
    r"(?P<dagger>\^\{\\dagger\})?\$$"
)


def _parse_latex(tex: str) -> tuple[str, list[str], list[list[str]]]:
    """Column spec, header cells and body rows (cells) of the one tabular in ``tex``."""
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", tex).group(1)
    body = tex[tex.index("\\toprule") : tex.index("\\bottomrule")].splitlines()[1:]
    rows = [re.split(r"(?<!\\)&", line.removesuffix("\\\\").strip()) for line in body if line != "\\midrule"]
    rows = [[cell.strip() for cell in row] for row in rows]
    return spec, rows[0], rows[1:]


def _tables(sweep, spread="sem", alpha=0.05, config=None):
    config = config or load_table_config()
    results, _ = find_results(sweep)
    scores = config.scores()
    summary = summary_table(results, scores, config=config)
    welch = welch_tests(results, config.baseline, scores, config=config)
    return paper_table(summary, welch, METRICS, config, TableOptions(spread=spread, alpha=alpha))


def test_latex_structure_bold_and_markers_are_exactly_the_known_ones(sweep):
    spec, header, rows = _parse_latex(render_latex(_tables(sweep)))
    assert spec == "ll" + "c" * len(METRICS)
    assert header[2:] == [
        r"Accuracy $\uparrow$",
        r"AUROC $\uparrow$",
        r"AUPR-IN $\uparrow$",
        r"AUPR-OUT $\uparrow$",
        r"FPR95 $\downarrow$",
    ]
    # methods as rows grouped by dataset, the config's order, dataset named once per group
    assert [row[:2] for row in rows] == [
        ["CIFAR10", "MCHAD"],
        ["", "CAC"],
        ["", "Softmax"],
        ["SVHN", "MCHAD"],
        ["", "CAC"],
    ]
    dataset = None
    for row in rows:
        assert len(row) == len(spec)
        dataset = row[0] or dataset
        for metric, cell in zip(METRICS, row[2:], strict=True):
            assert cell.count(r"\pm") == 1, cell
            match = CELL.match(cell)
            assert match, cell
            values = _per_seed_percent(dataset, row[1], metric)
            assert float(match["mean"]) == pytest.approx(statistics.mean(values), abs=0.005)
            sem = statistics.stdev(values) / math.sqrt(len(values))
            assert float(match["spread"]) == pytest.approx(sem, abs=0.005)
            assert bool(match["bold"]) == (row[1] in _expected_best(dataset, metric)), (dataset, row[1], metric)
            assert bool(match["dagger"]) == _expected_significant(dataset, row[1], metric), (dataset, row[1], metric)
    # the construction covers both outcomes: CAC differs on CIFAR10 AUROC, Softmax does not
    assert _expected_significant("CIFAR10", "CAC", "AUROC") and not _expected_significant("CIFAR10", "Softmax", "AUROC")
    assert _expected_best("CIFAR10", "FPR95") == {"Softmax"} and _expected_best("CIFAR10", "Accuracy") == {"CAC"}


def test_caption_names_seeds_score_and_spread(sweep):
    tex = render_latex(_tables(sweep))
    caption = re.search(r"\\caption\{(.*)\}\n", tex).group(1)
    assert "standard error of the mean over 3 seeds (1, 2, 3)" in caption
    assert "OOD score: distance (msp for Softmax)" in caption
    assert r"$\pm$" in caption and r"in \%" in caption
    assert r"$^\dagger$: differs from MCHAD at p < 0.05 (Welch's t-test over seeds)" in caption

    std_tex = render_latex(_tables(sweep, spread="std"))
    assert "standard deviation (ddof=1) over 3 seeds" in std_tex
    # MCHAD on CIFAR10: AUROC 90, 91, 92 per seed -> std 1.00, sem 0.58
    assert r"$91.00 \pm 1.00$" in std_tex and r"$91.00 \pm 0.58$" in tex


def test_alpha_option_sets_the_marker_threshold(sweep):
    tiny = render_latex(_tables(sweep, alpha=1e-12))
    assert r"\dagger}" not in tiny and "p < 1e-12" in tiny
    loose = _tables(sweep, alpha=0.999)
    markers = [cell.significant for row in loose.cells for cell in row]
    assert sum(markers) > sum(c.significant for row in _tables(sweep).cells for c in row)


def test_markdown_has_one_cell_per_metric_and_the_same_bold(sweep):
    table = _tables(sweep)
    lines = render_markdown(table).splitlines()
    table_lines = [line for line in lines if line.startswith("|")]
    assert len(table_lines) == 2 + 5
    assert len({line.count("|") for line in table_lines}) == 1
    assert table_lines[0].split("|")[3].strip() == "Accuracy ↑" and "FPR95 ↓" in table_lines[0]
    cac = table_lines[3].split("|")  # CIFAR10 / CAC
    assert cac[2].strip() == "CAC"
    assert all(cell.count("±") == 1 for cell in cac[3:-1])
    assert cac[3].strip() == "**96.00 ± 0.58**"  # best accuracy
    assert cac[4].strip().endswith(" †") and not cac[4].strip().startswith("**")
    assert lines[-1].startswith("Table: ") and "mean ± standard error of the mean over 3 seeds" in lines[-1]


def test_config_sets_order_names_and_scores(sweep, tmp_path):
    path = tmp_path / "tables.yaml"
    path.write_text(
        "methods:\n"
        "  - {method: CAC, name: 'CAC (own score)', score: cac}\n"
        "  - {method: MCHAD, name: Ours}\n"
        "baseline: MCHAD\n"
        "datasets: [SVHN]\n"
    )
    config = load_table_config(path)
    table = _tables(sweep, config=config)
    # SVHN first, listed methods in the listed order, Softmax (unlisted) after them
    assert table.rows == [
        ("SVHN", "CAC (own score)"),
        ("SVHN", "Ours"),
        ("CIFAR10", "CAC (own score)"),
        ("CIFAR10", "Ours"),
        ("CIFAR10", "Softmax"),
    ]
    cac_auroc = table.cells[2][1]
    assert cac_auroc.mean == pytest.approx(100 * CAC_OWN_SCORE_AUROC) and cac_auroc.best
    caption = render_markdown(table).splitlines()[-1]
    assert "differs from Ours" in caption and "OOD score: cac (distance for Ours; msp for Softmax)" in caption


@pytest.mark.parametrize(
    "text, message",
    [
        ("methods: {MCHAD: 1}\n", "must be a list"),
        ("colours: [red]\n", "unknown key"),
        ("methods:\n  - {name: X}\n", "needs a 'method'"),
        ("- a\n", "expected a mapping"),
    ],
)
def test_bad_table_config_is_one_error_line(sweep, tmp_path, capsys, text, message):
    path = tmp_path / "tables.yaml"
    path.write_text(text)
    with pytest.raises(TableConfigError, match=message):
        load_table_config(path)
    assert main([str(sweep), "--table-config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_per_ood_table_has_ood_sets_as_columns_for_one_metric(sweep):
    config = load_table_config()
    results, _ = find_results(sweep)
    per_ood = summary_table(results, config.scores(), by_ood=True, config=config)
    welch = welch_tests(results, "MCHAD", config.scores(), by_ood=True, config=config)
    table = per_ood_paper_table(per_ood, welch, "FPR95", config)
    spec, header, rows = _parse_latex(render_latex(table))
    assert spec == "llcc" and header == ["Dataset", "Method", "Textures", "LSUNCrop"]
    softmax = rows[2]
    assert softmax[1] == "Softmax"
    # Softmax on CIFAR10, Textures: FPR95 = 100 - (AUROC + 2) per seed -> 7.5, 6.5, 6.0; lowest in its column
    expected = [100 - 100 * (a + OOD_OFFSETS["Textures"]) for a in RUNS[("CIFAR10", "Softmax")][0]]
    match = CELL.match(softmax[2])
    assert float(match["mean"]) == pytest.approx(statistics.mean(expected), abs=0.005) and match["bold"]
    assert "FPR95 in \\% per OOD set (lower is better)" in render_latex(table)


def test_main_writes_paper_tables_and_wide_csv(sweep, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main([str(sweep), "--out", str(out), "--per-ood-metric", "auroc", "FPR95", "--spread", "std"]) == 0
    for name in (
        "table.md",
        "table.tex",
        "table.csv",
        "table_per_ood.csv",
        "table_per_ood_AUROC.md",
        "table_per_ood_AUROC.tex",
        "table_per_ood_FPR95.tex",
        "welch.csv",
        "welch_per_ood.csv",
    ):
        assert (out / name).is_file(), name
    assert (
        (out / "table.csv")
        .read_text()
        .splitlines()[0]
        .startswith("Dataset,Model,Score,OOD sets,Seeds,Seed list,Accuracy mean,Accuracy std,Accuracy sem,")
    )
    printed = capsys.readouterr().out
    assert "| CIFAR10 | MCHAD" in printed and "91.00 ± 1.00" in printed and "standard deviation" in printed


def _latex_engine() -> str | None:
    engine = next((shutil.which(e) for e in ("pdflatex", "lualatex", "xelatex") if shutil.which(e)), None)
    kpsewhich = shutil.which("kpsewhich")
    if engine is None or kpsewhich is None:
        return None
    found = subprocess.run([kpsewhich, "booktabs.sty"], capture_output=True, text=True)
    return engine if found.returncode == 0 and found.stdout.strip() else None


def test_latex_compiles(sweep, tmp_path):
    engine = _latex_engine()
    if engine is None:
        pytest.skip("no LaTeX engine with booktabs installed")
    out = tmp_path / "agg"
    assert main([str(sweep), "--out", str(out)]) == 0
    document = tmp_path / "doc.tex"
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        f"\\input{{{out / 'table.tex'}}}\n\\input{{{out / 'table_per_ood_AUROC.tex'}}}\n\\end{{document}}\n"
    )
    result = subprocess.run(
        [engine, "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 0
