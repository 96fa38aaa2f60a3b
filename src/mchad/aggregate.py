"""Aggregate the ``results.csv`` of many runs into the paper's tables, plots and tests.

Usage::

    python -m mchad.aggregate logs/multiruns/2026-11-28_12-00-00 [more folders...]
        [--out DIR] [--score headline|distance|msp|cac] [--baseline MCHAD]

Every ``results.csv`` below the given folders is read (one row per test case and OOD
score, metrics as fractions). A Hydra run folder (one holding ``.hydra/``) without a
``results.csv`` counts as a missing or failed trial; a failed run's cause (first line of its
``FAILED.txt``, written by mchad.train for single runs and mchad.sweep for trials) is listed
with it. Each trained model counts once: the rows of an eval-only run (``evaluated_from``,
with the seed of the run it tested) are dropped where the training run's own rows already
hold that test case and score.

How the numbers are aggregated (the paper's protocol):

* ``table.*``: one row per ID dataset and model. Mean, ``std`` and ``sem`` are taken over
  *all (seed, OOD set) rows* of that model, in %. ``std`` is the sample standard deviation
  (ddof=1) of those rows, so it mixes the spread across seeds with the spread across OOD
  sets, as the published "±" does. ``sem`` is that ``std / sqrt(number of rows)``; the rows
  of one seed are not independent, so ``sem`` understates the uncertainty of the mean and
  is no test of significance; use ``welch.*`` for that.
* ``table_per_ood.*``: the same per OOD set, i.e. over seeds only.
* ``welch.*``: Welch's t-test of the baseline (MCHAD) against every other model per ID
  dataset, on the per-seed AUROC and accuracy averaged over the OOD sets (one value per
  seed, so the samples are independent).
* ``auroc_<dataset>.png``: AUROC per OOD set and model, error bars = std over seeds.
"""

from __future__ import annotations

import argparse
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

RESULTS_FILE = "results.csv"
FAILED_FILE = "FAILED.txt"
HEADLINE = "headline"
KEY_COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed"]
METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95"]
REQUIRED_COLUMNS = KEY_COLUMNS + METRICS
STATISTICS = ["mean", "std", "sem"]

# Display order of the paper; names not listed follow alphabetically.
DATASET_ORDER = ["CIFAR10", "CIFAR100", "SVHN"]
METHOD_ORDER = ["MCHAD", "G-MCHAD", "CAC", "Center", "G-CAC", "G-Center", "II", "Softmax"]
OOD_ORDER = [
    "Textures",
    "TinyImageNetCrop",
    "TinyImageNetResize",
    "LSUNCrop",
    "LSUNResize",
    "GaussianNoise",
    "UniformNoise",
]
WELCH_METRICS = ["AUROC", "Accuracy"]

# Column names of the written tables.
DATASET, MODEL, OOD_SET = "Dataset", "Model", "OOD set"
_DISPLAY_NAMES = {"id_dataset": DATASET, "method": MODEL, "test_case": OOD_SET}
_ORDERS = {DATASET: DATASET_ORDER, MODEL: METHOD_ORDER, OOD_SET: OOD_ORDER}

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

    frame = frame[[*REQUIRED_COLUMNS, "evaluated_from"]].copy()
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


# ----------------------------------------------------------------------------- tables


def _select_score(df: pd.DataFrame, score: str) -> pd.DataFrame:
    """Rows of one score, or with ``score="headline"`` each run's headline score (the paper's
    table: distance for the centre-based models, msp for the Softmax reference)."""
    rows = df[df["headline"]] if score == HEADLINE else df[df["score"] == score]
    if rows.empty:
        present = ", ".join(sorted(df["score"].astype(str).unique()))
        raise NoResultsError(f"no rows with score '{score}' (scores present: {present})")
    return rows


def summary_table(df: pd.DataFrame, score: str = "distance", by_ood: bool = False) -> pd.DataFrame:
    """Mean, std and sem (in %) per ID dataset and model (and OOD set if ``by_ood``).

    Statistics run over all (seed, OOD set) rows of a group; per OOD set over seeds.
    """
    rows = _select_score(df, score)
    keys = ["id_dataset", "method"] + (["test_case"] if by_ood else [])
    percent = rows[["id_dataset", "method", "test_case", "seed"]].assign(**{m: rows[m] * 100.0 for m in METRICS})
    grouped = percent.groupby(keys, sort=False)

    stats_table = grouped[METRICS].agg(STATISTICS)
    stats_table.columns = [f"{metric} {stat}" for metric, stat in stats_table.columns]
    counts = grouped.agg(**{"OOD sets": ("test_case", "nunique"), "Seeds": ("seed", "nunique"), "Rows": ("seed", "size")})
    if by_ood:
        counts = counts.drop(columns="OOD sets")

    table = counts.join(stats_table).reset_index().rename(columns=_DISPLAY_NAMES)
    return _sort_rows(table)


def _sort_rows(table: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in (DATASET, MODEL, OOD_SET) if c in table.columns]
    if table.empty:
        return table.reset_index(drop=True)
    return table.sort_values(keys, key=_display_order, kind="stable").reset_index(drop=True)


def _display_order(column: pd.Series) -> pd.Series:
    preferred = _ORDERS.get(column.name, [])
    present = set(column)
    categories = [v for v in preferred if v in present] + sorted(present - set(preferred))
    return pd.Series(pd.Categorical(column, categories=categories, ordered=True), index=column.index)


def _per_seed(df: pd.DataFrame, score: str, by_ood: bool) -> pd.DataFrame:
    """One value per seed (in %); duplicated rows of a seed are averaged first."""
    rows = _select_score(df, score)
    keys = ["id_dataset", "method"] + (["test_case"] if by_ood else []) + ["seed"]
    return (rows[keys + METRICS].groupby(keys, sort=False)[METRICS].mean() * 100.0).reset_index()


def welch_tests(df: pd.DataFrame, baseline: str = "MCHAD", score: str = "distance") -> pd.DataFrame:
    """Welch's t-test of ``baseline`` against every other model per ID dataset.

    Samples: per-seed AUROC and accuracy (in %), each averaged over the OOD sets.
    ``t > 0`` means the baseline's mean is higher. p is NaN with fewer than two seeds.
    """
    per_seed = _per_seed(df, score, by_ood=False)
    records = []
    datasets = _display_order(pd.Series(per_seed["id_dataset"].unique(), name=DATASET)).sort_values()
    for dataset in datasets:
        of_dataset = per_seed[per_seed["id_dataset"] == dataset]
        base = of_dataset[of_dataset["method"] == baseline]
        if base.empty:
            continue
        others = _display_order(pd.Series(of_dataset["method"].unique(), name=MODEL)).sort_values()
        for metric in WELCH_METRICS:
            for method in others:
                if method == baseline:
                    continue
                a = base[metric].dropna().to_numpy()
                b = of_dataset.loc[of_dataset["method"] == method, metric].dropna().to_numpy()
                records.append(
                    {
                        DATASET: dataset,
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
    columns = [DATASET, "Metric", "Baseline", MODEL, "Baseline mean", "Model mean",
               "Difference", "t", "p", "Baseline seeds", "Model seeds"]
    return pd.DataFrame.from_records(records, columns=columns)


def _welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    if a.size < 2 or b.size < 2:
        return {"t": math.nan, "p": math.nan}
    # Identical constant samples give 0/0; scipy warns and returns NaN, which is the answer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(result.statistic), "p": float(result.pvalue)}


# ----------------------------------------------------------------------------- plots


def plot_auroc_bars(df: pd.DataFrame, dataset: str, path: str | Path, score: str = "distance") -> Figure:
    """Grouped bars of AUROC (%) per OOD set and model for one ID dataset; saves a PNG.

    Bar = mean over seeds, error bar = std over seeds (0 with a single seed).
    """
    per_seed = _per_seed(df, score, by_ood=True)
    per_seed = per_seed[per_seed["id_dataset"] == dataset]
    if per_seed.empty:
        raise NoResultsError(f"no rows for ID dataset '{dataset}' with score '{score}'")

    summary = per_seed.groupby(["test_case", "method"])["AUROC"].agg(["mean", "std"]).reset_index()
    summary["std"] = summary["std"].fillna(0.0)
    ood_sets = list(_display_order(pd.Series(summary["test_case"].unique(), name=OOD_SET)).sort_values())
    methods = list(_display_order(pd.Series(summary["method"].unique(), name=MODEL)).sort_values())

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
    ax.set_title(f"{dataset}: AUROC per OOD set ({score} score)")
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


def to_markdown(table: pd.DataFrame, right_align: list[bool] | None = None) -> str:
    """Render a (string) DataFrame as a GitHub-flavoured Markdown table."""
    headers = [str(c) for c in table.columns]
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    right_align = right_align or [False] * len(headers)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right_align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right_align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells]) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mchad.aggregate",
        description="Aggregate results.csv files of runs into the paper's tables, plots and t-tests.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run or sweep folders, searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: FIRST_FOLDER/aggregate)")
    parser.add_argument(
        "--score",
        default=HEADLINE,
        help="OOD score to report: 'headline' (default: each run's first score, i.e. distance, and msp for "
        "Softmax), or a score name such as distance, msp, cac",
    )
    parser.add_argument("--baseline", default="MCHAD", help="model the t-tests compare against (default: MCHAD)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on unusable results)."""
    args = _parse_args(argv)
    out_dir = args.out if args.out is not None else args.folders[0] / "aggregate"
    try:
        results, missing = find_results(args.folders)
        table = summary_table(results, args.score)
        per_ood = summary_table(results, args.score, by_ood=True)
        welch = welch_tests(results, args.baseline, args.score)

        write_tables(table, out_dir, "table")
        write_tables(per_ood, out_dir, "table_per_ood")
        write_tables(welch, out_dir, "welch")
        plots = []
        for dataset in table[DATASET].unique():
            plot_path = out_dir / f"auroc_{_safe_name(dataset)}.png"
            plot_auroc_bars(results, dataset, plot_path, args.score)
            plots.append(plot_path)
    except AggregateError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2

    header = f"# {len(missing)} missing/failed trial(s): run folders without {RESULTS_FILE}\n"
    (out_dir / "missing.txt").write_text(header + "".join(f"{m}\n" for m in missing), encoding="utf-8")

    n_runs = results["run_dir"].nunique()
    print(f"Score: {args.score}; mean ± std over all (seed, OOD set) rows, in %\n")
    print(to_markdown(_paper_view(table), [False, False] + [True] * len(METRICS)))
    print(f"runs found: {n_runs} ({len(results)} rows); missing/failed trials: {len(missing)}")
    for run in missing:
        print(f"  {'failed' if run.cause else 'missing'}: {run}")
    _print_notes(results, args.score, args.baseline, welch)
    print(f"written to {out_dir}: table.*, table_per_ood.*, welch.*, missing.txt, "
          + ", ".join(p.name for p in plots))
    return 0


def _paper_view(table: pd.DataFrame) -> pd.DataFrame:
    """Compact 'mean ± std' view of the summary table, like the paper's."""
    view = table[[DATASET, MODEL]].copy()
    for metric in METRICS:
        view[metric] = [
            f"{m:.2f} ± {s:.2f}" for m, s in zip(table[f"{metric} mean"], table[f"{metric} std"])
        ]
    return view


def _print_notes(results: pd.DataFrame, score: str, baseline: str, welch: pd.DataFrame) -> None:
    selected = results["headline"] if score == HEADLINE else results["score"] == score
    without_score = sorted(set(results["method"]) - set(results.loc[selected, "method"]))
    if without_score:
        print(f"note: no '{score}' rows for {', '.join(without_score)} (not in the table; see --score)")
    duplicated = results.duplicated(subset=KEY_COLUMNS, keep=False)
    if duplicated.any():
        print(f"note: {int(duplicated.sum())} rows share experiment/dataset/method/test case/score/seed "
              "with another run (each counts as a row in table.*; averaged per seed elsewhere)")
    if welch.empty:
        scored = results.loc[selected, "method"]
        if (scored == baseline).any():
            print(f"note: no t-tests: no model besides the baseline '{baseline}' has '{score}' rows")
        else:
            print(f"note: no t-tests: baseline '{baseline}' has no '{score}' rows")


if __name__ == "__main__":
    sys.exit(main())
