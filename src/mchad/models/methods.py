"""Methods: what sits on top of a backbone's embedding — head, loss, prediction and scores.

Every method is an ``nn.Module`` whose state (centres, linear head, ...) is part of the
model: optimised, moved to the model's device and saved in checkpoints with it. The one
LightningModule (:class:`mchad.models.module.OODModel`) drives all of them through the
interface of :class:`Method` (its docstring is the contract): one typed output per batch,
:class:`MethodOutput` (embedding, distances, logits), and :class:`Geometry`, what the views can
draw of a method (centres, radius, margin).

Scores: ``distance`` = ``min_c d_c`` (squared distance to the nearest centre, the paper's
score for every centre-based model); ``msp`` = ``-max_c softmax(logits)_c`` with the logits
of a linear head, or ``-d`` for methods without one; ``cac`` = CAC's rejection score.

The G-variants (G-MCHAD, G-Center, G-CAC) are the same classes with ``weight_oe > 0`` and an
outlier source in the datamodule: the push regulariser (:class:`mchad.models.losses.OutlierPush`)
acts on the outliers of each batch. Adding a method: a subclass, its config in ``config/model/``
and its entry in the method registry (docs/layout-and-extending.md, "Adding a method").
"""

from dataclasses import dataclass, fields, replace

import torch
from pytorch_ood.loss import CACLoss, CenterLoss
from pytorch_ood.model.centers import ClassCenters, RunningCenters
from pytorch_ood.utils import pairwise_distances
from torch import Tensor, nn

from mchad.distributed import all_reduce_sum_, distributed_world
from mchad.models import losses
from mchad.models.losses import Semantics


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability, negated (larger = more anomalous)."""
    return -logits.softmax(dim=1).max(dim=1).values


def weighted(terms: dict[str, Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """``terms`` plus their weighted sum under ``"loss"``."""
    terms["loss"] = sum(weights[name] * value for name, value in terms.items())
    return terms


@dataclass
class MethodOutput:
    """What a method computes once per batch (:meth:`Method.forward`).

    ``embedding``: the ``B x D`` features that the head or the centres act on (the views draw it,
    feature-based detectors use it); ``distances``: ``B x C`` squared distances to the class
    centres, for centre-based methods; ``logits``: ``B x C`` of a linear classifier head.
    (A dataclass: torch.compile traces it as one graph, tests/test_compile.py.)
    """

    embedding: Tensor | None = None
    distances: Tensor | None = None
    logits: Tensor | None = None

    def rows(self, index: Tensor) -> "MethodOutput":
        """The output of some rows of the batch (a boolean mask or indices)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **{name: value[index] for name, value in picked.items()})


@dataclass(frozen=True)
class Geometry:
    """What the views can draw of a method (:meth:`Method.geometry`): the ``C x D`` class centres
    (None: no centres, no embedding picture) and the hypersphere radius ``r`` and margin ``m``
    read by ``semantics`` (see :func:`mchad.callbacks.animation.sphere_geometry`); 0: no circle."""

    centers: Tensor | None = None
    radius: float = 0.0
    margin: float = 0.0
    semantics: Semantics = "published"


class Method(nn.Module):
    """The interface every method implements; the LightningModule uses nothing else.

    - ``forward(z) -> MethodOutput``: computed once per batch from the backbone's embedding ``z``;
    - ``loss(out, y) -> dict``: the unweighted terms and their weighted total under ``"loss"``
      (:func:`weighted` with :attr:`weights`); labels ``< 0`` are outliers, terms that do not
      use them ignore them;
    - ``predict(out) -> Tensor`` of class indices;
    - ``scores(out) -> dict`` of outlier scores, **larger = more anomalous**, named as in
      :attr:`score_names`, the headline score first (results.csv: one row per test case and score;
      the registry's ``score`` names it);
    - ``geometry() -> Geometry``: what the views can draw (default: nothing);
    - ``on_train_epoch_start()``: per-epoch state (II's running centres);
    - for post-hoc detectors (:mod:`mchad.models.detectors`): ``features(out)``, ``logits(out)``,
      ``logits_of(features)`` and ``linear_head``, given here for any method whose output has
      ``logits`` (a linear ``head``) or ``distances`` (and centres in its geometry).
    """

    #: effective weight of each loss term (``loss = sum weights[t] * terms[t]``)
    weights: dict[str, float] = {}

    #: outlier scores this method reports; the first is the headline score
    score_names: tuple[str, ...] = ()

    def forward(self, z: Tensor) -> MethodOutput:
        raise NotImplementedError

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, out: MethodOutput) -> Tensor:
        raise NotImplementedError

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        raise NotImplementedError

    def geometry(self) -> Geometry:
        """What the views can draw: no centres, no circles unless a method says so."""
        return Geometry()

    def on_train_epoch_start(self) -> None:
        """Hook for per-epoch state (e.g. running centres)."""

    @property
    def linear_head(self) -> nn.Linear | None:
        """The linear classifier ``head`` on the features, or ``None`` for methods without one."""
        head = getattr(self, "head", None)
        return head if isinstance(head, nn.Linear) else None

    def features(self, out: MethodOutput) -> Tensor:
        """The ``B x D`` features that the head or the centres act on."""
        return out.embedding

    def logits(self, out: MethodOutput) -> Tensor:
        """The ``B x C`` logits: the classifier's, else the negated squared distances ``-d``."""
        return out.logits if out.logits is not None else -out.distances

    def logits_of(self, features: Tensor) -> Tensor:
        """What :meth:`logits` would be for these features (detectors that alter features)."""
        head = self.linear_head
        if head is not None:
            return head(features)
        centers = self.geometry().centers
        if centers is None:
            raise TypeError(f"{type(self).__name__} has neither a linear head nor centres")
        return -pairwise_distances(features, centers)


class CenterMethod(Method):
    """Shared part of the centre-based methods: class centres ``mu`` (a pytorch-ood
    ``ClassCenters``), squared distances, nearest-centre prediction, the ``distance`` and
    ``msp`` scores, and the push regulariser on outliers (G-variants)."""

    score_names = ("distance", "msp")

    def __init__(
        self, centers: ClassCenters, margin: float = 0.0, radius: float = 0.0, semantics: Semantics = "published"
    ):
        super().__init__()
        self.class_centers = centers
        self.push = losses.OutlierPush(margin, radius, semantics)
        self.semantics = semantics
        # published: means over all rows of a batch, outliers counting as 0 (pytorch-ood 0.0.7)
        self.all_rows = semantics == "published"

    @property
    def centers(self) -> Tensor:
        """The ``C x D`` class centres."""
        return self.class_centers.params

    def geometry(self) -> Geometry:
        """The centres and the push term's radius, margin and semantics."""
        push = self.push
        return Geometry(self.centers, push.radius, push.margin, push.semantics)

    def forward(self, z: Tensor) -> MethodOutput:
        return MethodOutput(z, distances=self.class_centers(z))

    def predict(self, out: MethodOutput) -> Tensor:
        return out.distances.argmin(dim=1)

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        d = out.distances
        return {"distance": d.min(dim=1).values, "msp": msp(-d)}


class MCHAD(CenterMethod):
    """Multi-Class Hypersphere Anomaly Detection (G-MCHAD with ``weight_oe > 0`` and outliers).

    ``loss = weight_center * L_center + weight_ce * L_nll + weight_oe * L_reg`` on squared
    distances to learnable centres; prediction ``argmin_c d_c``, score ``min_c d_c``.
    See :mod:`mchad.models.losses` for the two ``semantics`` of the terms.
    """

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        radius: float = 0.0,
        margin: float = 0.0,
        weight_center: float = 0.5,
        weight_ce: float = 1.0,
        weight_oe: float = 0.0,
        semantics: Semantics = "published",
    ):
        check_non_negative(
            radius=radius, margin=margin, weight_center=weight_center, weight_ce=weight_ce, weight_oe=weight_oe
        )
        pull = losses.pull_radius(radius, semantics)  # also validates semantics
        # pytorch-ood's CenterLoss initialises the centres (standard normal; identity if C == D)
        super().__init__(CenterLoss(n_classes, n_embedding).centers, margin, radius, semantics)
        self.pull_radius = pull
        self.weights = {"center": weight_center, "nll": weight_ce, "oe": weight_oe}

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        d = out.distances
        terms = {
            "center": losses.center_pull(d, target, self.pull_radius, self.all_rows),
            "nll": losses.softmin_nll(d, target, self.all_rows),
            "oe": self.push(d, target),
        }
        return weighted(terms, self.weights)


class Center(CenterMethod):
    """Center loss (Wen et al. 2016): a linear classifier on the embedding trained with
    ``weight_ce * CE(logits) + weight_center * L_center`` (+ ``weight_oe * L_reg`` for
    G-Center). Prediction by the classifier, except G-Center (``weight_oe > 0``) with
    ``published``: nearest centre, as the published ``gcenter.py``. Scores ``distance``
    (headline) and ``msp`` of the classifier's logits. ``published`` averages the CE and
    centre terms over all rows, outliers included (see :mod:`mchad.models.losses`)."""

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        margin: float = 0.0,
        weight_center: float = 0.5,
        weight_ce: float = 1.0,
        weight_oe: float = 0.0,
        semantics: Semantics = "published",
    ):
        check_non_negative(margin=margin, weight_center=weight_center, weight_ce=weight_ce, weight_oe=weight_oe)
        super().__init__(CenterLoss(n_classes, n_embedding).centers, margin, 0.0, semantics)
        self.head = nn.Linear(n_embedding, n_classes)
        self.weights = {"center": weight_center, "nll": weight_ce, "oe": weight_oe}
        # the published G-Center (gcenter.py) predicts by the nearest centre, Center by its classifier
        self.predict_by_centre = semantics == "published" and weight_oe > 0

    def forward(self, z: Tensor) -> MethodOutput:
        return MethodOutput(z, distances=self.class_centers(z), logits=self.head(z))

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        d = out.distances
        terms = {
            "center": losses.center_pull(d, target, all_rows=self.all_rows),
            "nll": losses.cross_entropy_known(out.logits, target, self.all_rows),
            "oe": self.push(d, target),
        }
        return weighted(terms, self.weights)

    def predict(self, out: MethodOutput) -> Tensor:
        if self.predict_by_centre:
            return out.distances.argmin(dim=1)
        return out.logits.argmax(dim=1)

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        return {"distance": out.distances.min(dim=1).values, "msp": msp(out.logits)}


class CAC(CenterMethod):
    """Class Anchor Clustering (Miller et al. 2021): fixed anchors ``magnitude * e_c`` in an
    embedding of dimension ``C``;
    ``loss = weight_ce * (weight_center * anchor + tuplet) + weight_oe * L_reg`` (L_reg for
    G-CAC), the published ``gcac.py`` weighting: ``weight_ce`` scales the whole CAC loss and
    ``weight_center`` is CAC's ``alpha``. :attr:`weights` holds the effective weight of each
    term. (The published ``cac.py`` used ``alpha = weight_anchor = 1`` and no ``weight_ce``:
    the CAC experiments set ``weight_center = weight_ce = 1``.)

    Distances: ``published`` works on ``||f(x) - a_c||^4`` (pytorch-ood 0.0.7 squared the
    squared distances) and sums the tuplet over classes ``0..C-2`` (see
    :func:`mchad.models.losses.tuplet`); ``paper`` on squared distances ``||f(x) - a_c||^2`` (the
    notation of the MCHAD paper, like every other method here; the CAC paper itself uses the
    plain norm ``||.||``) with the tuplet over ``i != y``. Rankings by ``distance`` are the
    same under any power.

    Scores: ``distance`` (headline, as in the paper's table), ``cac`` = CAC's rejection score
    ``min_c gamma_c`` with ``gamma = d * (1 - softmin(d))`` (the CAC paper and its code;
    larger = more anomalous), ``msp`` of ``-d``, and with ``published`` also
    ``cac_published`` = ``max_c gamma_c``, the ``cac`` score of the published tables.

    pytorch-ood 0.4's ``CACLoss.score`` returns ``-max_c gamma_c``: negated *and* a maximum,
    which ranks far-away inputs as the most normal ones, so it is not used.
    """

    score_names = ("distance", "cac", "msp")

    def __init__(
        self,
        n_classes: int,
        n_embedding: int,
        magnitude: float = 1.0,
        margin: float = 0.0,
        weight_center: float = 1.0,
        weight_ce: float = 1.0,
        weight_oe: float = 0.0,
        semantics: Semantics = "published",
    ):
        if n_embedding != n_classes:
            raise ValueError(f"CAC needs n_embedding = n_classes = {n_classes}, got n_embedding={n_embedding}")
        check_non_negative(
            magnitude=magnitude, margin=margin, weight_center=weight_center, weight_ce=weight_ce, weight_oe=weight_oe
        )
        # pytorch-ood's CACLoss creates the fixed anchors (not learnable)
        super().__init__(CACLoss(n_classes, magnitude=magnitude).centers, margin, 0.0, semantics)
        self.weights = {"anchor": weight_ce * weight_center, "tuplet": weight_ce, "oe": weight_oe}
        # published: pytorch-ood 0.0.7 squares the (already squared) distances, ||f(x) - a_c||^4
        self.distance_power = 2 if semantics == "published" else 1
        if semantics == "published":
            self.score_names = (*self.score_names, "cac_published")

    def forward(self, z: Tensor) -> MethodOutput:
        return MethodOutput(z, distances=self.class_centers(z).pow(self.distance_power))

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        d = out.distances
        terms = {
            "anchor": losses.anchor_pull(d, target),
            # CAC's anchor and tuplet terms are means over known rows in every reading
            "tuplet": losses.tuplet(d, target, first_classes=self.semantics == "published"),
            "oe": self.push(d, target),
        }
        return weighted(terms, self.weights)

    @staticmethod
    def gamma(distances: Tensor) -> Tensor:
        """CAC's ``gamma_c = d_c (1 - softmin(d)_c)``."""
        return distances * (1 - (-distances).softmax(dim=1))

    @classmethod
    def rejection_score(cls, distances: Tensor) -> Tensor:
        """``min_c gamma_c`` — larger = more anomalous."""
        return cls.gamma(distances).min(dim=1).values

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        scores = {**super().scores(out), "cac": self.rejection_score(out.distances)}
        if "cac_published" in self.score_names:
            # the published `cac` score: max_c gamma_c (pytorch-ood 0.0.7's CACLoss.score, un-negated)
            scores["cac_published"] = self.gamma(out.distances).max(dim=1).values
        return scores


class II(Method):
    """ii-loss (Hassen & Chan 2018): ``spread - weight_sep * separation`` on a batch-normalised
    embedding; the centres are running means of the batch class means (pytorch-ood's
    ``RunningCenters``), reset at the start of every training epoch. In training, the terms
    use the batch's class means (and update the running centres); in evaluation, the running
    centres. Prediction and ``distance``/``msp`` scores use the running centres.
    """

    score_names = ("distance", "msp")

    def __init__(self, n_classes: int, n_embedding: int, weight_sep: float = 100.0):
        super().__init__()
        check_non_negative(weight_sep=weight_sep)
        self.n_classes = n_classes
        self.weight_sep = weight_sep
        self.weights = {"spread": 1.0, "separation": -weight_sep}
        self.norm = nn.BatchNorm1d(n_embedding)
        self.running = RunningCenters(n_classes, n_embedding)

    @property
    def centers(self) -> Tensor:
        return self.running.centers

    def geometry(self) -> Geometry:
        """The running centres; no hyperspheres."""
        return Geometry(self.centers)

    def on_train_epoch_start(self) -> None:
        self.running.reset()

    def forward(self, z: Tensor) -> MethodOutput:
        e = self.norm(z)
        return MethodOutput(e, distances=pairwise_distances(e, self.running.centers))

    @torch.no_grad()
    def _global_class_means(self, e: Tensor, target: Tensor, means: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """The class means and presence mask of the global batch: in DDP the class sums and
        counts of every rank summed, so every rank moves its running centres alike (as one
        process would with the whole batch); in one process the local ones. The loss keeps
        the local means (a gradient through the other ranks' embeddings needs their graphs)."""
        if distributed_world() == 1:
            return means, present
        mask = losses.class_mask(target, self.n_classes, e.dtype)
        sums = torch.cat([mask.t() @ e, mask.sum(dim=0).unsqueeze(1)], dim=1)
        all_reduce_sum_(sums)
        counts = sums[:, -1]
        return sums[:, :-1] / counts.clamp(min=1).unsqueeze(1), (counts > 0).to(e.dtype)

    @torch.no_grad()
    def _update(self, means: Tensor, present: Tensor) -> None:
        """``RunningCenters.update`` without indexing by ``unique()`` (no host sync): the
        classes present in the batch move to the cumulative mean of their batch means."""
        running, n = self.running.running_centers, self.running.num_batches_tracked
        updated = (means + running * n) / (n + 1)
        running.copy_(torch.where(present.unsqueeze(1) > 0, updated, running))
        n += 1

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        e = out.embedding
        means, present = losses.batch_class_means(e, target, self.n_classes)
        if self.training:
            self._update(*self._global_class_means(e.detach(), target, means.detach(), present))
            centers = means
        else:
            centers = self.running.centers
        return weighted(losses.ii_terms(e, target, centers, present), self.weights)

    def predict(self, out: MethodOutput) -> Tensor:
        return out.distances.argmin(dim=1)

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        d = out.distances
        return {"distance": d.min(dim=1).values, "msp": msp(-d)}


class Softmax(Method):
    """Reference: linear classifier trained with cross-entropy, scored by max. softmax probability.

    Score ``msp = -max_c softmax(logits)_c`` (negated so that larger = more anomalous).
    """

    score_names = ("msp",)

    def __init__(self, n_classes: int, n_embedding: int):
        super().__init__()
        self.head = nn.Linear(n_embedding, n_classes)
        self.weights = {"nll": 1.0}

    def forward(self, z: Tensor) -> MethodOutput:
        return MethodOutput(z, logits=self.head(z))

    def loss(self, out: MethodOutput, target: Tensor) -> dict[str, Tensor]:
        return weighted({"nll": losses.cross_entropy_known(out.logits, target)}, self.weights)

    def predict(self, out: MethodOutput) -> Tensor:
        return out.logits.argmax(dim=1)

    def scores(self, out: MethodOutput) -> dict[str, Tensor]:
        return {"msp": msp(out.logits)}
