"""The 2-D embedding with its centres and hyperspheres per epoch, and its animation (GIF)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from mchad.callbacks.outputs import run_dir
from mchad.callbacks.sample import ValidationCallback, ValidationSample, known_vs_unknown_auroc, method_centers
from mchad.models.methods import Method
from mchad.results import plots

log = logging.getLogger(__name__)


def sphere_geometry(method: Method) -> dict[str, Any]:
    """Arguments ``radius``, ``margin``, ``squared`` of :func:`mchad.results.plots.embedding_frame`,
    from what the method says it can draw (:meth:`~mchad.models.methods.Method.geometry`):

    - ``published``: ``r`` bounds the squared distance of known samples (``max(0, d - r)``)
      and outliers are pushed until the squared distance reaches ``m`` (``m^2 - d^2``): circles
      of radius ``sqrt(r)`` and ``sqrt(m)`` (``squared=True``);
    - ``paper``: ``r`` is a Euclidean radius and outliers are pushed beyond ``r + m``:
      circles of radius ``r`` and ``r + m`` (``squared=False``).

    Radius 0 draws no circle, margin 0 no margin circle (Center and CAC: no radius, their push
    term's margin when > 0; II and Softmax: none).
    """
    geometry = method.geometry()
    radius, margin = float(geometry.radius), float(geometry.margin)
    if geometry.semantics == "paper":
        return {"radius": radius, "margin": radius + margin if margin > 0 else None, "squared": False}
    return {"radius": radius, "margin": margin if margin > 0 else None, "squared": True}


class EmbeddingAnimation(ValidationCallback):
    """2-D embeddings with centres and hyperspheres per epoch, and their animation.

    Active only when the embedding has 2 dimensions and the method has centres
    (``model.n_embedding=2``); otherwise it does nothing. Each frame
    ``<dirpath>/epoch_XXX.png`` is written right after its validation with axis limits that
    are fixed from the first frame (padded) and only ever expand; at the end of training the
    frames drawn with other limits than the final ones are redrawn, so every frame of
    ``gif_path`` shares the same axes. Circles follow the method's semantics (see
    :func:`sphere_geometry`). Unknown validation samples (see the module docs) are drawn
    grey when ``show_unknown``.

    Args (and the sampling settings of :class:`~mchad.callbacks.sample.ValidationCallback`;
    ``every_n_epochs``: a frame every this many epochs):
        dirpath: folder of the frames (default ``<run>/plots/embedding``).
        gif_path: the animation (default ``<run>/embedding.gif``); ``None`` with
            ``gif: false`` writes no GIF.
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
        max_points: int = 3000,
        max_unknown_points: int = 500,
        show_unknown: bool = True,
        frame_duration_ms: int = 300,
        pad: float = 0.15,
        gif: bool = True,
        **sampling: Any,
    ):
        super().__init__(**sampling)
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
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "plots" / "embedding"

    def _gif_file(self, trainer: pl.Trainer) -> Path:
        return Path(self.gif_path) if self.gif_path else run_dir(trainer) / "embedding.gif"

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
        auroc = known_vs_unknown_auroc(sample.scores[name][known], sample.scores[name][~known])
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
            log.warning(
                "embedding animation: %d non-finite embeddings at epoch %d not drawn", (~finite).sum(), sample.epoch
            )
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
            log.info(
                "embedding animation: redrawing %d of %d frames with the final axis limits",
                len(stale),
                len(self.frames),
            )
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
        iterator = (
            tqdm(items, desc="redrawing frames", unit="frame", leave=False) if tqdm and len(items) > 10 else items
        )
        for item in iterator:
            fn(item)
