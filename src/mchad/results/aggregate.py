"""Aggregate the ``results.csv`` of many runs into the paper's tables, plots and tests.

Usage::

    python -m mchad.results.aggregate logs/multiruns/2026-11-28_12-00-00 [more folders...]
        [--out DIR] [--score headline|distance|msp|cac|cac_published] [--baseline MCHAD]
        [--spread sem|std] [--alpha 0.05] [--per-ood-metric AUROC ...] [--decimals 2]
        [--table-config tables.yaml] [--published-aupr-names]

Every ``results.csv`` below the given folders is read (one row per test case and OOD
score, metrics as fractions). A Hydra run folder (one holding ``.hydra/``) without a
``results.csv`` counts as a missing or failed trial; a failed run's cause (first line of its
``FAILED.txt``, written by mchad.runs.train for single runs and mchad.sweeps.sweep for trials) is listed
with it. Each trained model counts once: the rows of an eval-only run (``evaluated_from``,
with the seed of the run it tested) are dropped where the training run's own rows already
hold that test case and score.

Trials are only averaged when they share their provenance (``code_version`` and
``data_fingerprint`` columns, written by mchad.runs.provenance): a table cell whose trials ran on
different code or data is refused with one line naming them, unless ``--allow-mixed``.

How the numbers are aggregated: every spread is over independent runs (seeds).

* Per seed, each metric (in %) becomes one number: ``table.*`` averages that seed's rows
  over the OOD sets (Accuracy is the same in every row of a run, so it stays the run's
  accuracy); ``table_per_ood.*`` takes the seed's row of one OOD set. Rows that repeat a
  seed (the same model evaluated twice) are averaged into that seed's number first.
* Over those per-seed numbers: mean, ``std`` (sample standard deviation, ddof=1) and
  ``sem`` (``std / sqrt(seeds)``); NaN with a single seed.
* ``welch.*``: Welch's t-test of the baseline (MCHAD) against every other model per ID
  dataset and metric, on the same per-seed numbers (``welch_per_ood.*``: per OOD set).
* ``auroc_<dataset>.png``: AUROC per OOD set and model, error bars = std over seeds.
* ``openset_<id_dataset>.*`` (open-set runs, mchad.data.osr: rows with a ``split``): per model, mean
  and std (ddof=1) over all runs (five splits x seeds) of Accuracy, AUROC and OSCR of the
  ``Unknown`` test case, in %; these runs stay out of the tables above.
* ``leaderboard.md|csv`` (OpenOOD v1.5 runs, testmodules=openood: rows with a ``group``):
  OpenOOD's leaderboard form, see :mod:`mchad.results.leaderboard`; these runs stay out of
  the tables above.

The paper-form tables (``table.md|tex``, ``table_per_ood_<metric>.md|tex``) are laid out by
``mchad.results.tables``: method order, display names and each method's score come from
``tables.yaml`` (``--table-config``); ``table.csv`` and ``table_per_ood.csv`` hold every
statistic at full precision for machines.

This module computes the statistics and runs the command; the results are read by
:mod:`mchad.results.read_results`, checked by :mod:`mchad.results.provenance_check`, and the open-set tables
made by :mod:`mchad.results.openset_tables`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from mchad.results.leaderboard import report_leaderboard, split_openood, write_leaderboard
from mchad.results.openset_tables import report_openset, split_openset, write_openset_tables
from mchad.results.provenance_check import check_provenance
from mchad.results.read_results import (
    KEY_COLUMNS,
    METRICS,
    RESULTS_FILE,
    AggregateError,
    NoResultsError,
    find_results,
    find_results_from_scores,
    published_aupr_names,
    select_score,
)
from mchad.results.tables import (
    DATASET,
    DISPLAY_NAMES,
    MODEL,
    OOD_SET,
    SEED_LIST,
    SPREADS,
    TableConfig,
    TableConfigError,
    TableOptions,
    display_order,
    display_orders,
    load_table_config,
    ordered,
    paper_table,
    per_ood_paper_table,
    render_markdown,
    safe_name,
    sort_rows,
    write_paper_table,
    write_tables,
)

STATISTICS = ["mean", "std", "sem"]


def summary_table(
    df: pd.DataFrame,
    score: str | Mapping[str, str] = "distance",
    by_ood: bool = False,
    config: TableConfig | None = None,
) -> pd.DataFrame:
    """Mean, std and sem (in %) over seeds per ID dataset and model (and OOD set if ``by_ood``).

    Each seed first becomes one number per metric: its rows averaged over the OOD sets
    (or its row of the one OOD set), so every spread is over independent runs.
    """
    rows = select_score(df, score)
    per_seed = _per_seed_values(rows, by_ood)
    keys = ["id_dataset", "method"] + (["test_case"] if by_ood else [])
    grouped = per_seed.groupby(keys, sort=False)

    stats_table = grouped[METRICS].agg(STATISTICS)
    stats_table.columns = [f"{metric} {stat}" for metric, stat in stats_table.columns]
    counts = grouped.agg(
        Seeds=("seed", "nunique"), **{SEED_LIST: ("seed", lambda s: " ".join(map(str, sorted(set(s)))))}
    )
    rows_grouped = rows.groupby(keys, sort=False)
    counts.insert(0, "Score", rows_grouped["score"].agg(lambda s: "/".join(dict.fromkeys(s))))
    if not by_ood:
        counts.insert(1, "OOD sets", rows_grouped["test_case"].nunique())

    table = counts.join(stats_table).reset_index().rename(columns=DISPLAY_NAMES)
    return sort_rows(table, config)


def _per_seed_values(rows: pd.DataFrame, by_ood: bool) -> pd.DataFrame:
    """One value per seed (in %); rows repeating a seed (and the OOD sets unless ``by_ood``) are averaged."""
    keys = ["id_dataset", "method"] + (["test_case"] if by_ood else []) + ["seed"]
    return (rows[keys + METRICS].groupby(keys, sort=False)[METRICS].mean() * 100.0).reset_index()


def _per_seed(df: pd.DataFrame, score: str | Mapping[str, str], by_ood: bool) -> pd.DataFrame:
    return _per_seed_values(select_score(df, score), by_ood)


def welch_tests(
    df: pd.DataFrame,
    baseline: str = "MCHAD",
    score: str | Mapping[str, str] = "distance",
    metrics: list[str] | None = None,
    by_ood: bool = False,
    config: TableConfig | None = None,
) -> pd.DataFrame:
    """Welch's t-test of ``baseline`` against every other model per ID dataset and metric.

    Samples: the per-seed values (in %) of ``summary_table``: averaged over the OOD sets, or
    per OOD set with ``by_ood``. ``t > 0`` means the baseline's mean is higher. p is NaN
    with fewer than two seeds on either side.
    """
    # metrics that older results.csv files lack (OSCR) are all NaN there: no test for them
    metrics = metrics or [m for m in METRICS if df[m].notna().any()]
    per_seed = _per_seed(df, score, by_ood)
    group_keys = ["id_dataset"] + (["test_case"] if by_ood else [])
    records = []
    for group, of_group in per_seed.groupby(group_keys, sort=False):
        group = dict(zip(group_keys, group if isinstance(group, tuple) else (group,), strict=True))
        base = of_group[of_group["method"] == baseline]
        if base.empty:
            continue
        others = [m for m in ordered(of_group["method"], display_orders(config)[MODEL]) if m != baseline]
        for metric in metrics:
            for method in others:
                a = base[metric].dropna().to_numpy()
                b = of_group.loc[of_group["method"] == method, metric].dropna().to_numpy()
                place = {DATASET: group["id_dataset"], **({OOD_SET: group["test_case"]} if by_ood else {})}
                records.append({**place, **_welch_record(metric, baseline, method, a, b)})
    columns = [DATASET] + ([OOD_SET] if by_ood else []) + list(_welch_record("", "", "", np.ones(0), np.ones(0)))
    welch = pd.DataFrame.from_records(records, columns=columns)
    if welch.empty:
        return welch
    # the table's order: dataset (OOD set), metric, model
    welch["_metric"] = welch["Metric"].map({m: i for i, m in enumerate(metrics)})
    keys = [DATASET] + ([OOD_SET] if by_ood else [])
    welch = welch.sort_values(
        keys + ["_metric"], key=lambda c: c if c.name == "_metric" else display_order(c, config), kind="stable"
    )
    return welch.drop(columns="_metric").reset_index(drop=True)


def _welch_record(metric: str, baseline: str, method: str, a: np.ndarray, b: np.ndarray) -> dict[str, object]:
    """One row of the Welch table (without the dataset and OOD set): the baseline's values ``a``
    against the model's ``b``."""
    return {
        "Metric": metric,
        "Baseline": baseline,
        MODEL: method,
        "Baseline mean": a.mean() if a.size else math.nan,
        "Model mean": b.mean() if b.size else math.nan,
        "Difference": (a.mean() - b.mean()) if a.size and b.size else math.nan,
        **_welch(a, b),
        "Baseline seeds": a.size,
        "Model seeds": b.size,
    }


def _welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    if a.size < 2 or b.size < 2:
        return {"t": math.nan, "p": math.nan}
    # Identical constant samples give 0/0; scipy warns and returns NaN, which is the answer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(result.statistic), "p": float(result.pvalue)}


# ----------------------------------------------------------------------------- plots


def plot_auroc_bars(
    df: pd.DataFrame,
    dataset: str,
    path: str | Path,
    score: str | Mapping[str, str] = "distance",
    config: TableConfig | None = None,
) -> Figure:
    """Grouped bars of AUROC (%) per OOD set and model for one ID dataset; saves a PNG.

    Bar = mean over seeds, error bar = std over seeds (0 with a single seed).
    """
    per_seed = _per_seed(df, score, by_ood=True)
    per_seed = per_seed[per_seed["id_dataset"] == dataset]
    if per_seed.empty:
        raise NoResultsError(f"no rows for ID dataset '{dataset}' with score '{score}'")

    summary = per_seed.groupby(["test_case", "method"])["AUROC"].agg(["mean", "std"]).reset_index()
    summary["std"] = summary["std"].fillna(0.0)
    ood_sets = ordered(summary["test_case"], display_orders(config)[OOD_SET])
    methods = ordered(summary["method"], display_orders(config)[MODEL])

    # Figure + Agg canvas directly: no pyplot, so the caller's backend stays untouched.
    fig = Figure(figsize=(max(6.0, 0.9 * len(ood_sets) + 0.12 * len(ood_sets) * len(methods)) + 1.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    positions = np.arange(len(ood_sets))
    for i, method in enumerate(methods):
        of_method = summary[summary["method"] == method].set_index("test_case").reindex(ood_sets)
        ax.bar(
            positions + (i - (len(methods) - 1) / 2) * width,
            of_method["mean"].to_numpy(),
            width,
            yerr=of_method["std"].to_numpy(),
            capsize=2,
            label=method,
        )
    ax.set_xticks(positions)
    ax.set_xticklabels(ood_sets, rotation=20, ha="right")
    ax.set_ylabel("AUROC (%), mean ± std over seeds")
    ax.set_ylim(0, 105)
    score_name = "configured" if isinstance(score, Mapping) else score
    ax.set_title(f"{dataset}: AUROC per OOD set ({score_name} score)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


# ----------------------------------------------------------------------------- CLI


def _metric_name(text: str) -> str:
    by_lower = {m.lower(): m for m in METRICS}
    if text.lower() not in by_lower:
        raise argparse.ArgumentTypeError(f"unknown metric '{text}' (choose from {', '.join(METRICS)})")
    return by_lower[text.lower()]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {text}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mchad.results.aggregate",
        description="Aggregate results.csv files of runs into the paper's tables, plots and t-tests.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run or sweep folders, searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FIRST_FOLDER/aggregate)")
    parser.add_argument(
        "--score",
        default=None,
        help="OOD score to report: by default each method's score from the table config (distance; msp for "
        "Softmax); 'headline' (each run's first score) or a score name such as distance, msp, cac for all",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="model the t-tests and significance markers compare against (default: the table config's, MCHAD)",
    )
    parser.add_argument(
        "--spread",
        choices=SPREADS,
        default="sem",
        help="what ± shows: standard error of the mean over seeds (default) or standard deviation",
    )
    _add_table_arguments(parser)
    return parser.parse_args(argv)


def _add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """How the tables are computed and shown."""
    parser.add_argument(
        "--alpha",
        type=_fraction,
        default=0.05,
        help="significance threshold of Welch's t-test for the † markers (default: 0.05)",
    )
    parser.add_argument(
        "--per-ood-metric",
        type=_metric_name,
        nargs="+",
        default=["AUROC"],
        metavar="METRIC",
        help=f"metric(s) of the per-OOD-set tables, one table each ({', '.join(METRICS)}; default: AUROC)",
    )
    parser.add_argument(
        "--decimals",
        type=int,
        choices=range(0, 5),
        default=2,
        metavar="{0..4}",
        help="decimals printed in the paper tables (default: 2)",
    )
    parser.add_argument(
        "--table-config",
        type=Path,
        default=None,
        help="YAML with method order, display names and scores (default: mchad/results/tables.yaml)",
    )
    parser.add_argument(
        "--published-aupr-names",
        action="store_true",
        help="name the AUPR columns as the published table (pytorch-ood 0.0.7): AUPR-IN = OOD positive",
    )
    parser.add_argument(
        "--from-scores",
        action="store_true",
        help="recompute every metric from the runs' per-sample scores.npz instead of reading results.csv",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="average trials of one table cell even if they ran on different code or data (default: refuse)",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on unusable results)."""
    args = _parse_args(argv)
    out_dir = args.out if args.out is not None else args.folders[0] / "aggregate"
    try:
        config = load_table_config(args.table_config)
        score = args.score if args.score is not None else config.scores()
        baseline = args.baseline if args.baseline is not None else config.baseline
        results, missing = (find_results_from_scores if args.from_scores else find_results)(args.folders)
        provenance_notes = check_provenance(results, args.allow_mixed)
        openset, results = split_openset(results)
        openset_files = write_openset_tables(openset, out_dir, score)
        # OpenOOD v1.5 runs (rows with a near/far group): leaderboard.md|csv, not the paper's tables
        openood, results = split_openood(results)
        openood_files = write_leaderboard(openood, out_dir)
        if openood_files:
            report_leaderboard(openood, openood_files)
        if results.empty and not openset_files:  # OpenOOD runs only
            _write_missing(missing, out_dir)
            return 0
        if results.empty:  # open-set runs only
            return report_openset(openset, openset_files, missing, out_dir, score)
        if args.published_aupr_names:
            results = published_aupr_names(results)
        paper, welch, per_ood_papers, plots = _paper_tables(args, results, score, baseline, config, out_dir)
    except (AggregateError, TableConfigError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    print(render_markdown(paper))
    print(f"runs found: {results['run_dir'].nunique()} ({len(results)} rows); missing/failed trials: {len(missing)}")
    _write_missing(missing, out_dir)
    _print_notes(results, score, baseline, welch)
    for note in provenance_notes:
        print(note)
    per_ood_names = ", ".join(f"table_per_ood_{safe_name(m)}.md|tex" for m in per_ood_papers)
    print(
        f"written to {out_dir}: table.md|tex|csv, {per_ood_names}, table_per_ood.csv, welch.*, "
        "welch_per_ood.*, missing.txt, " + ", ".join(p.name for p in plots)
    )
    if openset_files:
        report_openset(openset, openset_files, None, out_dir, score)
    return 0


def _paper_tables(args, results: pd.DataFrame, score, baseline: str, config: TableConfig, out_dir: Path):
    """The summary, per-OOD-set and Welch tables and the AUROC bar plots, written to ``out_dir``;
    returns the paper table, the Welch table, the per-OOD-set paper tables and the plots' paths."""
    options = TableOptions(spread=args.spread, alpha=args.alpha, decimals=args.decimals)
    table = summary_table(results, score, config=config)
    per_ood = summary_table(results, score, by_ood=True, config=config)
    welch = welch_tests(results, baseline, score, config=config)
    welch_per_ood = welch_tests(results, baseline, score, by_ood=True, config=config)
    config = dataclasses.replace(config, baseline=baseline)
    paper = paper_table(table, welch, METRICS, config, options)
    per_ood_papers = {m: per_ood_paper_table(per_ood, welch_per_ood, m, config, options) for m in args.per_ood_metric}
    if args.published_aupr_names:
        for written in (paper, *per_ood_papers.values()):
            written.caption.append("AUPR names as published (AUPR-IN: OOD positive)")

    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "table.csv", index=False)
    per_ood.to_csv(out_dir / "table_per_ood.csv", index=False)
    write_paper_table(paper, out_dir, "table")
    for metric, per_ood_paper in per_ood_papers.items():
        write_paper_table(per_ood_paper, out_dir, f"table_per_ood_{safe_name(metric)}")
    write_tables(welch, out_dir, "welch")
    write_tables(welch_per_ood, out_dir, "welch_per_ood")
    plots = []
    for dataset in table[DATASET].unique():
        plot_path = out_dir / f"auroc_{safe_name(dataset)}.png"
        plot_auroc_bars(results, dataset, plot_path, score, config)
        plots.append(plot_path)
    return paper, welch, per_ood_papers, plots


def _write_missing(missing: list, out_dir: Path) -> None:
    """``missing.txt``: the run folders without results.csv, one per line; each printed."""
    header = f"# {len(missing)} missing/failed trial(s): run folders without {RESULTS_FILE}\n"
    (out_dir / "missing.txt").write_text(header + "".join(f"{m}\n" for m in missing), encoding="utf-8")
    for run in missing:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")


def _print_notes(results: pd.DataFrame, score: str | Mapping[str, str], baseline: str, welch: pd.DataFrame) -> None:
    selected = results.index.isin(select_score(results, score).index)
    score_name = "configured" if isinstance(score, Mapping) else f"'{score}'"
    without_score = sorted(set(results["method"]) - set(results.loc[selected, "method"]))
    if without_score:
        print(
            f"note: no rows with the {score_name} score for {', '.join(without_score)} (not in the table; "
            "see --score, --table-config)"
        )
    duplicated = results.duplicated(subset=KEY_COLUMNS, keep=False)
    if duplicated.any():
        print(
            f"note: {int(duplicated.sum())} rows share experiment/dataset/method/test case/score/seed "
            "with another run (averaged into one value for that seed)"
        )
    if welch.empty:
        scored = results.loc[selected, "method"]
        if (scored == baseline).any():
            print(f"note: no t-tests: no model besides the baseline '{baseline}' has {score_name} rows")
        else:
            print(f"note: no t-tests: baseline '{baseline}' has no {score_name} rows")


if __name__ == "__main__":
    sys.exit(main())
