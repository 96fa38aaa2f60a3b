r"""Loss terms of the hypersphere methods, built on pytorch-ood's components.

All distance matrices hold **squared** Euclidean distances ``d_c(x) = ||f(x) - mu_c||^2``
(as :class:`pytorch_ood.model.ClassCenters` returns them). Labels ``< 0`` mark outliers.

Two readings of MCHAD (Kirchheim et al., *Multi-Class Hypersphere Anomaly Detection*, ICPR
2022, https://ieeexplore.ieee.org/document/9956337) are available:

``published`` (default; produced the published numbers, = ``pytorch_ood.loss.MCHADLoss``)
    pull  ``max(0, d_y - r)``, mean over the B x C matrix;
    push  ``sum_i max(0, m^2 - d_i^2)`` summed over outliers, i.e. ``m^2 - ||f(x)-mu_i||^4``.
``paper`` (the equations as printed; ``r`` and ``m`` are Euclidean lengths)
    pull  ``max(0, d_y - r^2)``, mean over the B x C matrix;
    push  ``sum_i max(0, (r + m)^2 - d_i)`` summed over outliers.

The separation term is the same in both: ``CE(-d, y) = log(1 + sum_{i!=y} exp(d_y - d_i))``.
"""

from typing import Literal

import torch
from pytorch_ood.loss import CenterLoss
from pytorch_ood.loss.crossentropy import cross_entropy
from pytorch_ood.loss.mchad import CenterRegularizationLoss
from pytorch_ood.utils import is_known, is_unknown
from torch import Tensor, nn

Semantics = Literal["published", "paper"]
SEMANTICS = ("published", "paper")


def softmin_nll(distances: Tensor, target: Tensor) -> Tensor:
    """``CE(-d, y)`` averaged over known samples; 0 (with gradient) if there are none."""
    known = is_known(target)
    if not known.any():
        return distances.sum() * 0.0
    return cross_entropy(-distances[known], target[known])


class HypersphereMarginLoss(nn.Module):
    r"""Push term of the ``paper`` reading: ``sum_i max(0, (r + m)^2 - d_i)`` over outliers.

    pytorch-ood's :class:`~pytorch_ood.loss.mchad.CenterRegularizationLoss` implements the
    ``published`` reading (``m^2 - d^2`` on squared distances); this is the printed equation.
    """

    def __init__(self, radius: float, margin: float):
        super().__init__()
        self.radius = radius
        self.margin = margin

    def forward(self, distances: Tensor, target: Tensor) -> Tensor:
        outlier = is_unknown(target).unsqueeze(1)
        hinge = ((self.radius + self.margin) ** 2 - distances).relu()
        # masking instead of boolean indexing keeps the shape static (no host sync)
        return (hinge * outlier).sum()


class MCHADTerms(nn.Module):
    """The three unweighted MCHAD terms; owns the learnable class centres.

    Returns ``{"center": L_center, "nll": L_nll, "oe": L_reg}`` for a distance matrix.
    """

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        radius: float = 0.0,
        margin: float = 0.0,
        semantics: Semantics = "published",
    ):
        super().__init__()
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self.semantics = semantics
        self.radius = float(radius)
        self.margin = float(margin)
        pull_radius = self.radius if semantics == "published" else self.radius**2
        # CenterLoss owns the ClassCenters (random normal init, learnable), so the centres are
        # parameters of whatever module holds this one: optimised, moved and checkpointed with it.
        self.center = CenterLoss(n_classes=n_classes, n_dim=n_embedding, radius=pull_radius)
        if semantics == "published":
            self.push: nn.Module = CenterRegularizationLoss(margin=self.margin, reduction="sum")
        else:
            self.push = HypersphereMarginLoss(self.radius, self.margin)

    @property
    def centers(self) -> Tensor:
        return self.center.centers.params

    def distance(self, z: Tensor) -> Tensor:
        return self.center.distance(z)

    def forward(self, distances: Tensor, target: Tensor) -> dict[str, Tensor]:
        known = is_known(target)
        return {
            # CenterLoss warns on every call that sees outliers, so it only gets the known rows
            "center": self.center(distances[known], target[known]),
            "nll": softmin_nll(distances, target),
            "oe": self.push(distances, target),
        }
