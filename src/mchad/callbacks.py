"""Lightning callbacks that show what the hypersphere methods learn.

Configured in ``config/callbacks/default.yaml``; each one can be switched off on the
command line (``~callbacks.embedding_animation``) and works with any :class:`~mchad.methods.Method`:

:class:`ValidationViews`
    At every validation: TensorBoard histograms of the OOD score (the distance to the
    nearest centre where the method has one, ``method.scores(out)["distance"]``, else its
    first score) of known vs. unknown samples, and the AUROC between them
    (``val/unknown/<score>/AUROC``). At the end of training: the validation embeddings with
    their labels in the TensorBoard projector and an image of the two score distributions.
:class:`EmbeddingAnimation`
    With a 2-D embedding and a method with centres: one scatter plot per epoch of the
    validation embeddings, the centres and the radius/margin circles
    (``<run>/plots/embedding/epoch_XXX.png``, shared axis limits), assembled into
    ``<run>/embedding.gif`` at the end of training.
:class:`TestCasePlots`
    After testing: per test case and score, the ID vs. OOD score histogram and the ROC curve
    (``<run>/plots/<case>_<score>_hist.png`` / ``_roc.png``), also as TensorBoard images.
:class:`HyperparameterLogger`
    After testing: the resolved configuration, flattened (``model.weight_center``, ...), as
    TensorBoard hyperparameters with the key metrics (``hp/...``) for the HPARAMS tab.

**Unknown samples at validation.** The validation set is a hold-out of the ID training set
and has no unknown samples; the test sets must never be looked at before testing. The
callbacks therefore score their own small, fixed set of unknown images, never a test set:
the outlier-exposure set (``datamodule.outliers``, i.e. G-MCHAD's training outliers) when
one is configured, otherwise noise images of the ID image shape (half Gaussian, mean 128 and
std 128 clipped, half uniform on [0, 255]) drawn with their own seed (``noise_seed``, not the
seed of the noise test cases). The same images are used at every epoch. The noise is of the
kind of two test cases' distributions (not the same images): use the validation AUROC to
watch training, not to select models for the noise test cases.

The callbacks sample the validation set themselves (the first ``max_samples`` images of the
hold-out, which is already in random order), run the model in eval mode without gradients
and use their own random generators: training is unchanged by them. Plots are rendered with
:mod:`mchad.plots` (Agg canvas, no display). Only the global-zero process writes.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from mchad import plots
from mchad.devices import to_host

log = logging.getLogger(__name__)

__all__ = [
    "ValidationViews",
    "EmbeddingAnimation",
    "TestCasePlots",
    "HyperparameterLogger",
    "sphere_geometry",
    "headline_score",
    "unknown_images",
    "flatten_config",
]

#: label of the unknown samples scored at validation
UNKNOWN = -1

#: the latest validation sample per trainer (shared by the callbacks of one run)
_CACHE: "weakref.WeakKeyDictionary[pl.Trainer, tuple[tuple, ValidationSample]]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- helpers


def headline_score(scores: dict[str, Any]) -> str:
    """The score to show: ``distance`` (nearest centre) when the method has it, else its first."""
    if not scores:
        raise ValueError("the method reports no scores")
    return "distance" if "distance" in scores else next(iter(scores))


def method_centers(method: torch.nn.Module) -> Tensor | None:
    """``method.centers`` as a ``(C, D)`` host tensor, or ``None`` for methods without centres."""
    centers = getattr(method, "centers", None)
    if not isinstance(centers, Tensor) or centers.ndim != 2:
        return None
    return to_host(centers).float().clone()


def sphere_geometry(method: torch.nn.Module) -> dict[str, Any]:
    """Arguments ``radius``, ``margin``, ``squared`` of :func:`mchad.plots.embedding_frame`.

    Radius ``r``, margin ``m`` and the ``semantics`` are read from the method's push term
    (``method.push``, an :class:`~mchad.losses.OutlierPush`), from ``method.terms`` or from the
    method itself, whichever has them:

    - ``published``: ``r`` bounds the squared distance of known samples (``max(0, d - r)``)
      and outliers are pushed until the squared distance reaches ``m`` (``m^2 - d^2``): circles
      of radius ``sqrt(r)`` and ``sqrt(m)`` (``squared=True``);
    - ``paper``: ``r`` is a Euclidean radius and outliers are pushed beyond ``r + m``:
      circles of radius ``r`` and ``r + m`` (``squared=False``).

    Methods without these attributes get no circles (radius 0, no margin); Center and CAC
    have no radius (0) and draw the margin of their push term when it is > 0.
    """
    holder = None
    for candidate in (getattr(method, "terms", None), getattr(method, "push", None), method):
        if candidate is not None and hasattr(candidate, "margin") and hasattr(candidate, "radius"):
            holder = candidate
            break
    if holder is None:
        return {"radius": 0.0, "margin": None, "squared": True}
    radius = float(getattr(holder, "radius", 0.0) or 0.0)
    margin = float(getattr(holder, "margin", 0.0) or 0.0)
    if getattr(holder, "semantics", "published") == "paper":
        return {"radius": radius, "margin": radius + margin if margin > 0 else None, "squared": False}
    return {"radius": radius, "margin": margin if margin > 0 else None, "squared": True}


def unknown_images(datamodule: Any, shape: tuple[int, ...], dtype: torch.dtype, n: int, seed: int) -> tuple[Tensor, str]:
    """``n`` unknown images for validation and where they come from (never a test set), on
    the host (:mod:`mchad.devices`).

    The outlier-exposure set (``datamodule.outliers``) if there is one (a fixed-seed subset),
    else noise of the ID image ``shape`` (half Gaussian, half uniform, see the module docs).
    """
    rng = np.random.default_rng(seed)
    outliers = getattr(datamodule, "outliers", None)
    images = getattr(outliers, "images", None)
    if isinstance(images, Tensor) and len(images) > 0 and tuple(images.shape[1:]) == tuple(shape):
        index = rng.choice(len(images), size=min(n, len(images)), replace=False)
        index = torch.from_numpy(np.sort(index))  # cpu: indexes the host copy below
        return to_host(images)[index].clone(), "outliers"
    n_gauss = n // 2
    gauss = np.clip(rng.normal(128, 128, size=(n_gauss, *shape)), 0, 255)
    uniform = rng.uniform(0, 255, size=(n - n_gauss, *shape))
    values = np.concatenate([gauss, uniform])
    if dtype == torch.uint8:
        return torch.from_numpy(values.astype(np.uint8)), "noise"  # cpu: host images, see mchad.devices
    return torch.from_numpy(values / 255.0).to(dtype), "noise"  # cpu: host images, see mchad.devices


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a resolved config) -> ``{"model.weight_center": 10.0, ...}``.

    Lists become strings; ``None`` becomes ``"None"``; the ``hydra`` subtree is dropped.
    """
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if not prefix and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _tensorboard(trainer: pl.Trainer) -> Any | None:
    """The SummaryWriter of the trainer's TensorBoardLogger, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def _image_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _auroc(known: Tensor, unknown: Tensor) -> float:
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


# ----------------------------------------------------------------------------- validation sample


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
    loader = datamodule.val_dataloader()
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
            for name, value in method.scores(out).items():
                scores.setdefault(name, []).append(to_host(value).float())
            predictions.append(to_host(method.predict(out)))
            if isinstance(out.get("embedding"), Tensor):
                embeddings.append(to_host(out["embedding"]).float())
    return {
        "scores": {k: torch.cat(v) for k, v in scores.items()},
        "predictions": torch.cat(predictions),
        "embedding": torch.cat(embeddings) if embeddings else None,
    }


def validation_sample(
    trainer: pl.Trainer, pl_module: pl.LightningModule, max_samples: int, unknown_samples: int, noise_seed: int, batch_size: int
) -> ValidationSample:
    """Score the first ``max_samples`` validation images and ``unknown_samples`` unknown ones.

    Cached per trainer and (epoch, step, settings), so callbacks with the same settings
    share one pass. The module is put in eval mode for the pass and restored afterwards.
    """
    key = (trainer.current_epoch, trainer.global_step, max_samples, unknown_samples, noise_seed)
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


class _ValidationCallback(Callback):
    """Shared switches: how often and on how many samples validation views are made."""

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


# ----------------------------------------------------------------------------- TensorBoard views


class ValidationViews(_ValidationCallback):
    """TensorBoard views at validation: known vs. unknown score histograms and AUROC;
    at the end of training the embeddings in the projector and a histogram image.

    Args:
        every_n_epochs: histograms every this many epochs (and at the last); 0 = never.
        max_samples: validation images scored (the first of the shuffled hold-out).
        unknown_samples: unknown images scored beside them (see the module docs).
        noise_seed: seed of the noise images when no outlier set is configured.
        batch_size: batch size of the extra forward passes.
        log_auroc: log ``val/unknown/<score>/AUROC`` (known vs. unknown) as a metric.
        histogram_image: at the end of training, log an image of the two score histograms.
        projector: at the end of training, add the embeddings to the TensorBoard projector.
        projector_max_points: at most this many points in the projector (fixed-seed subset).
        projector_images: add the images as the projector's sprite thumbnails.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_samples: int = 2000,
        unknown_samples: int = 1000,
        noise_seed: int = 20221,
        batch_size: int = 512,
        log_auroc: bool = True,
        histogram_image: bool = True,
        projector: bool = True,
        projector_max_points: int = 2000,
        projector_images: bool = True,
    ):
        super().__init__(every_n_epochs, max_samples, unknown_samples, noise_seed, batch_size)
        self.log_auroc = log_auroc
        self.histogram_image = histogram_image
        self.projector = projector
        self.projector_max_points = projector_max_points
        self.projector_images = projector_images
        self.last: ValidationSample | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        sample = self._sample(trainer, pl_module)
        self.last = sample
        known = sample.known
        writer = _tensorboard(trainer)
        for name, score in sample.scores.items():
            if writer is not None:
                for part, mask in (("known", known), ("unknown", ~known)):
                    values = score[mask]
                    values = values[torch.isfinite(values)]
                    if len(values):
                        writer.add_histogram(f"val/{name}_{part}", values, global_step=trainer.global_step)
            if self.log_auroc and sample.n_known and (~known).any():
                auroc = _auroc(score[known], score[~known])
                if math.isfinite(auroc):
                    pl_module.log(f"val/unknown/{name}/AUROC", auroc)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not (self.projector or self.histogram_image) or self.every_n_epochs == 0:
            return
        sample = self.last
        if sample is None or sample.step != trainer.global_step:
            if getattr(trainer, "datamodule", None) is None:
                return
            sample = self._sample(trainer, pl_module)
        writer = _tensorboard(trainer)
        if self.histogram_image:
            name = sample.score_name
            path = _run_dir(trainer) / "plots" / f"val_{name}_hist.png"
            known = sample.known
            try:
                plots.distance_histogram(
                    sample.scores[name][known],
                    sample.scores[name][~known],
                    path,
                    title=f"validation, epoch {sample.epoch}: known (ID) vs. unknown ({sample.unknown_source})",
                    score_name=f"{name} score (larger = more anomalous)",
                )
                if writer is not None:
                    writer.add_image(f"val/{name}_hist", _image_array(path), trainer.global_step, dataformats="HWC")
            except ValueError as error:  # e.g. no finite score
                log.warning("validation histogram not drawn: %s", error)
        if self.projector and writer is not None:
            self._add_embedding(writer, sample, trainer.global_step)

    def _add_embedding(self, writer: Any, sample: ValidationSample, step: int) -> None:
        if sample.embedding is None:
            log.info("projector: the method returns no embedding; skipped")
            return
        n = len(sample.labels)
        index = np.arange(n)
        if n > self.projector_max_points:
            index = np.sort(np.random.default_rng(0).choice(n, size=self.projector_max_points, replace=False))
        idx = torch.from_numpy(index)  # cpu: indexes the host sample
        names = sample.class_names
        score_name = sample.score_name
        metadata = []
        for i in index:
            label = int(sample.labels[i])
            pred = int(sample.predictions[i])
            text = f"unknown ({sample.unknown_source})" if label < 0 else (names[label] if names else str(label))
            pred_text = names[pred] if names and 0 <= pred < len(names) else str(pred)
            kind = "unknown" if label < 0 else "known"
            metadata.append([text, kind, pred_text, f"{float(sample.scores[score_name][i]):.4g}"])
        label_img = None
        if self.projector_images:
            images = sample.images[idx]
            label_img = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        writer.add_embedding(
            sample.embedding[idx],
            metadata=metadata,
            metadata_header=["label", "kind", "prediction", score_name],
            label_img=label_img,
            global_step=step,
            tag="val_embedding",
        )
        log.info("projector: %d validation embeddings (dim %d) added", len(index), sample.embedding.shape[1])


# ----------------------------------------------------------------------------- 2-D animation


class EmbeddingAnimation(_ValidationCallback):
    """2-D embeddings with centres and hyperspheres per epoch, and their animation.

    Active only when the embedding has 2 dimensions and the method has centres
    (``model.n_embedding=2``); otherwise it does nothing. Each frame
    ``<dirpath>/epoch_XXX.png`` is written right after its validation with axis limits that
    are fixed from the first frame (padded) and only ever expand; at the end of training the
    frames drawn with other limits than the final ones are redrawn, so every frame of
    ``gif_path`` shares the same axes. Circles follow the method's semantics (see
    :func:`sphere_geometry`). Unknown validation samples (see the module docs) are drawn
    grey when ``show_unknown``.

    Args:
        dirpath: folder of the frames (default ``<run>/plots/embedding``).
        gif_path: the animation (default ``<run>/embedding.gif``); ``None`` with
            ``gif: false`` writes no GIF.
        every_n_epochs: a frame every this many epochs (and at the last); 0 = never.
        max_points: at most this many known points per frame (fixed subset).
        max_unknown_points: at most this many unknown points per frame.
        show_unknown: draw the unknown samples.
        frame_duration_ms: display time of a frame in the GIF.
        pad: padding of the axis limits, a fraction of the span.
        gif: assemble the GIF at the end of training.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        gif_path: str | None = None,
        every_n_epochs: int = 1,
        max_samples: int = 2000,
        unknown_samples: int = 1000,
        noise_seed: int = 20221,
        batch_size: int = 512,
        max_points: int = 3000,
        max_unknown_points: int = 500,
        show_unknown: bool = True,
        frame_duration_ms: int = 300,
        pad: float = 0.15,
        gif: bool = True,
    ):
        super().__init__(every_n_epochs, max_samples, unknown_samples, noise_seed, batch_size)
        self.dirpath = dirpath
        self.gif_path = gif_path
        self.max_points = max_points
        self.max_unknown_points = max_unknown_points
        self.show_unknown = show_unknown
        self.frame_duration_ms = frame_duration_ms
        self.pad = pad
        self.gif = gif
        self.limits: tuple[float, float, float, float] | None = None
        # epoch -> (frame path, data to redraw it, limits it was drawn with)
        self.frames: dict[int, tuple[Path, dict[str, Any], tuple[float, float, float, float]]] = {}
        self._warned = False

    def _frame_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else _run_dir(trainer) / "plots" / "embedding"

    def _gif_file(self, trainer: pl.Trainer) -> Path:
        return Path(self.gif_path) if self.gif_path else _run_dir(trainer) / "embedding.gif"

    def _active(self, pl_module: pl.LightningModule, sample: ValidationSample | None = None) -> bool:
        reason = None
        if method_centers(pl_module.method) is None:
            reason = f"{type(pl_module.method).__name__} has no centres"
        elif sample is not None and (sample.embedding is None or sample.embedding.shape[1] != 2):
            dim = None if sample.embedding is None else sample.embedding.shape[1]
            reason = f"the embedding has {dim} dimensions, not 2 (model.n_embedding=2)"
        elif method_centers(pl_module.method).shape[1] != 2:
            reason = f"the centres have {method_centers(pl_module.method).shape[1]} dimensions, not 2"
        if reason and not self._warned:
            log.info("embedding animation off: %s", reason)
            self._warned = True
        return reason is None

    def _frame_data(self, sample: ValidationSample, pl_module: pl.LightningModule) -> dict[str, Any]:
        known = sample.known
        index = plots._subsample_indices(int(known.sum()), self.max_points)
        emb_known = sample.embedding[known][index]
        lab_known = sample.labels[known][index]
        parts_emb, parts_lab = [emb_known], [lab_known]
        if self.show_unknown and (~known).any():
            n_unknown = int((~known).sum())
            index = plots._subsample_indices(n_unknown, self.max_unknown_points)
            parts_emb.append(sample.embedding[~known][index])
            parts_lab.append(sample.labels[~known][index])
        geometry = sphere_geometry(pl_module.method)
        if not geometry["radius"]:
            geometry["radius"] = None  # no circle, no legend entry
        name = sample.score_name
        auroc = _auroc(sample.scores[name][known], sample.scores[name][~known])
        title = f"epoch {sample.epoch:3d}   val acc {sample.val_acc:.3f}"
        if math.isfinite(auroc):
            title += f"   AUROC vs {sample.unknown_source} {auroc:.3f}"
        return {
            "embeddings": torch.cat(parts_emb).numpy(),
            "labels": torch.cat(parts_lab).numpy(),
            "centers": sample.centers.numpy(),
            "title": title,
            "class_names": sample.class_names,
            **geometry,
        }

    def _limits_for(self, data: dict[str, Any]) -> tuple[float, float, float, float]:
        return plots.axis_limits(
            data["embeddings"], data["centers"], data["radius"], pad=0.0, margin=data["margin"], squared=data["squared"]
        )

    def _expand(self, needed: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Limits that contain ``needed``: the current ones if they do, else the union, padded."""
        if self.limits is not None:
            x0, x1, y0, y1 = self.limits
            if needed[0] >= x0 and needed[1] <= x1 and needed[2] >= y0 and needed[3] <= y1:
                return self.limits
            needed = (min(x0, needed[0]), max(x1, needed[1]), min(y0, needed[2]), max(y1, needed[3]))
        # square limits (equal spans, centred): the axes keep an equal aspect for the circles
        span = max(needed[1] - needed[0], needed[3] - needed[2], 1e-6) * (1 + 2 * self.pad)
        cx, cy = (needed[0] + needed[1]) / 2, (needed[2] + needed[3]) / 2
        return (cx - span / 2, cx + span / 2, cy - span / 2, cy + span / 2)

    def _draw(self, path: Path, data: dict[str, Any], limits: tuple[float, float, float, float]) -> Path:
        return plots.embedding_frame(
            data["embeddings"],
            data["labels"],
            data["centers"],
            data["radius"],
            data["margin"],
            path,
            title=data["title"],
            limits=limits,
            squared=data["squared"],
            max_points=None,  # subsampled already (known and unknown separately)
            class_names=data["class_names"],
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer) or not self._active(pl_module):
            return
        sample = self._sample(trainer, pl_module)
        if not self._active(pl_module, sample):
            return
        data = self._frame_data(sample, pl_module)
        finite = np.isfinite(data["embeddings"]).all(axis=1)
        if not finite.all():
            log.warning("embedding animation: %d non-finite embeddings at epoch %d not drawn", (~finite).sum(), sample.epoch)
            data["embeddings"], data["labels"] = data["embeddings"][finite], data["labels"][finite]
        self.limits = self._expand(self._limits_for(data))
        path = self._frame_dir(trainer) / f"epoch_{sample.epoch:03d}.png"
        self._draw(path, data, self.limits)
        self.frames[sample.epoch] = (path, data, self.limits)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.frames:
            return
        stale = [e for e, (_, _, lim) in self.frames.items() if lim != self.limits]
        if stale:
            log.info("embedding animation: redrawing %d of %d frames with the final axis limits", len(stale), len(self.frames))
            self._progress_loop(stale, lambda e: self._redraw(e))
        if not self.gif:
            return
        folder = self._frame_dir(trainer)
        # every frame of this run, plus those on disk from before a resume
        paths = sorted({*folder.glob("epoch_*.png"), *(p for p, _, _ in self.frames.values())})
        log.info("embedding animation: assembling %d frames", len(paths))
        gif = plots.assemble_gif(paths, self._gif_file(trainer), duration_ms=self.frame_duration_ms)
        log.info("embedding animation: %s", gif)

    def _redraw(self, epoch: int) -> None:
        path, data, _ = self.frames[epoch]
        self._draw(path, data, self.limits)
        self.frames[epoch] = (path, data, self.limits)

    @staticmethod
    def _progress_loop(items: list[int], fn) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        iterator = tqdm(items, desc="redrawing frames", unit="frame", leave=False) if tqdm and len(items) > 10 else items
        for item in iterator:
            fn(item)


# ----------------------------------------------------------------------------- test plots


class TestCasePlots(Callback):
    """After testing, per test case and score: ID vs. OOD histogram and ROC curve (PNG).

    Reads ``pl_module.test_outputs`` (``{"ID": {...}, <case>: {...}}``). Files:
    ``<dirpath>/<case>_<score>_hist.png`` and ``_roc.png`` (``dirpath`` default ``<run>/plots``);
    with ``log_images`` they are also TensorBoard images ``test/<case>/<score>/hist|roc``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, dirpath: str | None = None, log_images: bool = True, bins: int = 60):
        self.dirpath = dirpath
        self.log_images = log_images
        self.bins = bins

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        outputs = getattr(pl_module, "test_outputs", None) or {}
        ind = outputs.get("ID")
        if ind is None:
            log.info("test plots: the module kept no test outputs; skipped")
            return
        folder = Path(self.dirpath) if self.dirpath else _run_dir(trainer) / "plots"
        score_names = list(getattr(pl_module.method, "score_names", ())) or [
            k for k in ind if k not in ("labels", "predictions")
        ]
        writer = _tensorboard(trainer) if self.log_images else None
        written = []
        for case, values in outputs.items():
            if case == "ID":
                continue
            for score in score_names:
                if score not in ind or score not in values:
                    continue
                id_scores, ood_scores = ind[score], values[score]
                stem = f"{case}_{score}"
                for kind in ("hist", "roc"):
                    path = folder / f"{stem}_{kind}.png"
                    try:  # e.g. all scores NaN: warn, go on with the other plots
                        if kind == "hist":
                            plots.distance_histogram(
                                id_scores,
                                ood_scores,
                                path,
                                title=f"{case}: ID test set vs. OOD",
                                score_name=f"{score} score (larger = more anomalous)",
                                bins=self.bins,
                            )
                        else:
                            plots.roc_curve_plot(id_scores, ood_scores, path, title=f"{case}, {score}")
                    except ValueError as error:
                        log.warning("test plots: no %s plot for %s/%s: %s", kind, case, score, error)
                        continue
                    written.append(path)
                    if writer is not None:
                        writer.add_image(f"test/{case}/{score}/{kind}", _image_array(path), trainer.global_step, dataformats="HWC")
        log.info("test plots: %d images in %s", len(written), folder)


# ----------------------------------------------------------------------------- hyperparameters


class HyperparameterLogger(Callback):
    """After testing: the flattened, resolved config and key metrics for TensorBoard's HPARAMS tab.

    The config is read from ``config_file`` (the run's ``config.yaml`` written by
    :func:`mchad.train.run`, default ``<run>/config.yaml``). Metrics, logged under ``hp/`` so
    they do not mix with the training curves: ``hp/val_acc`` (last validation),
    ``hp/test_acc`` and, per score, the mean over the test cases of AUROC and FPR95
    (``hp/<score>/AUROC``, ``hp/<score>/FPR95``).
    """

    def __init__(self, config_file: str | None = None):
        self.config_file = config_file
        self.val_acc: float | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/acc")
        if value is not None:
            self.val_acc = float(value)

    def params(self, trainer: pl.Trainer) -> dict[str, Any]:
        from omegaconf import OmegaConf

        path = Path(self.config_file) if self.config_file else _run_dir(trainer) / "config.yaml"
        if not path.is_file():
            log.warning("hparams: no config at %s; only metrics logged", path)
            return {}
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        return flatten_config(cfg)

    def metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.val_acc is not None:
            metrics["hp/val_acc"] = self.val_acc
        rows = getattr(pl_module, "test_results", None) or []
        if rows:
            metrics["hp/test_acc"] = float(rows[0]["Accuracy"])
        by_score: dict[str, list[dict]] = {}
        for row in rows:
            by_score.setdefault(row["score"], []).append(row)
        for score, group in by_score.items():
            for column in ("AUROC", "FPR95"):
                values = [float(r[column]) for r in group if column in r]
                if values:
                    metrics[f"hp/{score}/{column}"] = float(np.mean(values))
        return metrics

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = self.params(trainer)
        metrics = self.metrics(pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if metrics:
                    logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
                else:
                    logger.log_hyperparams(params)
        log.info("hparams: %d parameters, metrics %s", len(params), metrics)
