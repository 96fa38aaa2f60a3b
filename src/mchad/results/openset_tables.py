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
    LATEX,
    MARKDOWN,
    MODEL,
    Cell,
    safe_name,
    sort_rows,
    to_markdown,
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


def openset_cells(table: pd.DataFrame, markup=MARKDOWN) -> pd.DataFrame:
    """``table`` as text, one ``mean ± std`` cell per metric in the OOD tables' markup
    (tables.MARKDOWN or tables.LATEX): a single run's spread is theirs too, "–", not "nan"."""
    metrics = [m for m in OPENSET_METRICS if f"{m} mean" in table.columns]
    view = pd.DataFrame(
        {c: [markup.escape(str(v)) for v in table[c]] for c in (DATASET, MODEL, "Splits", "Seeds", "Runs")}
    )
    for metric in metrics:
        means, stds = table[f"{metric} mean"], table[f"{metric} std"]
        view[metric] = [markup.cell(Cell(m, s), 2) for m, s in zip(means, stds, strict=True)]
    return view.rename(columns=markup.escape)


def write_openset_tables(
    df: pd.DataFrame, out_dir: str | Path, score: str | Mapping[str, str] = HEADLINE
) -> list[Path]:
    """One table per open-set setting, ``openset_<id_dataset>.csv|md|html|tex`` (the id_dataset as
    ``tables.safe_name`` writes it: ``openset_CIFAR10_6_4``); [] without open-set rows."""
    if df.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for setting, part in openset_table(df, score).groupby(DATASET, sort=False):
        # not Path.with_suffix: safe_name keeps dots ("openset_X_1.5")
        paths = {ext: out_dir / f"openset_{safe_name(setting)}.{ext}" for ext in ("csv", "md", "html", "tex")}
        part.reset_index(drop=True).to_csv(paths["csv"], index=False)  # full precision
        text, latex = openset_cells(part), openset_cells(part, LATEX)
        right = [False, False] + [True] * (len(text.columns) - 2)
        paths["md"].write_text(to_markdown(text, right), encoding="utf-8")
        paths["html"].write_text(text.to_html(index=False, justify="center", border=0) + "\n", encoding="utf-8")
        column_format = "".join("r" if r else "l" for r in right)
        paths["tex"].write_text(
            latex.to_latex(index=False, escape=False, column_format=column_format), encoding="utf-8"
        )
        written.append(paths["md"])
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
    view = openset_cells(openset_table(openset, score))
    score_name = score if isinstance(score, str) else "configured per method"
    print(f"\nOpen-set recognition (score: {score_name}; mean ± std over splits and seeds, in %)\n")
    print(to_markdown(view, [False, False] + [True] * (len(view.columns) - 2)))
    for run in missing or []:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")
    print(f"written to {out_dir}: " + ", ".join(p.with_suffix(".*").name for p in files))
    return 0
