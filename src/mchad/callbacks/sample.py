"""The validation sample the views share: the first validation images and a fixed set of unknown
ones (never a test set, see :mod:`mchad.callbacks`), scored once per validation; and
:class:`ValidationCallback`, when a view is due and on how many samples."""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from mchad.devices import to_host
from mchad.models.methods import Method
from mchad.results import plots

log = logging.getLogger(__name__)

#: label of the unknown samples scored at validation
UNKNOWN = -1

#: the latest validation sample per trainer (shared by the callbacks of one run)
_CACHE: weakref.WeakKeyDictionary[pl.Trainer, tuple[tuple, ValidationSample]] = weakref.WeakKeyDictionary()


def headline_score(scores: dict[str, Any]) -> str:
    """The score to show: ``distance`` (nearest centre) when the method has it, else its first."""
    if not scores:
        raise ValueError("the method reports no scores")
    return "distance" if "distance" in scores else next(iter(scores))


def method_centers(method: Method) -> Tensor | None:
    """The method's centres (:meth:`~mchad.models.methods.Method.geometry`) as a ``(C, D)`` host
    tensor, or ``None`` for methods without centres."""
    centers = method.geometry().centers
    if not isinstance(centers, Tensor) or centers.ndim != 2:
        return None
    return to_host(centers).float().clone()


def unknown_images(
    datamodule: Any, shape: tuple[int, ...], dtype: torch.dtype, n: int, seed: int
) -> tuple[Tensor, str]:
    """``n`` unknown images for validation and where they come from (never a test set), on
    the host (:mod:`mchad.devices`).

    The validation OOD set (``datamodule.val_unknowns``, e.g. OpenOOD's ``val_ood``) if there
    is one, else the outlier-exposure set (``datamodule.outliers``), a fixed-seed subset of
    either; else noise of the ID image ``shape`` (half Gaussian, half uniform, see the module docs).
    """
    rng = np.random.default_rng(seed)
    for attribute in ("val_unknowns", "outliers"):
        images = getattr(getattr(datamodule, attribute, None), "images", None)
        if isinstance(images, Tensor) and len(images) > 0 and tuple(images.shape[1:]) == tuple(shape):
            index = rng.choice(len(images), size=min(n, len(images)), replace=False)
            index = torch.from_numpy(np.sort(index))  # cpu: indexes the host copy below
            return to_host(images)[index].clone(), attribute
    n_gauss = n // 2
    gauss = np.clip(rng.normal(128, 128, size=(n_gauss, *shape)), 0, 255)
    uniform = rng.uniform(0, 255, size=(n - n_gauss, *shape))
    values = np.concatenate([gauss, uniform])
    if dtype == torch.uint8:
        return torch.from_numpy(values.astype(np.uint8)), "noise"  # cpu: host images, see mchad.devices
    return torch.from_numpy(values / 255.0).to(dtype), "noise"  # cpu: host images, see mchad.devices


def known_vs_unknown_auroc(known: Tensor, unknown: Tensor) -> float:
    """AUROC of known vs. unknown scores (larger = more anomalous), the non-finite ones left out; NaN without both."""
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    known, unknown = known[torch.isfinite(known)], unknown[torch.isfinite(unknown)]
    if len(known) == 0 or len(unknown) == 0:
        return float("nan")
    return plots.roc_points(known, unknown)[2]


def _class_names(datamodule: Any, n_classes: int | None) -> list[str] | None:
    data = getattr(datamodule, "data", None)
    val = data.get("val") if isinstance(data, dict) else None
    names = getattr(val, "classes", None)
    if names is not None and (n_classes is None or len(names) == n_classes):
        return [str(n) for n in names]
    return None


@dataclass
class ValidationSample:
    """Model outputs on (a sample of) the validation set plus the unknown images; host
    tensors (:func:`mchad.devices.to_host`), wherever the model and the data live."""

    epoch: int
    step: int
    labels: Tensor  # -1 = unknown
    predictions: Tensor
    scores: dict[str, Tensor]
    embedding: Tensor | None
    centers: Tensor | None
    images: Tensor  # raw images (uint8 where the data is), for the projector's sprites
    unknown_source: str
    n_known: int
    class_names: list[str] | None = None
    val_acc: float = float("nan")

    @property
    def known(self) -> Tensor:
        return self.labels >= 0

    @property
    def score_name(self) -> str:
        return headline_score(self.scores)


def _raw_val_batches(datamodule: Any, max_samples: int) -> tuple[Tensor, Tensor]:
    """The first ``max_samples`` validation images and labels, on the host (the loader may
    gather them on the GPU: ``datamodule.data_on_device``)."""
    # the whole set in every world size (OODDataModule shards it for Lightning's loop)
    whole = "sharded" in inspect.signature(datamodule.val_dataloader).parameters
    loader = datamodule.val_dataloader(sharded=False) if whole else datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    images, labels, n = [], [], 0
    for batch in loader:
        x, y = batch[0], batch[1]
        images.append(x)
        labels.append(y)
        n += len(x)
        if n >= max_samples:
            break
    if not images:
        raise RuntimeError("the validation dataloader produced no batches")
    return to_host(torch.cat(images)[:max_samples]), to_host(torch.cat(labels)[:max_samples])


def _prepare(datamodule: Any, images: Tensor, device: torch.device) -> Tensor:
    """Raw host batch -> model input on the model's ``device`` as at validation (normalised,
    no augmentation)."""
    images = images.to(device)
    transform = getattr(datamodule, "transform", None)
    if transform is not None:
        return transform(images, augment=False)
    if hasattr(datamodule, "on_after_batch_transfer"):
        return datamodule.on_after_batch_transfer((images, None), 0)[0]
    return images.float()


@torch.no_grad()
def _forward(pl_module: pl.LightningModule, inputs: Tensor, batch_size: int) -> dict[str, Any]:
    trainer = pl_module.trainer
    method = pl_module.method
    datamodule = trainer.datamodule
    embeddings, predictions, scores = [], [], {}
    with trainer.precision_plugin.val_step_context():  # autocast as at validation
        for start in range(0, len(inputs), batch_size):
            x = _prepare(datamodule, inputs[start : start + batch_size], pl_module.device)
            out = pl_module(x)
            batch_scores = method.scores(out)
            detectors = getattr(pl_module, "detectors", None)
            if detectors is not None and detectors.detectors:  # fitted (objective.score names one)
                batch_scores.update(detectors.scores(method, out))
            for name, value in batch_scores.items():
                scores.setdefault(name, []).append(to_host(value).float())
            predictions.append(to_host(method.predict(out)))
            if isinstance(out.embedding, Tensor):
                embeddings.append(to_host(out.embedding).float())
    return {
        "scores": {k: torch.cat(v) for k, v in scores.items()},
        "predictions": torch.cat(predictions),
        "embedding": torch.cat(embeddings) if embeddings else None,
    }


def validation_sample(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    max_samples: int,
    unknown_samples: int,
    noise_seed: int,
    batch_size: int,
) -> ValidationSample:
    """Score the first ``max_samples`` validation images and ``unknown_samples`` unknown ones.

    Cached per trainer and (epoch, step, settings), so callbacks with the same settings
    share one pass. The module is put in eval mode for the pass and restored afterwards.
    """
    fitted = tuple(getattr(getattr(pl_module, "detectors", None), "detectors", None) or ())
    key = (trainer.current_epoch, trainer.global_step, max_samples, unknown_samples, noise_seed, fitted)
    cached = _CACHE.get(trainer)
    if cached is not None and cached[0] == key:
        return cached[1]
    datamodule = trainer.datamodule
    images, labels = _raw_val_batches(datamodule, max_samples)
    unknown, source = unknown_images(datamodule, tuple(images.shape[1:]), images.dtype, unknown_samples, noise_seed)
    all_images = torch.cat([images, unknown]) if len(unknown) else images
    # all on the host: the validation images may come from the GPU, the unknown ones never do
    unknown_labels = torch.full((len(unknown),), UNKNOWN, dtype=torch.long, device=labels.device)
    all_labels = torch.cat([labels.long(), unknown_labels])
    was_training = pl_module.training
    pl_module.eval()
    try:
        out = _forward(pl_module, all_images, batch_size)
    finally:
        pl_module.train(was_training)
    known = all_labels >= 0
    acc = (out["predictions"][known] == all_labels[known]).double().mean().item() if known.any() else float("nan")
    centers = method_centers(pl_module.method)
    sample = ValidationSample(
        epoch=trainer.current_epoch,
        step=trainer.global_step,
        labels=all_labels,
        predictions=out["predictions"],
        scores=out["scores"],
        embedding=out["embedding"],
        centers=centers,
        images=all_images,
        unknown_source=source,
        n_known=int(known.sum()),
        class_names=_class_names(datamodule, None if centers is None else len(centers)),
        val_acc=acc,
    )
    _CACHE[trainer] = (key, sample)
    return sample


class ValidationCallback(Callback):
    """Shared switches: how often and on how many samples validation views are made.

    Args:
        every_n_epochs: a view every this many epochs (and at the last); 0 = never.
        max_samples: validation images scored (the first of the shuffled hold-out).
        unknown_samples: unknown images scored beside them (see :mod:`mchad.callbacks`).
        noise_seed: seed of the noise images when no outlier set is configured.
        batch_size: batch size of the extra forward passes.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 2000,
        unknown_samples: int = 1000,
        noise_seed: int = 20221,
        batch_size: int = 512,
    ):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = never), got {every_n_epochs}")
        if max_samples < 1 or unknown_samples < 0 or batch_size < 1:
            raise ValueError("max_samples and batch_size must be >= 1 and unknown_samples >= 0")
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.unknown_samples = unknown_samples
        self.noise_seed = noise_seed
        self.batch_size = batch_size

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero or self.every_n_epochs == 0:
            return False
        if trainer.state.fn != "fit":  # trainer.validate(): no epochs to follow
            return False
        if getattr(trainer, "datamodule", None) is None:
            if not getattr(self, "_no_datamodule_logged", False):
                log.info("%s: needs a datamodule (trainer.fit(model, datamodule=...)); skipped", type(self).__name__)
                self._no_datamodule_logged = True
            return False
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return epoch % self.every_n_epochs == 0 or last or bool(trainer.should_stop)

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ValidationSample:
        return validation_sample(
            trainer, pl_module, self.max_samples, self.unknown_samples, self.noise_seed, self.batch_size
        )
