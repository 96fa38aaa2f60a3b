"""Post-hoc OOD detectors of pytorch-ood on any trained method: ``detectors=[energy,knn,...]``.

Each detector scores the test sets from what the method computes anyway (one forward pass):

- **logits detectors** (``energy``, ``maxlogit``, ``entropy``, ``gen``) read the method's logits:
  the linear classifier's (Softmax, Center, G-Center) or, for methods without one, the negated
  squared distances to the class centres ``-d`` (MCHAD, G-MCHAD, CAC, G-CAC, II);
- **feature detectors** (``mahalanobis``, ``rmd``, ``knn``, ``she``, ``vim``, ``dice``) read the
  features that the classifier or the centres act on (the embedding; II: after its BatchNorm);
  ``she`` predicts the class with those logits; ``vim`` and ``dice`` need the weights of a
  linear classifier and are refused for methods without one.

Detectors that need fitting (``mahalanobis``, ``rmd``, ``knn``, ``she``, ``vim``, ``dice``) are
fitted on a seeded subset of the **training split** (never the validation hold-out or a test
set), without augmentation, right before testing. Not offered: ReAct, ASH and SCALE act on the
backbone's rectified activations before its embedding layer, MultiMahalanobis on several
layers, ODIN and the gradient-based ones need gradients of the input; none of these is
what a method here exposes.

Every score is an outlier score, larger = more anomalous (pytorch-ood's convention).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pytorch_ood import detector as ood
from pytorch_ood.api import Detector
from torch import Tensor

from mchad.errors import ConfigError
from mchad.models.methods import Method, MethodOutput

log = logging.getLogger(__name__)

LOGITS, FEATURES = "logits", "features"


@dataclass(frozen=True)
class Spec:
    """How a pytorch-ood detector is made from a trained method and what it reads."""

    cls: type[Detector]
    reads: str  # LOGITS or FEATURES
    # constructor arguments taken from the method: (method, feature width) -> kwargs
    from_method: Callable[[Method, int], dict] = lambda method, width: {}
    needs_linear_head: bool = False
    # scikit-learn's nearest neighbours fit on host memory
    fit_on_host: bool = False

    @property
    def fitted(self) -> bool:
        return bool(self.cls.requires_fit)


def _linear_head(method: Method, width: int) -> dict:
    head = method.linear_head
    return {"w": head.weight.detach(), "b": head.bias.detach()}


def _vim(method: Method, width: int) -> dict:
    # the principal subspace's dimension d defaults to half the feature width
    return {**_linear_head(method, width), "d": width // 2}


def _dice(method: Method, width: int) -> dict:
    # the DICE paper's sparsity for CIFAR (90 % of the weight contributions dropped)
    return {**_linear_head(method, width), "p": 0.9}


SPECS: dict[str, Spec] = {
    "energy": Spec(ood.EnergyBased, LOGITS),
    "maxlogit": Spec(ood.MaxLogit, LOGITS),
    "entropy": Spec(ood.Entropy, LOGITS),
    "gen": Spec(ood.GEN, LOGITS),
    "mahalanobis": Spec(ood.Mahalanobis, FEATURES),
    "rmd": Spec(ood.RMD, FEATURES),
    "knn": Spec(ood.KNN, FEATURES, fit_on_host=True),
    "she": Spec(ood.SHE, FEATURES, from_method=lambda method, width: {"head": method.logits_of}),
    "vim": Spec(ood.ViM, FEATURES, from_method=_vim, needs_linear_head=True),
    "dice": Spec(ood.DICE, FEATURES, from_method=_dice, needs_linear_head=True),
}
# constructor parameters that the framework fills in, not the user (detector_args)
_SUPPLIED = {"self", "model", "encoder", "w", "b", "head", "detector"}


def tunable_args(name: str) -> set[str]:
    """The keyword arguments a user may set for detector ``name`` (``detector_args.<name>``)."""
    parameters = inspect.signature(SPECS[name].cls.__init__).parameters
    return {p for p, v in parameters.items() if p not in _SUPPLIED and v.kind is not v.VAR_KEYWORD}


def check_detectors(
    names, method: Method, method_name: str, args: dict | None = None, fit_samples: int = 1
) -> list[str]:
    """The detector names, validated before training: unknown names, repeated names, detectors
    that cannot apply to ``method`` and unknown arguments raise :class:`ConfigError` (one line)."""
    names = [names] if isinstance(names, str) else list(names or [])
    names = [str(n).lower() for n in names]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise ConfigError(f"unknown detector(s) {', '.join(unknown)}; valid: {', '.join(SPECS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"detectors lists {', '.join(repeated)} more than once")
    refused = [n for n in names if SPECS[n].needs_linear_head and method.linear_head is None]
    if refused:
        raise ConfigError(
            f"detector(s) {', '.join(refused)} need a linear classifier head, which {method_name} does not have "
            "(it classifies by the nearest centre); drop them from detectors"
        )
    for name, kwargs in (args or {}).items():
        if name not in SPECS:
            raise ConfigError(f"detector_args.{name}: unknown detector; valid: {', '.join(SPECS)}")
        extra = sorted(set(kwargs or {}) - tunable_args(name))
        if extra:
            raise ConfigError(
                f"detector_args.{name}: unknown argument(s) {', '.join(extra)}; valid: "
                f"{', '.join(sorted(tunable_args(name))) or 'none'}"
            )
    if not isinstance(fit_samples, int) or isinstance(fit_samples, bool) or fit_samples < 1:
        raise ConfigError(f"detector_fit_samples must be a positive integer, got {fit_samples!r}")
    return names


def fit_subset(n_train: int, n_samples: int, seed: int, device: torch.device | None = None) -> Tensor:
    """Sorted indices of a seeded subset of ``min(n_samples, n_train)`` training samples."""
    # cpu: a seeded draw of indices, the same on every device; moved below
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(n_train, generator=generator)  # cpu: as above
    index = index[: min(n_samples, n_train)].sort().values
    return index.to(device) if device is not None else index


class DetectorBank:
    """The configured detectors of one model: built and fitted by :meth:`fit` (after training,
    before testing), then :meth:`scores` per test batch.

    After fitting, :attr:`fit_indices` holds the indices into the training split that the fit
    saw, and :attr:`seconds` the time each detector cost (fit + scoring; the forward pass over
    the fit subset, shared by the fitted detectors, is under ``"fit-forward"``).
    """

    def __init__(self, names: list[str], args: dict | None = None, fit_samples: int = 10000, seed: int = 0):
        self.names = list(names)
        self.args = {name: dict((args or {}).get(name) or {}) for name in self.names}
        self.fit_samples = fit_samples
        self.seed = seed
        self.detectors: dict[str, Detector] = {}
        self.fit_indices: Tensor | None = None
        self.seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.names)

    @torch.no_grad()
    def fit(
        self,
        forward: Callable[[Tensor], MethodOutput],
        method: Method,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor],
        device: torch.device,
        batch_size: int = 512,
    ) -> None:
        """Build every detector from the trained ``method`` and fit those that need it.

        ``images`` (uint8) and ``labels`` are the **training split**; ``forward`` is the model
        (images -> the method's outputs), ``transform`` turns a uint8 batch on ``device`` into
        the model's input (no augmentation).
        """
        self.seconds = {}
        need_fit = [n for n in self.names if SPECS[n].fitted]
        features = labels_seen = None
        if need_fit:
            start = self._clock(device)
            self.fit_indices = fit_subset(len(images), self.fit_samples, self.seed)
            chunks = []
            for begin in range(0, len(self.fit_indices), batch_size):
                index = self.fit_indices[begin : begin + batch_size].to(images.device)
                out = forward(transform(images[index].to(device, non_blocking=True)))
                chunks.append(method.features(out).float())
            features = torch.cat(chunks)
            labels_seen = labels[self.fit_indices.to(labels.device)].to(device)
            self.seconds["fit-forward"] = self._clock(device) - start
        for name in self.names:
            start = self._clock(device)
            spec = SPECS[name]
            width = features.shape[1] if features is not None else 0
            # null in detector_args means the default
            kwargs = {**spec.from_method(method, width), **{k: v for k, v in self.args[name].items() if v is not None}}
            try:
                detector = spec.cls(None, **kwargs).to(device)
                if spec.fitted:
                    on = features.cpu() if spec.fit_on_host else features
                    detector.fit_features(on, labels_seen.to(on.device))
            except (ValueError, AssertionError, RuntimeError, TypeError) as error:
                cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                seen = f" on {len(labels_seen)} training samples" if spec.fitted else ""
                raise ConfigError(f"detector {name} could not be set up{seen}: {cause}") from error
            self.detectors[name] = detector
            self.seconds[name] = self._clock(device) - start
        log.info(
            "Detectors %s built%s",
            ", ".join(self.names),
            f"; fitted on {len(self.fit_indices)} training samples" if need_fit else "",
        )

    def scores(self, method: Method, out: MethodOutput) -> dict[str, Tensor]:
        """Outlier scores of one batch per detector (larger = more anomalous), on the batch's device."""
        result = {}
        inputs = {LOGITS: method.logits(out).float(), FEATURES: method.features(out).float()}
        for name, detector in self.detectors.items():
            device = inputs[LOGITS].device
            start = self._clock(device)
            spec = SPECS[name]
            if spec.reads == LOGITS:
                score = detector.predict_logits(inputs[LOGITS])
            else:
                score = detector.predict_features(inputs[FEATURES])
            result[name] = score.to(device).float()
            self.seconds[name] = self.seconds.get(name, 0.0) + self._clock(device) - start
        return result

    @staticmethod
    def _clock(device: torch.device) -> float:
        """Wall-clock seconds; on a GPU after its queued work (timing only, with detectors on)."""
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
