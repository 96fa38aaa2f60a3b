"""Methods: what sits on top of a backbone's embedding — head, loss, prediction and scores.

Every method is an ``nn.Module`` whose state (centres, linear head, ...) is part of the
model: optimised, moved to the model's device and saved in checkpoints with it. The one
LightningModule (:class:`mchad.module.OODModel`) drives all of them through this interface:

- ``forward(z) -> dict`` of tensors computed once per batch (e.g. ``distances``, ``logits``);
- ``loss(out, y) -> dict`` with the weighted total under ``"loss"`` and the unweighted terms;
- ``predict(out) -> Tensor`` of class indices;
- ``scores(out) -> dict`` of outlier scores, **larger = more anomalous**.

Adding a method means writing such a class and a config in ``config/model/``.
"""

from pytorch_ood.loss.crossentropy import cross_entropy
from torch import Tensor, nn

from mchad.losses import MCHADTerms, Semantics


def check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class Method(nn.Module):
    """Base class; see the module docstring for the interface."""

    #: outlier scores this method reports; the first is the headline score
    score_names: tuple[str, ...] = ()

    def loss(self, out: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def scores(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def on_train_epoch_start(self) -> None:
        """Hook for per-epoch state (e.g. running centres)."""


class MCHAD(Method):
    """Multi-Class Hypersphere Anomaly Detection (G-MCHAD with ``weight_oe > 0`` and outliers).

    ``loss = weight_center * L_center + weight_ce * L_nll + weight_oe * L_reg`` on squared
    distances to learnable centres; prediction ``argmin_c d_c``, score ``min_c d_c``.
    See :mod:`mchad.losses` for the two ``semantics`` of the terms.
    """

    score_names = ("distance",)

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
        super().__init__()
        check_non_negative(
            radius=radius, margin=margin, weight_center=weight_center, weight_ce=weight_ce, weight_oe=weight_oe
        )
        self.terms = MCHADTerms(n_classes, n_embedding, radius, margin, semantics)
        self.weights = {"center": weight_center, "nll": weight_ce, "oe": weight_oe}

    @property
    def centers(self) -> Tensor:
        return self.terms.centers

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return {"embedding": z, "distances": self.terms.distance(z)}

    def loss(self, out: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        terms = self.terms(out["distances"], target)
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["distances"].argmin(dim=1)

    def scores(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"distance": out["distances"].min(dim=1).values}


class Softmax(Method):
    """Reference: linear classifier trained with cross-entropy, scored by max. softmax probability.

    Score ``msp = -max_c softmax(logits)_c`` (negated so that larger = more anomalous).
    """

    score_names = ("msp",)

    def __init__(self, n_classes: int, n_embedding: int):
        super().__init__()
        self.head = nn.Linear(n_embedding, n_classes)

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        return {"embedding": z, "logits": self.head(z)}

    def loss(self, out: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        nll = cross_entropy(out["logits"], target)
        return {"nll": nll, "loss": nll}

    def predict(self, out: dict[str, Tensor]) -> Tensor:
        return out["logits"].argmax(dim=1)

    def scores(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"msp": -out["logits"].softmax(dim=1).max(dim=1).values}
