"""The metrics of one test case (ID test set mixed with one OOD set) from per-sample scores.

Used at test time (:class:`mchad.models.module.OODModel`, on the device) and when metrics are
recomputed from a run's score file (:mod:`mchad.results.scores`), so both give the same numbers.
Every score is an outlier score: **larger = more anomalous**.
"""

from __future__ import annotations

import torch
from pytorch_ood.metrics import OODMetrics
from torch import Tensor

#: results.csv metric columns from pytorch-ood's OODMetrics and the keys they come from
OOD_METRIC_KEYS = {"AUROC": "AUROC", "AUPR-IN": "AUPR-IN", "AUPR-OUT": "AUPR-OUT", "FPR95": "FPR95TPR"}
#: every metric column of a test case, in results.csv order (Accuracy comes first)
METRIC_COLUMNS = ["Accuracy", *OOD_METRIC_KEYS, "OSCR"]


def oscr(id_scores: Tensor, id_correct: Tensor, ood_scores: Tensor) -> float:
    """Open-set classification rate (Dhamija et al., NeurIPS 2018): the area under the curve of
    the correct-classification rate against the false-positive rate, over all thresholds ``t``
    on an outlier score (a sample is accepted as known when ``score <= t``):

    - ``CCR(t)`` = fraction of **all** ID samples that are accepted *and* correctly classified;
    - ``FPR(t)`` = fraction of OOD samples that are accepted.

    The curve runs from (0, 0) to (1, accuracy), so the OSCR is at most the accuracy. Samples
    with equal scores cross the threshold together: the curve takes one point per distinct
    score and is integrated with the trapezoidal rule, as the ROC curve is for ties.

    ``id_scores``, ``id_correct`` (bool) and ``ood_scores`` are 1-D, on any one device.
    """
    if id_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError("OSCR needs at least one ID and one OOD sample")
    if id_correct.shape != id_scores.shape:
        raise ValueError(f"id_correct has shape {tuple(id_correct.shape)}, id_scores {tuple(id_scores.shape)}")
    device = id_scores.device
    scores = torch.cat([id_scores.double(), ood_scores.to(device).double()])
    n_id, n_ood = id_scores.numel(), ood_scores.numel()
    ccr_step = torch.cat(
        [id_correct.to(device).double() / n_id, torch.zeros(n_ood, dtype=torch.float64, device=device)]
    )
    fpr_step = torch.cat(
        [
            torch.zeros(n_id, dtype=torch.float64, device=device),
            torch.full((n_ood,), 1.0 / n_ood, dtype=torch.float64, device=device),
        ]
    )
    order = scores.argsort(stable=True)
    sorted_scores = scores[order]
    # the last sample of each run of equal scores closes that threshold's point
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    origin = torch.zeros(1, dtype=torch.float64, device=device)
    ccr = torch.cat([origin, ccr_step[order].cumsum(0)[last_of_tie]])
    fpr = torch.cat([origin, fpr_step[order].cumsum(0)[last_of_tie]])
    return float(torch.trapezoid(ccr, fpr))


def case_metrics(id_scores: Tensor, id_labels: Tensor, id_predictions: Tensor, ood_scores: Tensor) -> dict[str, float]:
    """Every metric column of one test case and score (fractions in [0, 1]).

    OOD samples are the positive class of AUROC, AUPR-OUT and FPR95 (pytorch-ood's convention).
    """
    correct = id_predictions == id_labels
    metrics = OODMetrics(device=id_scores.device)
    metrics.update(id_scores, id_labels)
    metrics.update(ood_scores, torch.full_like(ood_scores, -1, dtype=torch.long))
    values = metrics.compute()
    row = {"Accuracy": correct.double().mean().item()}
    row.update({column: float(values[key]) for column, key in OOD_METRIC_KEYS.items()})
    row["OSCR"] = oscr(id_scores, correct, ood_scores)
    return row
