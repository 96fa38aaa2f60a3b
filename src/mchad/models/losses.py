r"""Loss terms of the methods, as functions of a distance matrix (or logits) and the labels.

All distance matrices hold **squared** Euclidean distances ``d_c(x) = ||f(x) - mu_c||^2``
(as :class:`pytorch_ood.model.ClassCenters` returns them). Labels ``< 0`` mark outliers.

Every term here is computed with masks instead of boolean indexing, ``.any()`` or ``.item()``:
shapes stay static, so nothing waits for the GPU (no host synchronisation) in the training
step. pytorch-ood's losses drop outliers with boolean indexing (``drop_unknown``) and branch
on ``len(target) == 0``, which both synchronise; the functions below compute the same values
(tests/test_losses.py compares them with the library) and are used instead of the library's
``forward``. The library still provides the centres (``ClassCenters``, ``RunningCenters``) and
their initialisation.

Two readings of MCHAD (Kirchheim et al., *Multi-Class Hypersphere Anomaly Detection*, ICPR
2022, https://ieeexplore.ieee.org/document/9956337) are available:

``published`` (default; what the published code computed with pytorch-ood 0.0.7)
    pull  ``max(0, d_y - r)``, mean over the B x C matrix *including the outlier rows*
    (they count as 0), and the separation term's mean over all rows likewise;
    push  ``sum_i max(0, m^2 - d_i^2)`` summed over outliers, i.e. ``m^2 - ||f(x)-mu_i||^4``
    (= ``pytorch_ood.loss.mchad.CenterRegularizationLoss``). Without outliers in the batch
    this equals ``pytorch_ood.loss.MCHADLoss`` (0.4, which averages over known rows).
``paper`` (the equations as printed; ``r`` and ``m`` are Euclidean lengths)
    pull  ``max(0, d_y - r^2)``, mean over the known rows of the B x C matrix;
    push  ``sum_i max(0, (r + m)^2 - d_i)`` summed over outliers.

The switches each term takes (``all_rows`` of the means, ``first_classes`` of CAC's tuplet)
are set by the methods from their ``semantics`` (see :mod:`mchad.models.methods`).

The separation term is the same in both: ``CE(-d, y) = log(1 + sum_{i!=y} exp(d_y - d_i))``.
The push term is shared by G-MCHAD, G-Center and G-CAC (:class:`OutlierPush`).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Semantics = Literal["published", "paper"]
SEMANTICS = ("published", "paper")


# --- masks -------------------------------------------------------------------------------
def class_mask(target: Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``B x C`` one-hot of the labels; rows of outliers (label < 0) are all zero.

    A comparison with ``arange`` instead of ``F.one_hot``, which checks the label range on
    the host."""
    classes = torch.arange(n_classes, device=target.device)
    return (target.unsqueeze(1) == classes).to(dtype)


def known_mask(target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (target >= 0).to(dtype)


def outlier_mask(target: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (target < 0).to(dtype)


def _mean_over_known(values: Tensor, target: Tensor, all_rows: bool = False) -> Tensor:
    """Mean of per-sample ``values`` (already zero for outliers) over the known samples; 0
    (with gradient) when there are none. ``all_rows``: over every row of the batch instead,
    outliers counting as 0 (pytorch-ood 0.0.7, which produced the published numbers)."""
    if all_rows:
        return values.sum() / max(1, len(values))
    return values.sum() / known_mask(target, values.dtype).sum().clamp(min=1)


# --- terms -------------------------------------------------------------------------------
def center_pull(distances: Tensor, target: Tensor, radius: float = 0.0, all_rows: bool = False) -> Tensor:
    """``max(0, d_y - r)``, averaged over the known rows of the B x C matrix (non-target
    entries count as zero), as ``pytorch_ood.loss.CenterLoss.forward`` (including its clamp
    of every entry to ``[1e-12, 1e12]``). ``all_rows``: over all B x C entries, outlier rows
    included (pytorch-ood 0.0.7's ``CenterLoss``: with 128 ID + 256 outliers the mean is
    divided by 384 rows, a third of the known-only mean)."""
    n_classes = distances.shape[1]
    target_entries = class_mask(target, n_classes, distances.dtype)
    entries = ((distances - radius).relu() * target_entries).clamp(min=1e-12, max=1e12)
    if all_rows:
        return entries.mean()
    known = known_mask(target, distances.dtype)
    return (entries * known.unsqueeze(1)).sum() / (known.sum() * n_classes).clamp(min=1)


def cross_entropy_known(logits: Tensor, target: Tensor, all_rows: bool = False) -> Tensor:
    """Cross-entropy averaged over the known samples (= ``pytorch_ood...cross_entropy``);
    ``all_rows``: over all rows, 0 for outliers (pytorch-ood 0.0.7)."""
    masked = torch.where(target >= 0, target, torch.full_like(target, -100))
    per_sample = F.cross_entropy(logits, masked, ignore_index=-100, reduction="none")
    return _mean_over_known(per_sample, target, all_rows)


def softmin_nll(distances: Tensor, target: Tensor, all_rows: bool = False) -> Tensor:
    """``CE(-d, y) = log(1 + sum_{i!=y} exp(d_y - d_i))`` averaged over the known samples
    (``all_rows``: over all rows, see :func:`cross_entropy_known`)."""
    return cross_entropy_known(-distances, target, all_rows)


def anchor_pull(distances: Tensor, target: Tensor) -> Tensor:
    """CAC's anchor term: ``d_y`` averaged over the known samples."""
    d_true = (distances * class_mask(target, distances.shape[1], distances.dtype)).sum(dim=1)
    return _mean_over_known(d_true, target)


def tuplet(distances: Tensor, target: Tensor, first_classes: bool = False) -> Tensor:
    """CAC's tuplet term ``log(1 + sum_{i!=y} exp(d_y - d_i))`` over the known samples, with
    the exponent clamped at 50 as in the CAC code: the equation of the CAC paper (and of its
    reference code).

    ``first_classes``: the sum runs over classes ``0..C-2`` for every label, as pytorch-ood
    0.0.7 (the published numbers) and 0.4 compute it: it includes ``i = y`` (a term
    ``e^0 = 1``) and leaves out class ``C-1``; equal to the equation for ``y = C-1``.
    """
    mask = class_mask(target, distances.shape[1], distances.dtype)
    d_true = (distances * mask).sum(dim=1, keepdim=True)
    if first_classes:
        compared = (torch.arange(distances.shape[1], device=distances.device) < distances.shape[1] - 1).to(
            distances.dtype
        )
    else:
        compared = 1 - mask
    others = (d_true - distances).clamp(max=50).exp() * compared
    per_sample = torch.log(1 + others.sum(dim=1)) * known_mask(target, distances.dtype)
    return _mean_over_known(per_sample, target)


class OutlierPush(nn.Module):
    r"""The push regulariser ``L_reg`` on outliers (label < 0), summed over the batch.

    ``published``: ``sum_i max(0, m^2 - d_i^2)`` (= pytorch-ood's ``CenterRegularizationLoss``
    with ``reduction="sum"``); ``paper``: ``sum_i max(0, (r + m)^2 - d_i)``. Zero for a batch
    without outliers.
    """

    def __init__(self, margin: float, radius: float = 0.0, semantics: Semantics = "published"):
        super().__init__()
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.margin = float(margin)
        self.radius = float(radius)
        self.semantics = semantics

    def forward(self, distances: Tensor, target: Tensor) -> Tensor:
        if self.semantics == "published":
            hinge = (self.margin**2 - distances.pow(2)).relu()
        else:
            hinge = ((self.radius + self.margin) ** 2 - distances).relu()
        # a mask multiply instead of distances[unknown]: static shapes, no host sync
        return (hinge * outlier_mask(target, distances.dtype).unsqueeze(1)).sum()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, radius={self.radius}, semantics={self.semantics}"


def pull_radius(radius: float, semantics: Semantics) -> float:
    """The ``r`` subtracted from squared distances in the pull term of each reading."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    return float(radius) if semantics == "published" else float(radius) ** 2


# --- II (Hassen & Chan) ------------------------------------------------------------------
def batch_class_means(z: Tensor, target: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class means of the known embeddings (rows of absent classes are 0) and a ``C``
    mask of the classes present in the batch."""
    mask = class_mask(target, n_classes, z.dtype)
    counts = mask.sum(dim=0)
    means = (mask.t() @ z) / counts.clamp(min=1).unsqueeze(1)
    return means, (counts > 0).to(z.dtype)


def ii_terms(z: Tensor, target: Tensor, centers: Tensor, present: Tensor) -> dict[str, Tensor]:
    """The two ii-loss terms for embeddings ``z`` and class centres ``centers`` (C x D):

    ``spread``: mean over known samples of ``||z - mu_y||^2``;
    ``separation``: ``min_{j != k} ||mu_j - mu_k||^2`` over the classes marked in ``present``
    (1e24 when fewer than two are present, as pytorch-ood's ``IILoss``).
    """
    n_classes = centers.shape[0]
    mask = class_mask(target, n_classes, z.dtype)
    own_center = mask @ centers  # zero rows for outliers
    spread = _mean_over_known(((z - own_center).pow(2).sum(dim=1)) * known_mask(target, z.dtype), target)
    diff = centers.unsqueeze(0) - centers.unsqueeze(1)
    pair = present.unsqueeze(0) * present.unsqueeze(1) * (1 - torch.eye(n_classes, device=z.device, dtype=z.dtype))
    separation = torch.where(pair > 0, diff.pow(2).sum(dim=2), torch.full_like(pair, 1e24)).min()
    return {"spread": spread, "separation": separation}
