r"""What the methods with class prototypes on the unit hypersphere share (CIDER, PALM).

Both put a projection head on the backbone's embedding and normalise its output,
``z = h(f) / ||h(f)||``, and keep unit prototypes ``mu`` that are updated by exponential moving
averages of the batch's ``z`` (not by the optimiser). On the sphere the squared Euclidean
distance is ``||z - mu||^2 = 2 - 2 z^T mu``: the methods report it as ``distances``, so that the
prediction (nearest prototype), the headline score ``distance`` and the logits detectors work
as for the other centre-based methods. The papers' own score, KNN on the normalised backbone
embedding (Sun et al., ICML 2022), is the post-hoc detector ``knn``
(:mod:`mchad.models.detectors`): it reads :meth:`Method.features`, the backbone's embedding,
and normalises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mchad.distributed import all_reduce_sum_, distributed_world
from mchad.models.methods import Method, MethodOutput, msp


@dataclass
class SphereOutput(MethodOutput):
    """:class:`MethodOutput` plus ``projection``, the ``B x feat_dim`` unit vectors of the
    projection head that the losses and the prototypes act on (``embedding`` stays the
    backbone's output, which the views draw and the feature detectors read)."""

    projection: Tensor | None = None


class ProjectionHead(nn.Module):
    """``Linear(d, d) - ReLU - Linear(d, feat_dim)``, output normalised to unit length: the
    ``mlp`` head of SupCon that CIDER's (``models/resnet.py``) and PALM's code use."""

    def __init__(self, n_embedding: int, feat_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(n_embedding, n_embedding), nn.ReLU(inplace=True), nn.Linear(n_embedding, feat_dim)
        )

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.mlp(f), dim=1)


def sphere_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """``B x K`` squared Euclidean distances ``2 - 2 z^T mu`` of unit vectors (clamped at 0)."""
    return (2 - 2 * z @ prototypes.t()).clamp(min=0)


@torch.no_grad()
def synced_prototypes(prototypes: Tensor) -> Tensor:
    """In DDP the normalised mean of every rank's updated prototypes, so that all ranks keep the
    same ones (each updated them from its own part of the batch); in one process unchanged."""
    if distributed_world() == 1:
        return prototypes
    summed = prototypes.clone()
    all_reduce_sum_(summed)
    return F.normalize(summed, dim=1)


class PrototypeMethod(Method):
    """Base of CIDER and PALM: projection head, class logits ``logits`` from the prototypes,
    squared distances to the nearest prototype of each class ``distances``, nearest-prototype
    prediction, scores ``distance`` (headline, ``min_c d_c``) and ``msp`` of the logits.

    Subclasses set :attr:`prototypes` (a buffer) and implement :meth:`class_scores`.
    """

    score_names = ("distance", "msp")
    #: augmented views per image in training (the datamodule draws them, see data/augment.py)
    train_views = 2

    def __init__(self, n_classes: int, n_embedding: int, feat_dim: int, temperature: float):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"needs at least 2 classes, got n_classes={n_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.n_classes = n_classes
        self.temperature = float(temperature)
        self.head = ProjectionHead(n_embedding, feat_dim)

    def class_scores(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``B x C`` squared distances to each class's nearest prototype and class logits."""
        raise NotImplementedError

    def forward(self, f: Tensor) -> SphereOutput:
        z = self.head(f)
        distances, logits = self.class_scores(z)
        return SphereOutput(embedding=f, distances=distances, logits=logits, projection=z)

    def predict(self, out: SphereOutput) -> Tensor:
        return out.distances.argmin(dim=1)

    def scores(self, out: SphereOutput) -> dict[str, Tensor]:
        return {"distance": out.distances.min(dim=1).values, "msp": msp(out.logits)}

    def logits_of(self, features: Tensor) -> Tensor:
        return self.class_scores(self.head(features))[1]
