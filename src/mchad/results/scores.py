"""Per-sample scores of a run (``scores.npz`` in the run folder) and metrics recomputed from them.

Every run keeps, next to ``results.csv``, the scores of every sample it tested: for the ID
test set and each OOD test case every score of results.csv (the method's and the detectors'),
plus the ID labels and predictions. Any metric can then be computed later without running
the model again::

    from mchad.results.scores import load_scores, recompute_metrics
    scores = load_scores("logs/runs/<date>/<time>_<id>")      # or .../scores.npz
    frame = scores.to_frame()                                  # one row per sample (pandas)
    rows = recompute_metrics(scores)                           # = the run's results.csv
    rows = recompute_metrics(scores, {"TNR@5": my_metric})     # plus any metric of your own

``python -m mchad.results.aggregate --from-scores <folders>`` builds the tables from these files.

Format: a NumPy ``.npz`` archive (numpy only, no extra dependency; written atomically). Keys:
``ID/labels``, ``ID/predictions``, ``<set>/<score>`` for ``ID`` and every test case (float32,
larger = more anomalous), ``<case>/labels`` (-1), and ``meta/<field>`` for ``experiment``,
``id_dataset``, ``method``, ``seed``, ``scores`` (names, the headline first) and ``test_cases``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mchad.results.metrics import METRIC_COLUMNS, case_metrics

SCORES_FILE = "scores.npz"
ID_SET = "ID"
META_FIELDS = ("experiment", "id_dataset", "method", "seed")
UNKNOWN_SEED = -1
KEY_COLUMNS = ["experiment", "id_dataset", "method", "test_case", "score", "seed"]

#: a metric of one test case: (ID scores, ID labels, ID predictions, OOD scores) -> float
Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]


@dataclass
class RunScores:
    """The per-sample scores of one run: ``sets[set][key]`` with set ``"ID"`` or a test case."""

    meta: dict
    score_names: list[str]
    test_cases: list[str]
    sets: dict[str, dict[str, np.ndarray]]

    def to_frame(self):
        """One row per tested sample: ``set``, ``label``, ``prediction`` (ID only, else -1) and a
        column per score."""
        import pandas as pd

        frames = []
        for name in [ID_SET, *self.test_cases]:
            data = self.sets[name]
            n = len(data["labels"])
            columns = {
                "set": np.full(n, name, dtype=object),
                "label": data["labels"],
                "prediction": data.get("predictions", np.full(n, -1, dtype=np.int64)),
            }
            columns.update({score: data[score] for score in self.score_names})
            frames.append(pd.DataFrame(columns))
        return pd.concat(frames, ignore_index=True)


def save_scores(
    outputs: dict[str, dict[str, torch.Tensor]], score_names: list[str], meta: dict, path: str | Path
) -> Path:
    """Write a run's per-sample scores atomically (temporary file, then rename).

    ``outputs`` is :attr:`mchad.models.module.OODModel.test_outputs`: ``{"ID": {score: ..., "labels": ...,
    "predictions": ...}, <case>: {score: ..., "labels": ...}}`` (tensors on any device).
    """
    path = Path(path)
    # an eval-only run of a checkpoint whose seed is unknown: -1 (seeds are >= 0)
    meta = {**meta, "seed": UNKNOWN_SEED if meta["seed"] is None else meta["seed"]}
    arrays = {f"meta/{field}": np.asarray(meta[field]) for field in META_FIELDS}
    arrays["meta/scores"] = np.asarray(list(score_names), dtype=str)
    arrays["meta/test_cases"] = np.asarray([name for name in outputs if name != ID_SET], dtype=str)
    for set_name, data in outputs.items():
        keys = ["labels", *(["predictions"] if set_name == ID_SET else []), *score_names]
        for key in keys:
            value = data[key].detach().cpu()
            arrays[f"{set_name}/{key}"] = value.float().numpy() if value.is_floating_point() else value.long().numpy()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as file:  # a file object: numpy would append .npz to a name
            np.savez_compressed(file, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_scores(path: str | Path) -> RunScores:
    """Read a run's ``scores.npz`` (the file, or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    with np.load(path, allow_pickle=False) as archive:
        data = {key: archive[key] for key in archive.files}
    meta = {field: data[f"meta/{field}"].item() for field in META_FIELDS}
    score_names = [str(s) for s in data["meta/scores"]]
    test_cases = [str(s) for s in data["meta/test_cases"]]
    sets: dict[str, dict[str, np.ndarray]] = {}
    for key, value in data.items():
        set_name, _, field = key.rpartition("/")
        if set_name != "meta":
            sets.setdefault(set_name, {})[field] = value
    return RunScores(meta, score_names, test_cases, sets)


def recompute_metrics(scores: RunScores | str | Path, extra: dict[str, Metric] | None = None) -> list[dict]:
    """The rows of the run's results.csv recomputed from its scores (same function as at test
    time), plus a column per ``extra`` metric: ``{name: f(id_scores, id_labels, id_predictions,
    ood_scores) -> float}`` on float64 tensors (scores) and int64 tensors (labels, predictions)."""
    if not isinstance(scores, RunScores):
        scores = load_scores(scores)
    ind = scores.sets[ID_SET]
    # cpu: read from the file into host memory; the metrics run wherever their inputs are
    labels, predictions = torch.from_numpy(ind["labels"]), torch.from_numpy(ind["predictions"])
    rows = []
    for case in scores.test_cases:
        for name in scores.score_names:
            id_scores = torch.from_numpy(ind[name])  # cpu: as labels
            ood_scores = torch.from_numpy(scores.sets[case][name])  # cpu: as labels
            row = {
                **{k: scores.meta[k] for k in ("experiment", "id_dataset", "method")},
                "test_case": case,
                "score": name,
                "seed": None if int(scores.meta["seed"]) == UNKNOWN_SEED else int(scores.meta["seed"]),
            }
            row.update(case_metrics(id_scores, labels, predictions, ood_scores))
            for metric, function in (extra or {}).items():
                row[metric] = float(function(id_scores.double(), labels, predictions, ood_scores.double()))
            rows.append(row)
    return rows


def find_score_files(roots: Iterable[Path]) -> list[Path]:
    return sorted({f for root in roots for f in Path(root).rglob(SCORES_FILE) if f.is_file()})


def results_from_scores(files: Iterable[Path]):
    """A results frame as :func:`mchad.results.read_results.find_results` reads it, recomputed from score files."""
    import pandas as pd

    frames = []
    for file in files:
        scores = load_scores(file)
        frame = pd.DataFrame(recompute_metrics(scores), columns=[*KEY_COLUMNS, *METRIC_COLUMNS])
        frame["run_dir"] = str(Path(file).parent)
        frame["headline"] = frame["score"] == scores.score_names[0]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
