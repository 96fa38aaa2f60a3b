"""The validation objective of a run: what a hyperparameter search optimises.

Computed right after training and before any test set is loaded or scored, on validation
data only: the ID validation hold-out against the validation unknowns, the same fixed
images the validation views use (:func:`mchad.callbacks.sample.validation_sample`: the
outlier-exposure set when one is configured, else fixed-seed noise; never a test set).
Written to ``<run>/objective.yaml``; in a sweep, Hydra's task function returns its
``value`` (``mchad.task.main``), which is what hydra-optuna-sweeper optimises.

Configured by the ``objective`` node of ``config/train.yaml``:

- ``metric``: ``val_acc`` (closed-set accuracy on the validation sample), ``val_auroc``
  (AUROC of the method's headline score, known vs. unknown, unknowns positive) or ``mean``
  (the mean of the two);
- ``score``: the outlier score of ``val_auroc``: ``headline`` (the method's, e.g. distance),
  another of the method's scores or a post-hoc detector of ``detectors`` (fitted on the
  training split first), so that a search over ``detector_args`` is judged on validation data;
- ``direction``: ``maximize`` or ``minimize`` (the Optuna sweeper reads it from here);
- ``max_samples``, ``unknown_samples``, ``noise_seed``, ``batch_size``: the sample, as in
  ``callbacks.validation_views`` (equal settings give the logged ``val/unknown/<score>/AUROC``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mchad.errors import ConfigError

OBJECTIVE_FILE = "objective.yaml"
METRICS = ("val_acc", "val_auroc", "mean")
DIRECTIONS = ("maximize", "minimize")
HEADLINE = "headline"


def check_objective(objective: DictConfig) -> None:
    """Refuse an unknown metric or direction before training starts."""
    if objective.get("metric") not in METRICS:
        raise ConfigError(f"objective.metric must be one of {', '.join(METRICS)}, got {objective.get('metric')!r}")
    if objective.get("direction") not in DIRECTIONS:
        raise ConfigError(f"objective.direction must be maximize or minimize, got {objective.get('direction')!r}")


def check_objective_score(objective: DictConfig, score_names: list[str]) -> None:
    """Refuse an ``objective.score`` that the model does not compute (before training)."""
    score = objective.get("score", HEADLINE)
    if score != HEADLINE and score not in score_names:
        raise ConfigError(
            f"objective.score={score} is not a score of this run; choose {HEADLINE} or one of {', '.join(score_names)} "
            "(a post-hoc detector must be in detectors)"
        )


def validation_objective(objective: DictConfig, trainer: Any, model: Any) -> dict[str, Any]:
    """The objective and the validation metrics it comes from (plain Python values)."""
    from mchad.callbacks.sample import known_vs_unknown_auroc, validation_sample

    score = objective.get("score", HEADLINE)
    if score != HEADLINE and score in getattr(model.detectors, "names", []):
        model.fit_detectors()  # on the training split, as before testing
    sample = validation_sample(
        trainer, model, objective.max_samples, objective.unknown_samples, objective.noise_seed, objective.batch_size
    )
    score = sample.score_name if score == HEADLINE else score
    known = sample.known
    auroc = known_vs_unknown_auroc(sample.scores[score][known], sample.scores[score][~known])
    values = {"val_acc": float(sample.val_acc), "val_auroc": float(auroc)}
    values["mean"] = (values["val_acc"] + values["val_auroc"]) / 2
    return {
        "metric": str(objective.metric),
        "direction": str(objective.direction),
        "value": values[objective.metric],
        **{k: v for k, v in values.items() if k != "mean"},
        "score": score,
        "unknowns": sample.unknown_source,
        "n_known": sample.n_known,
        "n_unknown": int((~known).sum()),
        "epoch": int(trainer.current_epoch),
        "step": int(trainer.global_step),
    }


def write_objective(objective: DictConfig, trainer: Any, model: Any, output_dir: Path) -> dict[str, Any]:
    """Compute the objective and write ``<output_dir>/objective.yaml`` atomically."""
    result = validation_objective(objective, trainer, model)
    path = Path(output_dir) / OBJECTIVE_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        OmegaConf.save(OmegaConf.create(result), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def read_objective(run_dir: str | Path) -> float | None:
    """The objective value written in ``run_dir``; None when there is none or it is not finite."""
    path = Path(run_dir) / OBJECTIVE_FILE
    if not path.is_file():
        return None
    value = OmegaConf.load(path).get("value")
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def trial_objective(summary: dict[str, Any]) -> float | None:
    """What a sweep trial returns to Hydra's sweeper: its validation objective, or None when it
    failed or has none. None, not NaN: hydra-optuna-sweeper marks a trial whose return value is
    not a float as failed and goes on, while a NaN makes Optuna's ``tell`` raise and ends the search."""
    if summary.get("status") != "ok":
        return None
    return read_objective(summary["dir"])
