"""Open-set recognition tables (runs of :mod:`mchad.data.osr`, rows with a ``split``): per setting and
model, mean and std over all splits and seeds of the ``Unknown`` test case."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mchad.results.read_results import HEADLINE, RESULTS_FILE, MissingRun, select_score
from mchad.results.tables import (
    DATASET,
    DISPLAY_NAMES,
    MARKDOWN,
    MODEL,
    safe_name,
    sort_rows,
    to_markdown,
    write_tables,
)

# the test case of the unknown classes and the reported metrics
UNKNOWN_CASE = "Unknown"
OPENSET_METRICS = ["Accuracy", "AUROC", "OSCR"]


def split_openset(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(open-set rows, the other rows)``: open-set runs have a ``split``."""
    openset = results["split"].notna()
    return results[openset], results[~openset]


def openset_table(df: pd.DataFrame, score: str | Mapping[str, str] = HEADLINE) -> pd.DataFrame:
    """Open-set recognition: mean and std (in %) per setting and model over all runs (every
    split and seed) of their ``Unknown`` test case; each run gives one row."""
    rows = select_score(df[df["test_case"] == UNKNOWN_CASE], score)
    metrics = [m for m in OPENSET_METRICS if m in rows.columns]
    percent = rows[["id_dataset", "method", "split", "seed"]].assign(**{m: rows[m] * 100.0 for m in metrics})
    grouped = percent.groupby(["id_dataset", "method"], sort=False)
    stats_table = grouped[metrics].agg(["mean", "std"])
    stats_table.columns = [f"{metric} {stat}" for metric, stat in stats_table.columns]
    counts = grouped.agg(Splits=("split", "nunique"), Seeds=("seed", "nunique"), Runs=("seed", "size"))
    table = counts.join(stats_table).reset_index().rename(columns=DISPLAY_NAMES)
    return sort_rows(table)


def write_openset_tables(
    df: pd.DataFrame, out_dir: str | Path, score: str | Mapping[str, str] = HEADLINE
) -> list[Path]:
    """One table per open-set setting, ``openset_<setting>.csv|md|html|tex``; [] without open-set rows."""
    if df.empty:
        return []
    table = openset_table(df, score)
    written = []
    for setting, part in table.groupby(DATASET, sort=False):
        written.append(write_tables(part.reset_index(drop=True), out_dir, f"openset_{safe_name(setting)}")["md"])
    return written


def report_openset(
    openset: pd.DataFrame,
    files: list[Path],
    missing: list[MissingRun] | None,
    out_dir: Path,
    score: str | Mapping[str, str],
) -> int:
    """Print the open-set tables; with ``missing`` (open-set runs only) also write missing.txt."""
    if missing is not None:
        header = f"# {len(missing)} missing/failed trial(s): run folders without {RESULTS_FILE}\n"
        (out_dir / "missing.txt").write_text(header + "".join(f"{m}\n" for m in missing), encoding="utf-8")
    table = openset_table(openset, score)
    metrics = [m for m in OPENSET_METRICS if f"{m} mean" in table.columns]
    view = table[[DATASET, MODEL, "Splits", "Seeds"]].astype(str)
    for metric in metrics:
        # one run has no spread: "–", as in the OOD tables (tables.MARKDOWN.nospread)
        view[metric] = [
            f"{m:.2f} ± {MARKDOWN.nospread if pd.isna(s) else f'{s:.2f}'}"
            for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"], strict=True)
        ]
    score_name = score if isinstance(score, str) else "configured per method"
    print(f"\nOpen-set recognition (score: {score_name}; mean ± std over splits and seeds, in %)\n")
    print(to_markdown(view, [False, False, True, True] + [True] * len(metrics)))
    for run in missing or []:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")
    print(f"written to {out_dir}: " + ", ".join(p.with_suffix(".*").name for p in files))
    return 0
