r"""CIDER: compactness and dispersion of hyperspherical embeddings.

Ming, Sun, Dia, Li, *How to Exploit Hyperspherical Embeddings for Out-of-Distribution
Detection?*, ICLR 2023, https://openreview.net/forum?id=aEFaE0W5pAd (arXiv 2203.04450);
official code https://github.com/deeplearning-wisc/cider (``utils/losses.py``,
``train_cider.py``, ``scripts/train_cider_cifar10.sh``).

Normalised embeddings ``z`` are modelled by von Mises-Fisher distributions around unit class
prototypes ``mu_c`` with concentration ``kappa = 1 / tau``:

.. math::

    L_{comp} = -\frac{1}{N} \sum_i \log \frac{\exp(z_i^\top \mu_{y_i} / \tau)}
                                             {\sum_{j=1}^C \exp(z_i^\top \mu_j / \tau)}

    L_{dis} = \frac{1}{C} \sum_{i=1}^C \log \frac{1}{C - 1}
              \sum_{j \ne i} \exp(\mu_i^\top \mu_j / \tau)

    L_{CIDER} = L_{dis} + \lambda_c L_{comp}

and the prototypes follow each sample of their class (the paper's Eq. 7):
``mu_c := Normalize(alpha mu_c + (1 - alpha) z)``. ``L_dis`` reaches the network only through
this update: the official code keeps the gradient of the batch's updates (and uses the updated,
detached prototypes in ``L_comp``); so does :class:`CIDER`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mchad.models import losses
from mchad.models.hypersphere import PrototypeMethod, SphereOutput, sphere_distances, synced_prototypes
from mchad.models.methods import check_non_negative, weighted


def ema_prototypes(prototypes: Tensor, z: Tensor, target: Tensor, momentum: float) -> Tensor:
    r"""The prototypes after the batch's per-sample updates, all at once (no per-sample loop).

    The paper and the official ``DisLoss`` run, sample after sample in batch order,
    ``mu_c := Normalize(alpha mu_c + (1 - alpha) z_j)`` for ``y_j = c``. Unrolled, sample ``j``,
    the ``r_j``-th of the ``n_c`` samples of its class, enters with weight
    ``(1 - alpha) alpha^(n_c - r_j)`` and the old prototype with ``alpha^(n_c)``:

    .. math:: \mu_c' = \mathrm{Normalize}\Big(\alpha^{n_c} \mu_c
              + (1 - \alpha) \sum_{j: y_j = c} \alpha^{n_c - r_j} z_j\Big)

    This is the sequential update with the normalisation done once at the end instead of after
    every sample: equal to it when a class has at most one sample in the batch, otherwise the
    intermediate norms (< 1) make the sequential update remember older samples slightly longer
    (tests/test_cider_palm.py measures the difference). Classes absent from the batch keep their
    prototype; a zero prototype (never seen) becomes the weighted mean of its first batch.
    Outliers (label < 0) do not count. Differentiable in ``z``.
    """
    n_classes = prototypes.shape[0]
    mask = losses.class_mask(target, n_classes, z.dtype)  # N x C
    rank = mask.cumsum(dim=0)  # r_j in the column of y_j
    count = mask.sum(dim=0)  # n_c
    weights = mask * (1 - momentum) * momentum ** (count - rank)
    kept = momentum**count
    return F.normalize(kept.unsqueeze(1) * prototypes + weights.t() @ z, dim=1)


class CompLoss(nn.Module):
    r"""Compactness loss ``L_comp``: the negative vMF log-likelihood of each known sample's
    class, ``-log softmax(z^T mu / tau)_y``, averaged over the known samples (labels < 0 are
    outliers and ignored). Prototypes are normalised (as the official ``CompLoss``)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, z: Tensor, prototypes: Tensor, target: Tensor) -> Tensor:
        logits = z @ F.normalize(prototypes, dim=1).t() / self.temperature
        return losses.cross_entropy_known(logits, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class DisLoss(nn.Module):
    r"""Dispersion loss ``L_dis = mean_i log( mean_{j != i} exp(mu_i^T mu_j / tau) )`` over the
    ``C`` (normalised) prototypes: small when the prototypes lie far apart."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, prototypes: Tensor) -> Tensor:
        p = F.normalize(prototypes, dim=1)
        n = p.shape[0]
        logits = p @ p.t() / self.temperature
        self_pairs = torch.eye(n, dtype=torch.bool, device=p.device)
        others = torch.logsumexp(logits.masked_fill(self_pairs, float("-inf")), dim=1)
        return (others - math.log(n - 1)).mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class CIDER(PrototypeMethod):
    r"""CIDER: ``loss = weight_comp * L_comp + weight_dis * L_dis`` on the normalised output of
    an MLP projection head, one EMA prototype per class (:func:`ema_prototypes`; in training
    only, from both views of each image). Prediction: nearest prototype; scores ``distance``
    (``min_c ||z - mu_c||^2 = 2 - 2 max_c z^T mu_c``) and ``msp`` of ``z^T mu / tau``; the
    paper's KNN score is the detector ``knn`` (see :mod:`mchad.models.hypersphere`).

    Defaults from the official code: ``tau = 0.1`` (``train_cider.py --temp``), ``alpha = 0.95``
    (``--proto_m`` of ``train_cider_cifar10.sh``; 0.5 for CIFAR-100), 128-d head
    (``--feat_dim``), ``weight_comp = w * tau / tau_base = 2 * 0.1 / 0.07`` (``--w 2`` for
    CIFAR-10, 1 for CIFAR-100, times the SupCon-style factor ``temperature / base_temperature``
    of the official ``CompLoss``, whose ``base_temperature`` is 0.07; ``DisLoss``'s is 0.1).

    The prototypes start at zero and take the mean of their class in the first training batch
    that holds it; the official code starts them at the class means of the whole training set
    under the initial network, which its updates forget within a batch or two
    (``0.95^n_c`` with ``n_c`` ~ 100 samples per class and batch of 2 x 512).
    """

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        feat_dim: int = 128,
        temperature: float = 0.1,
        momentum: float = 0.95,
        weight_comp: float = 2 * 0.1 / 0.07,
        weight_dis: float = 1.0,
    ):
        super().__init__(n_classes, n_embedding, feat_dim, temperature)
        check_non_negative(weight_comp=weight_comp, weight_dis=weight_dis)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.comp = CompLoss(temperature)
        self.dis = DisLoss(temperature)
        self.weights = {"comp": weight_comp, "dis": weight_dis}
        # cpu: moved with the model; zero = not seen yet (see the class docstring)
        self.register_buffer("prototypes", torch.zeros(n_classes, feat_dim))

    def class_scores(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return sphere_distances(z, self.prototypes), z @ self.prototypes.t() / self.temperature

    def loss(self, out: SphereOutput, target: Tensor) -> dict[str, Tensor]:
        z = out.projection
        prototypes = self.prototypes
        if self.training:
            prototypes = ema_prototypes(prototypes, z, target, self.momentum)
            self.prototypes.copy_(synced_prototypes(prototypes.detach()))
        terms = {"comp": self.comp(z, prototypes.detach(), target), "dis": self.dis(prototypes)}
        return weighted(terms, self.weights)
