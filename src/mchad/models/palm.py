r"""PALM: a mixture of prototypes per class on the unit hypersphere.

Lu, Gong, Wang, Xue, Yao, Moore, *Learning with Mixture of Prototypes for Out-of-Distribution
Detection*, ICLR 2024, https://openreview.net/forum?id=uNkKaD3MCs (arXiv 2402.02653); official
code https://github.com/jeff024/PALM (``util/loss_functions.py``, ``trainer.py``, ``runner.sh``).

Each class ``c`` has ``M`` unit prototypes ``p^c_m``; prototype ``i`` of the ``K = C M`` belongs
to class ``i mod C`` (the official layout). A sample's soft assignment ``w_i`` to the
prototypes comes from Sinkhorn-Knopp on ``exp(z^T p / epsilon)`` over all ``K`` prototypes
(:func:`sinkhorn`), restricted to its class and, with ``top_k < M``, to the class's ``top_k``
largest. The losses, as the official code computes them:

.. math::

    L_{MLE} = -\frac{1}{N} \sum_i \Big( \sum_{m} \hat w_{i,m}\, z_i^\top p^{y_i}_m / \tau
              - \log \sum_{k=1}^{K} \exp(z_i^\top p_k / \tau) \Big)

with ``hat w`` the class-restricted assignment normalised to sum 1 per sample, and

.. math::

    L_{proto} = -\frac{1}{K} \sum_{k} \Big( \frac{1}{|P(k)|} \sum_{k' \in P(k)} p_k^\top p_{k'} / \tau'
                - \log \sum_{k' \ne k} \exp(p_k^\top p_{k'} / \tau') \Big)

where ``P(k)`` are the other prototypes of ``k``'s class. ``L_PALM = L_MLE + lambda L_proto``.
Prototypes move by EMA towards the assignment-weighted mean of their samples,
``p_k := Normalize(alpha p_k + (1 - alpha) sum_i u_{i,k} z_i)`` (``u``: the restricted
assignments normalised per sample, then per prototype). ``L_MLE`` uses the updated prototypes
detached and assignments recomputed with them; ``L_proto`` the updated prototypes with the
gradient of the batch's update (the only way it reaches the network), as the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mchad.models.hypersphere import PrototypeMethod, SphereOutput, synced_prototypes
from mchad.models.methods import check_non_negative, weighted


def sinkhorn(similarities: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    r"""Soft assignments ``N x K`` of ``N`` samples to ``K`` prototypes by Sinkhorn-Knopp
    (as SwAV and the official ``PALM.sinkhorn``): ``Q = exp(S / epsilon)`` scaled to sum 1,
    then ``iterations`` times each prototype's column scaled to total ``1/K`` and each sample's
    row to ``1/N``; returned times ``N`` (each row sums to 1). No gradient.

    The official code's re-normalisation of the prototypes when ``sum Q`` overflows is left
    out (a host check every step; with unit vectors and ``epsilon = 0.05``, ``exp`` stays below
    ``e^20``)."""
    q = torch.exp(similarities.detach() / epsilon)
    n, k = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = F.normalize(q, p=1, dim=0) / k
        q = F.normalize(q, p=1, dim=1) / n
    return q * n


def class_restricted(assignments: Tensor, mask: Tensor, top_k: int, per_class: int) -> tuple[Tensor, Tensor]:
    """The assignments to the sample's own class's prototypes (``mask``, ``N x K``), with
    ``0 < top_k < per_class`` to its ``top_k`` largest ones; also the 0/1 mask of those chosen."""
    restricted = mask * assignments
    if 0 < top_k < per_class:
        chosen = torch.zeros_like(restricted).scatter_(1, restricted.topk(top_k, dim=1).indices, 1.0)
        return chosen * restricted, chosen * mask
    return restricted, mask


def mle_loss(z: Tensor, prototypes: Tensor, weights: Tensor, known: Tensor, temperature: float) -> Tensor:
    """``L_MLE``: ``weights`` (``N x K``, zero outside the sample's chosen prototypes) are
    normalised per sample; averaged over the ``known`` (0/1) samples."""
    logits = z @ prototypes.t() / temperature
    positive = (F.normalize(weights, p=1, dim=1) * logits).sum(dim=1)
    per_sample = (torch.logsumexp(logits, dim=1) - positive) * known
    return per_sample.sum() / known.sum().clamp(min=1)


def proto_contrastive_loss(prototypes: Tensor, classes: Tensor, temperature: float = 0.5) -> Tensor:
    """``L_proto``: each prototype against the others, its own class's ones positive
    (``classes``: the class of each prototype)."""
    p = F.normalize(prototypes, dim=1)
    logits = p @ p.t() / temperature
    itself = torch.eye(len(p), dtype=torch.bool, device=p.device)
    positives = ((classes.unsqueeze(0) == classes.unsqueeze(1)) & ~itself).to(p.dtype)
    positive = (F.normalize(positives, p=1, dim=1) * logits).sum(dim=1)
    return (torch.logsumexp(logits.masked_fill(itself, float("-inf")), dim=1) - positive).mean()


class PALM(PrototypeMethod):
    r"""PALM: ``loss = weight_mle * L_MLE + weight_proto * L_proto`` on the normalised output of
    an MLP projection head, ``n_prototypes`` EMA prototypes per class (training only, from both
    views of each image). Prediction: the class of the nearest prototype; scores ``distance``
    (squared distance to the nearest prototype) and ``msp`` of the class logits
    ``log sum_m exp(z^T p^c_m / tau)``; the paper's scores (Mahalanobis, KNN) are the detectors
    ``mahalanobis`` and ``knn`` (see :mod:`mchad.models.hypersphere`).

    Defaults from the official code (``util/loaders/args_loader.py`` and ``runner.sh``):
    ``n_prototypes`` 6 (``--cache-size``), ``top_k`` 5 (``--k``), ``tau`` 0.1 (``--temp``),
    ``alpha`` 0.999 (``--proto_m``), ``epsilon`` 0.05 and 3 Sinkhorn iterations, ``tau'`` 0.5
    (``proto_contra``), ``weight_proto`` 1 (``--lambda_pcon``), 128-d head (``feat_dim``).
    Prototypes start uniform in the positive orthant, normalised (``torch.rand``), as there.
    """

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        feat_dim: int = 128,
        n_prototypes: int = 6,
        top_k: int = 5,
        temperature: float = 0.1,
        momentum: float = 0.999,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        proto_temperature: float = 0.5,
        weight_mle: float = 1.0,
        weight_proto: float = 1.0,
    ):
        super().__init__(n_classes, n_embedding, feat_dim, temperature)
        check_non_negative(weight_mle=weight_mle, weight_proto=weight_proto, top_k=top_k)
        if n_prototypes < 1 or not 0 <= momentum < 1 or epsilon <= 0 or proto_temperature <= 0:
            raise ValueError(
                "needs n_prototypes >= 1, 0 <= momentum < 1, epsilon > 0 and proto_temperature > 0, got "
                f"{n_prototypes}, {momentum}, {epsilon}, {proto_temperature}"
            )
        self.n_prototypes, self.top_k = n_prototypes, top_k
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.sinkhorn_iterations, self.proto_temperature = sinkhorn_iterations, float(proto_temperature)
        self.weights = {"mle": weight_mle, "proto": weight_proto}
        # cpu: moved with the model; the official start, torch.rand normalised
        self.register_buffer("prototypes", F.normalize(torch.rand(n_prototypes * n_classes, feat_dim), dim=1))
        # cpu: moved with the model; prototype i belongs to class i mod C
        self.register_buffer("classes", torch.arange(n_prototypes * n_classes) % n_classes, persistent=False)

    def class_scores(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, m, c = len(z), self.n_prototypes, self.n_classes
        similarity = (z @ self.prototypes.t()).view(b, m, c)
        distances = (2 - 2 * similarity.max(dim=1).values).clamp(min=0)
        return distances, torch.logsumexp(similarity / self.temperature, dim=1)

    def assign(self, z: Tensor, prototypes: Tensor) -> Tensor:
        return sinkhorn(z @ prototypes.t(), self.epsilon, self.sinkhorn_iterations)

    def updated(self, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The EMA-updated prototypes (differentiable in ``z``) and the chosen-prototype mask."""
        weights, chosen = class_restricted(self.assign(z, self.prototypes), mask, self.top_k, self.n_prototypes)
        update = F.normalize(F.normalize(weights, p=1, dim=1), p=1, dim=0)
        moved = self.momentum * self.prototypes + (1 - self.momentum) * update.t() @ z
        return F.normalize(moved, dim=1), chosen

    def loss(self, out: SphereOutput, target: Tensor) -> dict[str, Tensor]:
        z = out.projection
        mask = (target.unsqueeze(1) == self.classes.unsqueeze(0)).to(z.dtype)  # outliers: zero rows
        if self.training:
            prototypes, chosen = self.updated(z, mask)
            self.prototypes.copy_(synced_prototypes(prototypes.detach()))
        else:
            prototypes, chosen = (
                self.prototypes,
                class_restricted(self.assign(z, self.prototypes), mask, self.top_k, self.n_prototypes)[1],
            )
        weights = chosen * self.assign(z, prototypes.detach())
        known = (target >= 0).to(z.dtype)
        terms = {
            "mle": mle_loss(z, prototypes.detach(), weights, known, self.temperature),
            "proto": proto_contrastive_loss(prototypes, self.classes, self.proto_temperature),
        }
        return weighted(terms, self.weights)

    def extra_repr(self) -> str:
        return f"n_prototypes={self.n_prototypes}, top_k={self.top_k}, momentum={self.momentum}"
