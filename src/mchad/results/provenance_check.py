"""Trials are only averaged when they ran on the same code and data: the provenance columns
(written by :mod:`mchad.runs.provenance`) of every table cell compared."""

from __future__ import annotations

import pandas as pd

from mchad.results.read_results import UNKNOWN, AggregateError


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
        line = (
            f"trials with different {what} ({column}) in one table cell, {' / '.join(map(str, key))}: "
            f"{versions}{others}"
        )
        if not allow_mixed:
            raise MixedProvenanceError(f"{line}; re-run them alike, or pass --allow-mixed to aggregate them anyway")
        notes.append(f"note: --allow-mixed: {line}")
    configs = [
        key for key, rows in df.groupby(["id_dataset", "method"], sort=True) if rows["config_hash"].nunique() > 1
    ]
    if configs:
        notes.append(
            f"note: {len(configs)} table cell(s) mix configurations (config_hash), e.g. "
            f"{' / '.join(configs[0])}; intended for a hyperparameter sweep, else compare the runs' config.yaml"
        )
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
