"""Metrics beyond pytorch-ood's: the open-set classification rate (OSCR)."""

from __future__ import annotations

import torch
from torch import Tensor


def oscr(id_scores: Tensor, id_correct: Tensor, ood_scores: Tensor) -> float:
    """Area under the curve of the correct classification rate over the false positive rate
    (Dhamija et al., NeurIPS 2018), outlier scores (larger = more anomalous).

    At a threshold t a sample is accepted when its score is <= t: CCR(t) = fraction of ID samples
    accepted and correctly classified, FPR(t) = fraction of OOD samples accepted. Samples with
    equal scores are accepted together (one step of the curve), trapezoids between the steps.
    """
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError("OSCR needs at least one ID and one OOD sample")
    scores = torch.cat([id_scores, ood_scores]).double()
    correct = torch.cat([id_correct.bool(), torch.zeros(len(ood_scores), dtype=torch.bool, device=scores.device)])
    is_ood = torch.cat([torch.zeros(len(id_scores), dtype=torch.bool, device=scores.device),
                        torch.ones(len(ood_scores), dtype=torch.bool, device=scores.device)])
    order = torch.argsort(scores)
    scores, correct, is_ood = scores[order], correct[order], is_ood[order]
    ccr = torch.cumsum(correct.double(), 0) / len(id_scores)
    fpr = torch.cumsum(is_ood.double(), 0) / len(ood_scores)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    ccr, fpr = torch.cat([zero, ccr[last_of_tie]]), torch.cat([zero, fpr[last_of_tie]])
    return float(torch.trapezoid(ccr, fpr))
