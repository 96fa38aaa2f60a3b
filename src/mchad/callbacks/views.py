"""TensorBoard views at validation: known vs. unknown score histograms and AUROC; at the end of
training the validation embeddings in the projector and a histogram image."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from mchad.callbacks.outputs import image_array, run_dir, tensorboard_writer
from mchad.callbacks.sample import ValidationCallback, ValidationSample, known_vs_unknown_auroc
from mchad.results import plots

log = logging.getLogger(__name__)

# In DDP Lightning recommends sync_dist for every epoch-level value, also for those logged by
# rank 0 alone with rank_zero_only=True (the validation views), where a sync would hang.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/unknown/")


class ValidationViews(ValidationCallback):
    """TensorBoard views at validation: known vs. unknown score histograms and AUROC;
    at the end of training the embeddings in the projector and a histogram image.

    Args (and the sampling settings of :class:`~mchad.callbacks.sample.ValidationCallback`;
    ``every_n_epochs``: histograms every this many epochs):
        log_auroc: log ``val/unknown/<score>/AUROC`` (known vs. unknown) as a metric.
        histogram_image: at the end of training, log an image of the two score histograms.
        projector: at the end of training, add the embeddings to the TensorBoard projector.
        projector_max_points: at most this many points in the projector (fixed-seed subset).
        projector_images: add the images as the projector's sprite thumbnails.
    """

    def __init__(
        self,
        log_auroc: bool = True,
        histogram_image: bool = True,
        projector: bool = True,
        projector_max_points: int = 2000,
        projector_images: bool = True,
        **sampling: Any,
    ):
        super().__init__(**sampling)
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
        writer = tensorboard_writer(trainer)
        for name, score in sample.scores.items():
            if writer is not None:
                for part, mask in (("known", known), ("unknown", ~known)):
                    values = score[mask]
                    values = values[torch.isfinite(values)]
                    if len(values):
                        writer.add_histogram(f"val/{name}_{part}", values, global_step=trainer.global_step)
            if self.log_auroc and sample.n_known and (~known).any():
                auroc = known_vs_unknown_auroc(score[known], score[~known])
                if math.isfinite(auroc):
                    # rank 0 alone scores the sample (in DDP too): rank_zero_only tells Lightning
                    pl_module.log(f"val/unknown/{name}/AUROC", auroc, rank_zero_only=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not (self.projector or self.histogram_image) or self.every_n_epochs == 0:
            return
        sample = self.last
        if sample is None or sample.step != trainer.global_step:
            if getattr(trainer, "datamodule", None) is None:
                return
            sample = self._sample(trainer, pl_module)
        writer = tensorboard_writer(trainer)
        if self.histogram_image:
            name = sample.score_name
            path = run_dir(trainer) / "plots" / f"val_{name}_hist.png"
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
                    writer.add_image(f"val/{name}_hist", image_array(path), trainer.global_step, dataformats="HWC")
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
