"""OpenOOD v1.5's leaderboard form for runs with ``testmodules=openood`` (rows with a ``group``):
per ID dataset, training method and post-hoc score, near-OOD and far-OOD AUROC, ID accuracy
and near/far FPR95, mean ± std (ddof=1) over training runs, in %, beside OpenOOD's published
rows (quoted, with their source).

As OpenOOD computes them: per run, a group's figure is the unweighted mean over the OOD sets of
that group (CIFAR-10: near = CIFAR-100, TinyImageNet; far = MNIST, SVHN, Textures, Places365);
then mean and std over the runs (a seed run twice is averaged into one run first).

Written by ``python -m mchad.results.aggregate`` as ``leaderboard.md`` (one table per ID dataset) and
``leaderboard.csv`` (one row per method and score, the leaderboard's columns plus their std).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mchad.results.tables import to_markdown

GROUPS = ("near", "far")
QUOTED_SOURCE = "quoted: OpenOOD v1.5 leaderboard, Jingkang50/OpenOOD, ResNet-18, 3 runs"
MEASURED = "measured"
#: OpenOOD v1.5's published figures (the leaderboard CSVs of Jingkang50/OpenOOD, ResNet-18,
#: 3 training runs, in %): ID dataset, training, postprocessor, near AUROC, far AUROC, ID accuracy
PUBLISHED = [
    ("CIFAR10", "Cross-entropy", "MSP", 88.03, 90.73, 95.06),
    ("CIFAR10", "Cross-entropy", "KNN (best post-hoc)", 90.64, 92.96, 95.06),
    ("CIFAR10", "OE", "", 94.82, 96.00, 94.63),
    ("CIFAR10", "CIDER", "KNN", 90.71, 94.71, math.nan),
    ("CIFAR100", "Cross-entropy", "MSP", 80.27, 77.76, 77.25),
    ("CIFAR100", "Cross-entropy", "MLS (best post-hoc)", 81.05, 79.67, 77.25),
    ("CIFAR100", "OE", "", 88.30, 81.41, 76.84),
    ("CIFAR100", "CIDER", "KNN", 73.10, 80.49, math.nan),
]
#: the leaderboard's value columns and where they come from: (metric, group or None)
VALUES = {
    "Near-OOD AUROC": ("AUROC", "near"),
    "Far-OOD AUROC": ("AUROC", "far"),
    "ID Accuracy": ("Accuracy", None),
    "Near-OOD FPR95": ("FPR95", "near"),
    "Far-OOD FPR95": ("FPR95", "far"),
}
KEYS = ["ID dataset", "Training", "Postprocessor"]


def split_openood(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(OpenOOD rows, the other rows)``: OpenOOD runs write a ``group`` (near, far) per row;
    their ungrouped rows (e.g. noise added with testmodules=[openood,noise]) go with them."""
    if "group" not in results.columns:
        return results.iloc[:0], results
    grouped = results["group"].isin(GROUPS)
    runs = results.loc[grouped, "run_dir"].unique() if "run_dir" in results.columns else []
    openood = results["run_dir"].isin(runs) if "run_dir" in results.columns else grouped
    return results[openood], results[~openood]


def _per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (ID dataset, method, score, seed) with every leaderboard value in %."""
    keys = ["id_dataset", "method", "score", "seed"]
    columns = {}
    for name, (metric, group) in VALUES.items():
        part = rows if group is None else rows[rows["group"] == group]
        # the group's unweighted mean over its sets (a seed run twice: its rows averaged first)
        per_set = part.groupby([*keys, "test_case"], sort=False)[metric].mean()
        columns[name] = per_set.groupby(level=keys, sort=False).mean() * 100.0
    return pd.DataFrame(columns).reset_index()


def leaderboard(rows: pd.DataFrame) -> pd.DataFrame:
    """Our rows (mean, std, runs) and the published ones of the same ID datasets."""
    per_run = _per_run(rows[rows["group"].isin(GROUPS)])
    grouped = per_run.groupby(["id_dataset", "method", "score"], sort=False)
    means = grouped[list(VALUES)].mean()
    stds = grouped[list(VALUES)].std(ddof=1).add_suffix(" std")
    ours = means.join(stds).join(grouped.size().rename("Runs")).reset_index()
    ours = ours.rename(columns={"id_dataset": "ID dataset", "method": "Training", "score": "Postprocessor"})
    ours["Source"] = MEASURED
    datasets = list(dict.fromkeys(ours["ID dataset"]))
    quoted = pd.DataFrame(
        [
            {
                "ID dataset": d,
                "Training": t,
                "Postprocessor": p,
                "Near-OOD AUROC": near,
                "Far-OOD AUROC": far,
                "ID Accuracy": acc,
                "Runs": 3,
                "Source": QUOTED_SOURCE,
            }
            for d, t, p, near, far, acc in PUBLISHED
            if d in datasets
        ]
    )
    table = pd.concat([ours, quoted], ignore_index=True)
    order = {d: i for i, d in enumerate(datasets)}
    table = table.sort_values(
        ["ID dataset", "Source"], key=lambda c: c.map(order) if c.name == "ID dataset" else c != MEASURED, kind="stable"
    ).reset_index(drop=True)
    columns = [*KEYS, *(c for name in VALUES for c in (name, f"{name} std")), "Runs", "Source"]
    return table.reindex(columns=columns)


def _cell(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def render(table: pd.DataFrame) -> str:
    """The Markdown tables, one per ID dataset."""
    parts = []
    for dataset, part in table.groupby("ID dataset", sort=False):
        view = part[["Training", "Postprocessor"]].astype(str).replace("", "–")
        for name in VALUES:
            view[name] = [_cell(m, s) for m, s in zip(part[name], part[f"{name} std"], strict=True)]
        view["Runs"] = part["Runs"].astype(int).astype(str)
        view["Source"] = part["Source"]
        parts.append(
            f"### {dataset}\n\n" + to_markdown(view.reset_index(drop=True), [False, False, *[True] * 6, False])
        )
    caption = (
        "OpenOOD v1.5 (testmodules=openood): mean ± std (ddof=1) over training runs, in %; near/far = "
        "unweighted mean over the OOD sets of the group; FPR95 at 95 % TPR of the ID data, OOD positive. "
        f"Rows marked '{QUOTED_SOURCE}' are OpenOOD's published figures, not measured here."
    )
    return caption + "\n\n" + "\n\n".join(parts) + "\n"


def write_leaderboard(rows: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``leaderboard.md`` and ``leaderboard.csv`` in ``out_dir``; [] without OpenOOD rows."""
    if rows.empty:
        return []
    table = leaderboard(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text(render(table), encoding="utf-8")
    return [out / "leaderboard.md", out / "leaderboard.csv"]


def report_leaderboard(rows: pd.DataFrame, files: list[Path]) -> None:
    """Print the leaderboard tables and where they were written."""
    print("\n" + render(leaderboard(rows)))
    print(f"written to {files[0].parent}: " + ", ".join(p.name for p in files))
