"""The one LightningModule: backbone -> method, for every method and dataset."""

from __future__ import annotations

import logging
from collections import defaultdict
from functools import partial

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from mchad.devices import to_host
from mchad.distributed import gather_rows
from mchad.models.detectors import DetectorBank
from mchad.models.methods import Method, MethodOutput
from mchad.results.metrics import METRIC_COLUMNS, OOD_METRIC_KEYS, case_metrics

log = logging.getLogger(__name__)

#: results.csv columns from pytorch-ood's OODMetrics and the keys they come from
METRIC_KEYS = OOD_METRIC_KEYS


def optimizer_options(factory: partial, device: torch.device) -> dict:
    """Further keyword arguments for the configured optimizer on ``device``: ``fused=True`` on a
    GPU when the optimizer has that option (Adam, AdamW, SGD) and the config chose neither
    ``fused`` nor ``foreach``. torch's default there is ``foreach``, a few dozen kernel
    launches per step; fused is one kernel per parameter group and keeps its step counters on
    the device (no host work per step), with the same update rule."""
    import inspect

    chosen = getattr(factory, "keywords", {})
    optimizer = getattr(factory, "func", factory)
    try:
        takes = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        return {}
    if device.type != "cuda" or "fused" not in takes or {"fused", "foreach"} & set(chosen):
        return {}
    return {"fused": True}


def make_optimizer(factory: partial, params: list[nn.Parameter]):
    """The configured optimizer of ``params`` (with :func:`optimizer_options` for their device)."""
    device = params[0].device if params else torch.device("cpu")  # cpu: no parameters, no device
    return factory(params=params, **optimizer_options(factory, device))


class OODModel(pl.LightningModule):
    """Trains ``method`` on top of ``backbone`` and tests it against every OOD test case.

    Testing takes the ID test set as dataloader 0 and one OOD set per further dataloader; the
    ID scores are computed once and paired with each OOD set. Scores, predictions and labels
    stay on the device until the metrics are computed there (pytorch-ood's ``OODMetrics``).
    After testing, :attr:`test_results` holds one dict per (test case, score) and
    :attr:`test_outputs` the scores, labels (and ID predictions) per set (``"ID"`` and each
    test case) as host tensors (:mod:`mchad.devices`), for callbacks that plot them. ``detectors``
    (a :class:`mchad.models.detectors.DetectorBank`) adds post-hoc detectors' scores after the method's own;
    they are fitted on the training split when testing starts.
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: Method,
        optimizer: partial,
        scheduler: partial | None = None,
        test_case_names: list[str] | None = None,
        detectors: DetectorBank | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.test_case_names = list(test_case_names or [])
        self.detectors = detectors if detectors is not None else DetectorBank([])
        self.test_results: list[dict] = []
        self.test_outputs: dict[str, dict[str, Tensor]] = {}
        self._test_outputs: dict[int, dict[str, list[Tensor]]] = {}
        # per-epoch sums of the loss terms, correct and known predictions (on the device)
        self._train_sums: Tensor | None = None
        self._train_steps = 0
        self._train_keys: list[str] = []
        # the training step's computation; compile_step replaces it with its compiled form
        self._train_terms = self.train_terms

    def forward(self, x: Tensor) -> MethodOutput:
        z = self.backbone(x)
        # distances, losses and scores in float32, also under mixed precision (bf16-mixed)
        with torch.autocast(z.device.type, enabled=False):
            return self.method(z.float())

    def _loss(self, out: MethodOutput, labels: Tensor) -> dict[str, Tensor]:
        with torch.autocast(labels.device.type, enabled=False):
            return self.method.loss(out, labels)

    def train_terms(self, images: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The computation of a training step: the loss terms (``"loss"`` = their weighted sum),
        the number of correctly classified known samples and the number of known samples. One
        graph without breaks and without host synchronisation (tests/test_compile.py,
        tests/test_device_guard.py): :meth:`compile_step` compiles it whole."""
        out = self(images)
        terms = self._loss(out, labels)
        known = labels >= 0
        return terms, ((self.method.predict(out) == labels) & known).sum(), known.sum()

    def compile_step(self, **options) -> None:
        """``torch.compile`` the training step's computation (:meth:`train_terms`: backbone,
        method, loss and accuracy count, forward and backward) with ``options`` (e.g.
        ``mode="reduce-overhead"``: CUDA graphs). Parameters keep their names (checkpoints are
        those of the eager model); validation and testing run eagerly. The optimizer step is
        not compiled: Lightning runs it, fused on a GPU (:func:`optimizer_options`)."""
        self._train_terms = torch.compile(self.train_terms, **options)

    # --- training -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.method.on_train_epoch_start()
        self._train_sums = None
        self._train_steps = 0

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels = batch
        terms, correct, known = self._train_terms(images, labels)
        # Logged as before (train/<term>_step every log_every_n_steps steps, train/<term>_epoch and
        # train/acc per epoch), but summed on the device here and handed to self.log only when
        # logged: each self.log call costs Lightning ~0.5-1 ms of Python, per value and step.
        # No host synchronisation.
        values = torch.stack([*(v.detach().float() for v in terms.values()), correct.float(), known.float()])
        self._train_sums = values if self._train_sums is None else self._train_sums + values
        self._train_steps += 1
        self._train_keys = list(terms)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            n = len(images)
            for k, v in terms.items():
                # a copy: with CUDA graphs (model.compile=reduce-overhead) the next step overwrites the step's outputs
                self.log(f"train/{k}_step", v.detach().clone(), on_step=True, on_epoch=False, batch_size=n)
        return terms["loss"]

    def on_train_epoch_end(self) -> None:
        sums = self._train_sums
        if sums is None:
            return
        # DDP: the sums of all processes (every rank takes the same number of steps); the logged
        # values are then equal on every rank and sync_dist's mean of them changes nothing
        steps = self._train_steps * self.trainer.world_size
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = sums[: len(self._train_keys)] / steps
        for k, v in zip(self._train_keys, means, strict=True):
            self.log(f"train/{k}_epoch", v, on_step=False, on_epoch=True, sync_dist=True)
        self.log(
            "train/acc", sums[-2] / sums[-1].clamp(min=1), on_step=False, on_epoch=True, prog_bar=True, sync_dist=True
        )
        self._train_sums = None

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        out = self(images)
        terms = self._loss(out, labels)
        acc = (self.method.predict(out) == labels).float().mean()
        # sync_dist: Lightning sums value x batch size and the batch sizes over the ranks, i.e.
        # the mean over the whole validation set, as in one process
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.optimizer_factory, [p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        # a period set in the config (the experiments: the published min_epochs *
        # limit_train_batches) is kept; otherwise it spans the whole run
        period = (
            {}
            if "T_max" in getattr(self.scheduler_factory, "keywords", {})
            else {"T_max": max(1, int(self.trainer.estimated_stepping_batches))}
        )
        scheduler = self.scheduler_factory(optimizer, **period)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- testing --------------------------------------------------------------------------
    @property
    def score_names(self) -> list[str]:
        """Every score a test reports: the method's (headline first), then the detectors'."""
        return [*self.method.score_names, *self.detectors.names]

    def on_test_start(self) -> None:
        """Fit the post-hoc detectors on the training split (the model is on its device, in eval mode)."""
        self.fit_detectors()

    def fit_detectors(self) -> None:
        """Fit the post-hoc detectors on the training split (also before the validation
        objective when it scores a detector, ``objective.score``)."""
        if not len(self.detectors):
            return
        datamodule = self.trainer.datamodule
        train = datamodule.data["train"]
        self.detectors.fit(
            self,
            self.method,
            train.images,
            train.labels,
            lambda images: datamodule.transform(images, augment=False),
            self.device,
            datamodule.test_batch_size,
        )

    def on_test_epoch_start(self) -> None:
        self._test_outputs = defaultdict(lambda: defaultdict(list))
        self.test_results = []

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        out = self(images)
        buffer = self._test_outputs[dataloader_idx]
        scores = self.method.scores(out)
        if len(self.detectors):
            scores.update(self.detectors.scores(self.method, out))
        for name, score in scores.items():
            buffer[name].append(score.float())
        buffer["labels"].append(labels)
        if dataloader_idx == 0:
            buffer["predictions"].append(self.method.predict(out))

    def _joined_test_outputs(self) -> dict[int, dict[str, Tensor]]:
        """Per test dataloader the scores, labels (and ID predictions) of the whole set: in DDP
        every rank scored its contiguous part, joined here in rank order on every rank."""
        local = {i: {k: torch.cat(v) for k, v in d.items()} for i, d in self._test_outputs.items()}
        self._test_outputs = {}
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size == 1:
            return local
        # a rank whose part of a set was empty has no entry: every rank must join every tensor
        n_sets = len(self.test_case_names) + 1
        keys = {name: torch.float32 for name in self.score_names}
        keys["labels"] = torch.long
        joined = {}
        for index in range(n_sets):
            mine = local.get(index, {})
            names = {**keys, "predictions": torch.long} if index == 0 else keys
            joined[index] = {
                key: gather_rows(
                    self.trainer.strategy,
                    mine[key] if key in mine else torch.empty(0, dtype=dtype, device=self.device),
                )
                for key, dtype in names.items()
            }
        return {i: d for i, d in joined.items() if len(d["labels"])}

    def on_test_epoch_end(self) -> None:
        outputs = self._joined_test_outputs()
        ind = outputs.get(0)
        if ind is None:
            raise RuntimeError("the ID test set (test dataloader 0) produced no batches")
        accuracy = (ind["predictions"] == ind["labels"]).double().mean().item()
        self.log("test/acc", accuracy, sync_dist=True)
        names = self.test_case_names or [f"ood{i}" for i in range(1, len(outputs))]
        # handed to the plotting callbacks: on the host, like everything leaving the device
        self.test_outputs = to_host({"ID": ind, **{case: outputs[i] for i, case in enumerate(names, start=1)}})
        for index, case in enumerate(names, start=1):
            ood = outputs[index]
            for score in self.score_names:
                row = {"test_case": case, "score": score}
                row.update(case_metrics(ind[score], ind["labels"], ind["predictions"], ood[score]))
                self.test_results.append(row)
                for column in METRIC_COLUMNS[1:]:
                    # equal on every rank (computed from the joined scores): sync_dist is a no-op
                    self.log(f"test/{case}/{score}/{column}", row[column], sync_dist=True)
        for name, seconds in self.detectors.seconds.items():
            # DDP: each rank's own seconds, their mean logged
            self.log(f"test/seconds/{name}", seconds, sync_dist=True)
        if self.detectors.seconds:
            log.info(
                "Detector seconds (fit + scoring): %s",
                ", ".join(f"{name} {seconds:.3f}" for name, seconds in self.detectors.seconds.items()),
            )
