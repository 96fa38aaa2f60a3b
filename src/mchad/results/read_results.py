"""Reading the runs' results: every ``results.csv`` below some folders (or the metrics recomputed
from their ``scores.npz``), checked, each trained model counted once; and the run folders
that have none (missing or failed trials, with the cause from their FAILED.txt)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mchad.errors import one_line
from mchad.failures import FAILED_FILE, RESULTS_FILE, failure_cause

HEADLINE = "headline"
KEY_COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed"]
METRICS = ["Accuracy", "AUROC", "AUPR-IN", "AUPR-OUT", "FPR95", "OSCR"]
# results.csv files written before OSCR existed lack it (NaN in the tables)
OPTIONAL_METRICS = ["OSCR"]
REQUIRED_COLUMNS = KEY_COLUMNS + [m for m in METRICS if m not in OPTIONAL_METRICS]
# open-set recognition (mchad.data.osr): the test case of the unknown classes and the reported metrics
# written by mchad.runs.provenance; "unknown" for results.csv files from before it
PROVENANCE_COLUMNS = ["code_version", "data_fingerprint", "config_hash"]
UNKNOWN = "unknown"


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
        warnings.warn(
            f"{int(unknown_seed.sum())} eval-only row(s) without a seed are left out "
            "(their checkpoint is not in a run folder with a config.yaml)",
            stacklevel=2,
        )
    results = results[~unknown_seed]
    evaluated = results["evaluated_from"] != ""
    checkpoint = results["evaluated_from"].where(
        evaluated, results["run_dir"].map(lambda d: str(Path(d, "checkpoints", "last.ckpt")))
    )
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
        raise ResultsFormatError(f"{path}: unreadable CSV ({one_line(str(exc))})") from exc

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

    # open-set runs (mchad.data.osr) say which known/unknown split they trained on; results.csv files
    # written before OSCR existed lack it
    split = pd.to_numeric(frame["split"], errors="coerce") if "split" in frame.columns else np.nan
    oscr = pd.to_numeric(frame["OSCR"], errors="coerce") if "OSCR" in frame.columns else np.nan
    frame_group = frame["group"].where(frame["group"].notna(), None) if "group" in frame.columns else None
    provenance = {
        c: frame[c].fillna(UNKNOWN).astype(str) if c in frame.columns else UNKNOWN for c in PROVENANCE_COLUMNS
    }
    frame = frame[[*REQUIRED_COLUMNS, "evaluated_from"]].assign(**provenance)
    frame["split"], frame["OSCR"] = split, oscr
    # OpenOOD runs (testmodules=openood) say each test case's group: near, far (else empty)
    frame["group"] = frame_group
    frame["run_dir"] = str(path.parent)
    # a run lists its headline score first (distance; msp for Softmax)
    frame["headline"] = frame["score"] == frame["score"].iloc[0] if len(frame) else []
    return frame


def _find_missing(roots: list[Path], result_files: list[Path]) -> list[MissingRun]:
    # A Hydra run folder is recognised by its .hydra/ folder, a run stopped by an input error by its FAILED.txt alone
    run_dirs = sorted({d.parent for root in roots for name in (".hydra", FAILED_FILE) for d in root.rglob(name)})
    finished = [f.parent for f in result_files]
    missing = []
    for run_dir in run_dirs:
        if any(run_dir == done or run_dir in done.parents for done in finished):
            continue
        missing.append(
            MissingRun(
                run_dir, _read_overrides(run_dir / ".hydra" / "overrides.yaml"), failure_cause(run_dir, missing="")
            )
        )
    return missing


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


def select_score(df: pd.DataFrame, score: str | Mapping[str, str]) -> pd.DataFrame:
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


def published_aupr_names(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with AUPR-IN and AUPR-OUT swapped: pytorch-ood 0.0.7 (the published tables)
    called the PR curve with OOD as positive class AUPR-IN, today's AUPR-OUT."""
    return results.rename(columns={"AUPR-IN": "AUPR-OUT", "AUPR-OUT": "AUPR-IN"})


def find_results_from_scores(paths: Iterable[str | Path]) -> tuple[pd.DataFrame, list[MissingRun]]:
    """Like :func:`find_results`, with the metrics recomputed from every ``scores.npz`` below ``paths``."""
    from mchad.results.scores import SCORES_FILE, find_score_files, results_from_scores

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
    context = [*PROVENANCE_COLUMNS, "split", "group", "evaluated_from"]
    written = [_read_results(file.parent / RESULTS_FILE) for file in files if (file.parent / RESULTS_FILE).exists()]
    if written:
        on = ["run_dir", "test_case", "score"]
        results = results.merge(pd.concat(written)[on + context], on=on, how="left")
    for column, default in {
        **dict.fromkeys(PROVENANCE_COLUMNS, UNKNOWN),
        "split": np.nan,
        "evaluated_from": "",
    }.items():
        results[column] = results[column].fillna(default) if column in results.columns else default
    return _count_models_once(results), _find_missing(roots, files)
