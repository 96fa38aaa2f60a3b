"""After testing: per test case and score, the ID vs. OOD histogram and the ROC curve."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from mchad.callbacks.outputs import image_array, run_dir, tensorboard_writer
from mchad.results import plots

log = logging.getLogger(__name__)


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
        folder = Path(self.dirpath) if self.dirpath else run_dir(trainer) / "plots"
        score_names = list(getattr(pl_module.method, "score_names", ())) or [
            k for k in ind if k not in ("labels", "predictions")
        ]
        writer = tensorboard_writer(trainer) if self.log_images else None
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
                        writer.add_image(
                            f"test/{case}/{score}/{kind}", image_array(path), trainer.global_step, dataformats="HWC"
                        )
        log.info("test plots: %d images in %s", len(written), folder)
