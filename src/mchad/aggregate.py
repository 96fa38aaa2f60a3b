"""Aggregate the ``results.csv`` of many runs into the paper's tables, plots and tests.

Usage::

    python -m mchad.aggregate logs/multiruns/2026-11-28_12-00-00 [more folders...]
        [--out DIR] [--score headline|distance|msp|cac|cac_published] [--baseline MCHAD]
        [--spread sem|std] [--alpha 0.05] [--per-ood-metric AUROC ...] [--decimals 2]
        [--table-config tables.yaml] [--published-aupr-names]

Every ``results.csv`` below the given folders is read (one row per test case and OOD
score, metrics as fractions). A Hydra run folder (one holding ``.hydra/``) without a
``results.csv`` counts as a missing or failed trial; a failed run's cause (first line of its
``FAILED.txt``, written by mchad.train for single runs and mchad.sweep for trials) is listed
with it. Each trained model counts once: the rows of an eval-only run (``evaluated_from``,
with the seed of the run it tested) are dropped where the training run's own rows already
hold that test case and score.

Trials are only averaged when they share their provenance (``code_version`` and
``data_fingerprint`` columns, written by mchad.provenance): a table cell whose trials ran on
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
* ``openset_<setting>.*`` (open-set runs, mchad.osr: rows with a ``split``): per model, mean
  and std (ddof=1) over all runs (five splits x seeds) of Accuracy, AUROC and OSCR of the
  ``Unknown`` test case, in %; these runs stay out of the tables above.

The paper-form tables (``table.md|tex``, ``table_per_ood_<metric>.md|tex``) are laid out by
``mchad.tables``: method order, display names and each method's score come from
``tables.yaml`` (``--table-config``); ``table.csv`` and ``table_per_ood.csv`` hold every
statistic at full precision for machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from mchad.tables import (
    DATASET,
    MODEL,
    OOD_SET,
    SEED_LIST,
    SPREADS,
    TableConfig,
    TableConfigError,
    TableOptions,
    load_table_config,
    ordered,
    paper_table,
    per_ood_paper_table,
    render_markdown,
    to_markdown,
    write_paper_table,
)

RESULTS_FILE = "results.csv"
FAILED_FILE = "FAILED.txt"
HEADLINE = "headline"
KEY_COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed"]
METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95", "OSCR"]
# results.csv files written before OSCR existed lack it (NaN in the tables)
OPTIONAL_METRICS = ["OSCR"]
REQUIRED_COLUMNS = KEY_COLUMNS + [m for m in METRICS if m not in OPTIONAL_METRICS]
# open-set recognition (mchad.osr): the test case of the unknown classes and the reported metrics
UNKNOWN_CASE = "Unknown"
OPENSET_METRICS = ["Accuracy", "AUROC", "OSCR"]
# written by mchad.provenance; "unknown" for results.csv files from before it
PROVENANCE_COLUMNS = ["code_version", "data_fingerprint", "config_hash"]
UNKNOWN = "unknown"
STATISTICS = ["mean", "std", "sem"]

# Column names of the written tables (display order and names: mchad/tables.yaml).
_DISPLAY_NAMES = {"id_dataset": DATASET, "method": MODEL, "test_case": OOD_SET}

# p-values can be tiny; two decimals would print them as 0.00.
DEFAULT_FORMATS = {"p": "{:.3g}", "t": "{:.3f}"}


class AggregateError(ValueError):
    """Results cannot be aggregated (nothing found, malformed file, unknown selection)."""


class NoResultsError(AggregateError):
    """No results.csv (or no row for the requested selection) was found."""


class ResultsFormatError(AggregateError):
    """A results.csv lacks required columns or holds values of the wrong kind."""


@dataclass
class MissingRun:
    """A run folder without results.csv, with its Hydra overrides when known."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    # first line of the trial's FAILED.txt ("" when there is none: crashed, killed or running)
    cause: str = ""

    def __str__(self) -> str:
        overrides = " ".join(self.overrides) if self.overrides else "(no overrides.yaml)"
        cause = f"\tFAILED: {self.cause}" if self.cause else ""
        return f"{self.path}\t{overrides}{cause}"


# ----------------------------------------------------------------------------- reading


def find_results(paths: str | Path | Iterable[str | Path]) -> tuple[pd.DataFrame, list[MissingRun]]:
    """Read every results.csv below ``paths``; also list run folders that have none.

    The returned frame has the required columns plus ``run_dir`` (the run folder).
    Metrics stay fractions, as written by the runs.
    """
    roots = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for root in roots:
        if not root.is_dir():
            raise NoResultsError(f"no such folder: {root}")

    files = sorted({f for root in roots for f in root.rglob(RESULTS_FILE) if f.is_file()})
    if not files:
        raise NoResultsError(f"no {RESULTS_FILE} found below {', '.join(map(str, roots))}")

    frames = [_read_results(f) for f in files]
    results = _count_models_once(pd.concat(frames, ignore_index=True))
    if results.empty:
        raise NoResultsError(f"the {len(files)} {RESULTS_FILE} files found hold no rows")
    return results, _find_missing(roots, files)


def _count_models_once(results: pd.DataFrame) -> pd.DataFrame:
    """Each trained model counts once: an eval-only run's row (``evaluated_from`` = the
    checkpoint it tested) is dropped where the training run itself, or an earlier evaluation
    of the same checkpoint, has that test case and score. A trained run's rows stand for its
    ``checkpoints/last.ckpt`` (the model it tested). Eval-only rows whose seed is unknown
    are left out with a warning."""
    unknown_seed = (results["evaluated_from"] != "") & results["seed"].isna()
    if unknown_seed.any():
        warnings.warn(f"{int(unknown_seed.sum())} eval-only row(s) without a seed are left out "
                      "(their checkpoint is not in a run folder with a config.yaml)", stacklevel=2)
    results = results[~unknown_seed]
    evaluated = results["evaluated_from"] != ""
    checkpoint = results["evaluated_from"].where(evaluated, results["run_dir"].map(lambda d: str(Path(d, "checkpoints", "last.ckpt"))))
    model = checkpoint.map(lambda p: str(Path(p).resolve()))
    # trained runs' rows first: they are the ones kept
    order = results.assign(_evaluated=evaluated, _model=model).sort_values("_evaluated", kind="stable")
    kept = order.drop_duplicates(["_model", "test_case", "score"]).sort_index().drop(columns=["_evaluated", "_model"])
    kept["seed"] = kept["seed"].astype("int64")
    return kept.reset_index(drop=True)


def _read_results(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ResultsFormatError(f"{path}: unreadable CSV ({_one_line(exc)})") from exc

    absent = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if absent:
        raise ResultsFormatError(f"{path}: missing column(s) {', '.join(absent)}")
    for column in OPTIONAL_METRICS:
        if column not in frame.columns:
            frame[column] = math.nan

    for column in METRICS:
        values = pd.to_numeric(frame[column], errors="coerce")
        if (values.isna() & frame[column].notna()).any():
            raise ResultsFormatError(f"{path}: non-numeric values in column {column}")
        # Guards against runs that wrote percent instead of fractions: the table
        # would silently be off by a factor of 100.
        if ((values < 0) | (values > 1)).any():
            raise ResultsFormatError(f"{path}: {column} outside [0, 1] (percent instead of fractions?)")
        frame[column] = values.astype(float)

    # written by the runs since eval-only rows carry their checkpoint's seed
    frame["evaluated_from"] = frame.get("evaluated_from", pd.Series("", index=frame.index)).fillna("").astype(str)
    seeds = pd.to_numeric(frame["seed"], errors="coerce")
    if (seeds.isna() & (frame["evaluated_from"] == "")).any() or (seeds != seeds.round()).any():
        raise ResultsFormatError(f"{path}: seed must be an integer in every row")
    frame["seed"] = seeds
    for column in ["experiment", "id_dataset", "method", "test_case", "score"]:
        frame[column] = frame[column].astype(str)

    # open-set runs (mchad.osr) say which known/unknown split they trained on; results.csv files
    # written before OSCR existed lack it
    split = pd.to_numeric(frame["split"], errors="coerce") if "split" in frame.columns else np.nan
    oscr = pd.to_numeric(frame["OSCR"], errors="coerce") if "OSCR" in frame.columns else np.nan
    provenance = {c: frame[c].fillna(UNKNOWN).astype(str) if c in frame.columns else UNKNOWN for c in PROVENANCE_COLUMNS}
    frame = frame[[*REQUIRED_COLUMNS, "evaluated_from"]].assign(**provenance)
    frame["split"], frame["OSCR"] = split, oscr
    frame["run_dir"] = str(path.parent)
    # a run lists its headline score first (distance; msp for Softmax)
    frame["headline"] = frame["score"] == frame["score"].iloc[0] if len(frame) else []
    return frame


def _find_missing(roots: list[Path], result_files: list[Path]) -> list[MissingRun]:
    # A Hydra run folder is recognised by its .hydra/ folder.
    run_dirs = sorted({d.parent for root in roots for d in root.rglob(".hydra") if d.is_dir()})
    finished = [f.parent for f in result_files]
    missing = []
    for run_dir in run_dirs:
        if any(run_dir == done or run_dir in done.parents for done in finished):
            continue
        missing.append(
            MissingRun(run_dir, _read_overrides(run_dir / ".hydra" / "overrides.yaml"), _read_cause(run_dir / FAILED_FILE))
        )
    return missing


def _read_cause(path: Path) -> str:
    """First line of a trial's FAILED.txt without its ``error:`` prefix, "" if none."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return lines[0].removeprefix("error: ").strip() if lines else "unknown cause"


def _read_overrides(path: Path) -> list[str]:
    """Parse Hydra's overrides.yaml, a flat YAML list of strings, without needing PyYAML."""
    if not path.is_file():
        return []
    overrides = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("- "):
            continue
        value = line[2:].strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("''", "'")
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        overrides.append(value)
    return overrides


class MixedProvenanceError(AggregateError):
    """Trials of one table cell ran on different code or data."""


def check_provenance(df: pd.DataFrame, allow_mixed: bool = False) -> list[str]:
    """Refuse table cells that mix code versions or data; returns notes to print.

    A cell is one ID dataset and model (all its trials are averaged into one table row); its
    trials must share ``code_version``. Per OOD set they must also share ``data_fingerprint``
    (ID training/test data, outliers and that OOD set). Differences raise
    :class:`MixedProvenanceError` naming the first such cell and its runs; with
    ``allow_mixed`` they become notes. Differing ``config_hash`` is only noted (a sweep over
    hyperparameters varies it on purpose).
    """
    checks = [
        ("code", "code_version", ["id_dataset", "method"]),
        ("data", "data_fingerprint", ["id_dataset", "method", "test_case"]),
    ]
    notes = []
    for what, column, cell in checks:
        mixed = [(key, rows) for key, rows in df.groupby(cell, sort=True) if rows[column].nunique() > 1]
        if not mixed:
            continue
        key, rows = mixed[0]
        versions = "; ".join(
            f"{value} ({_list_runs(group['run_dir'].unique())})" for value, group in rows.groupby(column, sort=True)
        )
        others = f" (and {len(mixed) - 1} more cell(s))" if len(mixed) > 1 else ""
        line = f"trials with different {what} ({column}) in one table cell, {' / '.join(map(str, key))}: {versions}{others}"
        if not allow_mixed:
            raise MixedProvenanceError(f"{line}; re-run them alike, or pass --allow-mixed to aggregate them anyway")
        notes.append(f"note: --allow-mixed: {line}")
    configs = [key for key, rows in df.groupby(["id_dataset", "method"], sort=True) if rows["config_hash"].nunique() > 1]
    if configs:
        notes.append(f"note: {len(configs)} table cell(s) mix configurations (config_hash), e.g. "
                     f"{' / '.join(configs[0])}; intended for a hyperparameter sweep, else compare the runs' config.yaml")
    unrecorded = df.loc[df["code_version"] == UNKNOWN, "run_dir"].nunique()
    if unrecorded:
        notes.append(f"note: {unrecorded} run(s) record no provenance (results.csv from before it): not checked")
    no_git = df.loc[df["code_version"].str.endswith("+" + UNKNOWN), "run_dir"].nunique()
    if no_git:
        notes.append(f"note: {no_git} run(s) ran outside a git checkout: their code versions cannot be told apart")
    return notes


def _list_runs(runs, shown: int = 3) -> str:
    more = f", +{len(runs) - shown} more" if len(runs) > shown else ""
    return ", ".join(map(str, runs[:shown])) + more


# ----------------------------------------------------------------------------- tables


def _select_score(df: pd.DataFrame, score: str | Mapping[str, str]) -> pd.DataFrame:
    """Rows of one score; with ``score="headline"`` each run's headline score (distance for
    the centre-based models, msp for the Softmax reference); with a mapping method -> score
    (the table config's) each method's own, the headline for methods it does not name."""
    if isinstance(score, Mapping):
        wanted = df["method"].map(score)
        rows = df[(df["score"] == wanted) | (wanted.isna() & df["headline"])]
        label = "configured"
    else:
        rows = df[df["headline"]] if score == HEADLINE else df[df["score"] == score]
        label = f"'{score}'"
    if rows.empty:
        present = ", ".join(sorted(df["score"].astype(str).unique()))
        raise NoResultsError(f"no rows with the {label} score (scores present: {present})")
    return rows


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
    rows = _select_score(df, score)
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

    table = counts.join(stats_table).reset_index().rename(columns=_DISPLAY_NAMES)
    return _sort_rows(table, config)


def split_openset(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(open-set rows, the other rows)``: open-set runs have a ``split``."""
    openset = results["split"].notna()
    return results[openset], results[~openset]


def openset_table(df: pd.DataFrame, score: str | Mapping[str, str] = HEADLINE) -> pd.DataFrame:
    """Open-set recognition: mean and std (in %) per setting and model over all runs (every
    split and seed) of their ``Unknown`` test case; each run gives one row."""
    rows = _select_score(df[df["test_case"] == UNKNOWN_CASE], score)
    metrics = [m for m in OPENSET_METRICS if m in rows.columns]
    percent = rows[["id_dataset", "method", "split", "seed"]].assign(**{m: rows[m] * 100.0 for m in metrics})
    grouped = percent.groupby(["id_dataset", "method"], sort=False)
    stats_table = grouped[metrics].agg(["mean", "std"])
    stats_table.columns = [f"{metric} {stat}" for metric, stat in stats_table.columns]
    counts = grouped.agg(Splits=("split", "nunique"), Seeds=("seed", "nunique"), Runs=("seed", "size"))
    table = counts.join(stats_table).reset_index().rename(columns=_DISPLAY_NAMES)
    return _sort_rows(table)


def write_openset_tables(df: pd.DataFrame, out_dir: str | Path, score: str | Mapping[str, str] = HEADLINE) -> list[Path]:
    """One table per open-set setting, ``openset_<setting>.csv|md|html|tex``; [] without open-set rows."""
    if df.empty:
        return []
    table = openset_table(df, score)
    written = []
    for setting, part in table.groupby(DATASET, sort=False):
        written.append(write_tables(part.reset_index(drop=True), out_dir, f"openset_{_safe_name(setting)}")["md"])
    return written


def _sort_rows(table: pd.DataFrame, config: TableConfig | None = None) -> pd.DataFrame:
    keys = [c for c in (DATASET, MODEL, OOD_SET) if c in table.columns]
    if table.empty:
        return table.reset_index(drop=True)
    return table.sort_values(keys, key=lambda c: _display_order(c, config), kind="stable").reset_index(drop=True)


@functools.cache
def _default_table_config() -> TableConfig:
    return load_table_config()


def _orders(config: TableConfig | None) -> dict[str, tuple[str, ...] | list[str]]:
    config = config or _default_table_config()
    return {DATASET: config.datasets, MODEL: config.method_order, OOD_SET: config.ood_sets}


def _display_order(column: pd.Series, config: TableConfig | None = None) -> pd.Series:
    categories = ordered(column, _orders(config).get(column.name, []))
    return pd.Series(pd.Categorical(column, categories=categories, ordered=True), index=column.index)


def _per_seed_values(rows: pd.DataFrame, by_ood: bool) -> pd.DataFrame:
    """One value per seed (in %); rows repeating a seed (and the OOD sets unless ``by_ood``) are averaged."""
    keys = ["id_dataset", "method"] + (["test_case"] if by_ood else []) + ["seed"]
    return (rows[keys + METRICS].groupby(keys, sort=False)[METRICS].mean() * 100.0).reset_index()


def _per_seed(df: pd.DataFrame, score: str | Mapping[str, str], by_ood: bool) -> pd.DataFrame:
    return _per_seed_values(_select_score(df, score), by_ood)


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
        group = dict(zip(group_keys, group if isinstance(group, tuple) else (group,)))
        base = of_group[of_group["method"] == baseline]
        if base.empty:
            continue
        others = [m for m in ordered(of_group["method"], _orders(config)[MODEL]) if m != baseline]
        for metric in metrics:
            for method in others:
                a = base[metric].dropna().to_numpy()
                b = of_group.loc[of_group["method"] == method, metric].dropna().to_numpy()
                records.append(
                    {
                        DATASET: group["id_dataset"],
                        **({OOD_SET: group["test_case"]} if by_ood else {}),
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
                )
    columns = [DATASET] + ([OOD_SET] if by_ood else []) + [
        "Metric", "Baseline", MODEL, "Baseline mean", "Model mean",
        "Difference", "t", "p", "Baseline seeds", "Model seeds"]
    welch = pd.DataFrame.from_records(records, columns=columns)
    if welch.empty:
        return welch
    # the table's order: dataset (OOD set), metric, model
    welch["_metric"] = welch["Metric"].map({m: i for i, m in enumerate(metrics)})
    keys = [DATASET] + ([OOD_SET] if by_ood else [])
    welch = welch.sort_values(keys + ["_metric"], key=lambda c: c if c.name == "_metric" else _display_order(c, config),
                              kind="stable")
    return welch.drop(columns="_metric").reset_index(drop=True)


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
    ood_sets = ordered(summary["test_case"], _orders(config)[OOD_SET])
    methods = ordered(summary["method"], _orders(config)[MODEL])

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


# ----------------------------------------------------------------------------- writing


def write_tables(
    table: pd.DataFrame,
    out_dir: str | Path,
    stem: str,
    formats: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``stem``.csv (full precision), .md, .html and .tex (2 decimals) to ``out_dir``.

    ``formats`` maps column names to format strings for the text formats
    (default: floats ``{:.2f}``, plus ``DEFAULT_FORMATS``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _format_cells(table, {**DEFAULT_FORMATS, **(formats or {})})
    numeric = [pd.api.types.is_numeric_dtype(table[c]) for c in table.columns]

    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "html", "tex")}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(text, numeric), encoding="utf-8")
    paths["html"].write_text(text.to_html(index=False, justify="center", border=0) + "\n", encoding="utf-8")
    column_format = "".join("r" if n else "l" for n in numeric)
    paths["tex"].write_text(text.to_latex(index=False, escape=True, column_format=column_format), encoding="utf-8")
    return paths


def _format_cells(table: pd.DataFrame, formats: Mapping[str, str]) -> pd.DataFrame:
    def format_value(column: str, value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "nan"
        if isinstance(value, (float, np.floating)):
            return formats.get(column, "{:.2f}").format(value)
        return str(value)

    return pd.DataFrame(
        {c: [format_value(c, v) for v in table[c].tolist()] for c in table.columns},
        index=range(len(table)),
        columns=table.columns,
    )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


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
        prog="python -m mchad.aggregate",
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
    parser.add_argument("--baseline", default=None,
                        help="model the t-tests and significance markers compare against (default: the table "
                        "config's, MCHAD)")
    parser.add_argument("--spread", choices=SPREADS, default="sem",
                        help="what ± shows: standard error of the mean over seeds (default) or standard deviation")
    parser.add_argument("--alpha", type=_fraction, default=0.05,
                        help="significance threshold of Welch's t-test for the † markers (default: 0.05)")
    parser.add_argument("--per-ood-metric", type=_metric_name, nargs="+", default=["AUROC"], metavar="METRIC",
                        help=f"metric(s) of the per-OOD-set tables, one table each ({', '.join(METRICS)}; "
                        "default: AUROC)")
    parser.add_argument("--decimals", type=int, choices=range(0, 5), default=2, metavar="{0..4}",
                        help="decimals printed in the paper tables (default: 2)")
    parser.add_argument("--table-config", type=Path, default=None,
                        help="YAML with method order, display names and scores (default: mchad/tables.yaml)")
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
    return parser.parse_args(argv)


def published_aupr_names(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with AUPR-IN and AUPR-OUT swapped: pytorch-ood 0.0.7 (the published tables)
    called the PR curve with OOD as positive class AUPR-IN, today's AUPR-OUT."""
    return results.rename(columns={"AUPR-IN": "AUPR-OUT", "AUPR-OUT": "AUPR-IN"})


def find_results_from_scores(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[MissingRun]]:
    """Like :func:`find_results`, with the metrics recomputed from every ``scores.npz`` below ``paths``."""
    from mchad.scores import SCORES_FILE, find_score_files, results_from_scores

    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.is_dir():
            raise NoResultsError(f"no such folder: {root}")
    files = find_score_files(roots)
    if not files:
        raise NoResultsError(f"no {SCORES_FILE} found below {', '.join(map(str, roots))}")
    results = results_from_scores(files)
    # what the scores do not hold (provenance, open-set split, evaluated_from) comes from the
    # run's results.csv, written with them
    context = [*PROVENANCE_COLUMNS, "split", "evaluated_from"]
    written = [_read_results(file.parent / RESULTS_FILE) for file in files if (file.parent / RESULTS_FILE).exists()]
    if written:
        on = ["run_dir", "test_case", "score"]
        results = results.merge(pd.concat(written)[on + context], on=on, how="left")
    for column, default in {**dict.fromkeys(PROVENANCE_COLUMNS, UNKNOWN), "split": np.nan, "evaluated_from": ""}.items():
        results[column] = results[column].fillna(default) if column in results.columns else default
    return _count_models_once(results), _find_missing(roots, files)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on unusable results)."""
    args = _parse_args(argv)
    out_dir = args.out if args.out is not None else args.folders[0] / "aggregate"
    try:
        config = load_table_config(args.table_config)
        score = args.score if args.score is not None else config.scores()
        baseline = args.baseline if args.baseline is not None else config.baseline
        options = TableOptions(spread=args.spread, alpha=args.alpha, decimals=args.decimals)

        results, missing = (find_results_from_scores if args.from_scores else find_results)(args.folders)
        provenance_notes = check_provenance(results, args.allow_mixed)
        openset, results = split_openset(results)
        openset_files = write_openset_tables(openset, out_dir, score)
        if results.empty:  # open-set runs only
            return _report_openset(openset, openset_files, missing, out_dir, score)
        if args.published_aupr_names:
            results = published_aupr_names(results)
        table = summary_table(results, score, config=config)
        per_ood = summary_table(results, score, by_ood=True, config=config)
        welch = welch_tests(results, baseline, score, config=config)
        welch_per_ood = welch_tests(results, baseline, score, by_ood=True, config=config)
        config = dataclasses.replace(config, baseline=baseline)
        paper = paper_table(table, welch, METRICS, config, options)
        per_ood_papers = {m: per_ood_paper_table(per_ood, welch_per_ood, m, config, options)
                          for m in args.per_ood_metric}
        if args.published_aupr_names:
            for written in (paper, *per_ood_papers.values()):
                written.caption.append("AUPR names as published (AUPR-IN: OOD positive)")

        out_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_dir / "table.csv", index=False)
        per_ood.to_csv(out_dir / "table_per_ood.csv", index=False)
        write_paper_table(paper, out_dir, "table")
        for metric, per_ood_paper in per_ood_papers.items():
            write_paper_table(per_ood_paper, out_dir, f"table_per_ood_{_safe_name(metric)}")
        write_tables(welch, out_dir, "welch")
        write_tables(welch_per_ood, out_dir, "welch_per_ood")
        plots = []
        for dataset in table[DATASET].unique():
            plot_path = out_dir / f"auroc_{_safe_name(dataset)}.png"
            plot_auroc_bars(results, dataset, plot_path, score, config)
            plots.append(plot_path)
    except (AggregateError, TableConfigError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2

    header = f"# {len(missing)} missing/failed trial(s): run folders without {RESULTS_FILE}\n"
    (out_dir / "missing.txt").write_text(header + "".join(f"{m}\n" for m in missing), encoding="utf-8")

    n_runs = results["run_dir"].nunique()
    print(render_markdown(paper))
    print(f"runs found: {n_runs} ({len(results)} rows); missing/failed trials: {len(missing)}")
    for run in missing:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")
    _print_notes(results, score, baseline, welch)
    for note in provenance_notes:
        print(note)
    per_ood_names = ", ".join(f"table_per_ood_{_safe_name(m)}.md|tex" for m in per_ood_papers)
    print(f"written to {out_dir}: table.md|tex|csv, {per_ood_names}, table_per_ood.csv, welch.*, "
          "welch_per_ood.*, missing.txt, " + ", ".join(p.name for p in plots))
    if openset_files:
        _report_openset(openset, openset_files, None, out_dir, score)
    return 0


def _report_openset(openset: pd.DataFrame, files: list[Path], missing: list[MissingRun] | None, out_dir: Path,
                    score: str | Mapping[str, str]) -> int:
    """Print the open-set tables; with ``missing`` (open-set runs only) also write missing.txt."""
    if missing is not None:
        header = f"# {len(missing)} missing/failed trial(s): run folders without {RESULTS_FILE}\n"
        (out_dir / "missing.txt").write_text(header + "".join(f"{m}\n" for m in missing), encoding="utf-8")
    table = openset_table(openset, score)
    metrics = [m for m in OPENSET_METRICS if f"{m} mean" in table.columns]
    view = table[[DATASET, MODEL, "Splits", "Seeds"]].astype(str)
    for metric in metrics:
        view[metric] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"])]
    score_name = score if isinstance(score, str) else "configured per method"
    print(f"\nOpen-set recognition (score: {score_name}; mean ± std over splits and seeds, in %)\n")
    print(to_markdown(view, [False, False, True, True] + [True] * len(metrics)))
    for run in missing or []:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")
    print(f"written to {out_dir}: " + ", ".join(p.with_suffix(".*").name for p in files))
    return 0


def _print_notes(results: pd.DataFrame, score: str | Mapping[str, str], baseline: str, welch: pd.DataFrame) -> None:
    selected = results.index.isin(_select_score(results, score).index)
    score_name = "configured" if isinstance(score, Mapping) else f"'{score}'"
    without_score = sorted(set(results["method"]) - set(results.loc[selected, "method"]))
    if without_score:
        print(f"note: no rows with the {score_name} score for {', '.join(without_score)} (not in the table; "
              "see --score, --table-config)")
    duplicated = results.duplicated(subset=KEY_COLUMNS, keep=False)
    if duplicated.any():
        print(f"note: {int(duplicated.sum())} rows share experiment/dataset/method/test case/score/seed "
              "with another run (averaged into one value for that seed)")
    if welch.empty:
        scored = results.loc[selected, "method"]
        if (scored == baseline).any():
            print(f"note: no t-tests: no model besides the baseline '{baseline}' has {score_name} rows")
        else:
            print(f"note: no t-tests: baseline '{baseline}' has no {score_name} rows")


if __name__ == "__main__":
    sys.exit(main())
