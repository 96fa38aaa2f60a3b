"""Hyperparameter search with Optuna: ``python run.py -m hydra/sweeper=optuna [experiment=...]``.

hydra-optuna-sweeper asks Optuna for ``n_jobs`` parameter sets at a time and hands them to
the launcher as one batch (in parallel under the Ray launcher); each trial returns its
validation objective (:mod:`mchad.runs.objective`: validation data only, never a test set), and
the sweeper tells it to the study. The search space, the storage and the direction are in
``config/hydra/sweeper/optuna.yaml`` (the direction is ``objective.direction``).

What this module adds to the plugin (:func:`run_search`, called by
``hydra_plugins.mchad_sweepers.sweepers.OptunaSearch``):

- the study lives in the sweep folder (``<sweep>/optuna.db``, SQLite), which is created
  before Optuna opens it;
- the same command with ``hydra.sweep.dir=<that folder>`` continues the study: its trials
  keep their numbers, and trial ``n`` runs in ``<sweep>/<n>`` (the plugin would number the
  new trials from 0 again and overwrite the earlier folders); a seeded sampler's seed moves
  on by the number of earlier trials, so the new trials are new draws;
- ``outlier_params`` (``model.weight_oe``) join the search space only for runs with outliers;
- ``<sweep>/optimization_results.yaml`` (the plugin's: best parameters and value) gets the
  best trial's folder and validation metrics, the objective's definition and the counts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mchad.runs.objective import OBJECTIVE_FILE
from mchad.sweeps.sweep_resume import record

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def load_study(storage: str | None, study_name: str | None) -> Any | None:
    """The stored study, None without storage or when it does not exist yet."""
    if not storage or not study_name:
        return None
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # optuna: no study of that name in the storage
        return None


def search_params(params: DictConfig | None, outlier_params: DictConfig | None, config: DictConfig) -> DictConfig:
    """The sweeper's ``params`` plus ``outlier_params`` when the run trains with outliers."""
    merged = dict(OmegaConf.to_container(params)) if params else {}
    if outlier_params and OmegaConf.select(config, "datamodule.outliers") is not None:
        merged.update(OmegaConf.to_container(outlier_params))
    return OmegaConf.create(merged)


def continued_sampler(config: DictConfig, sampler: Any, earlier: int) -> Any:
    """A seeded sampler again, its seed moved on by the number of earlier trials.

    A study continued with the sampler of the same seed would propose the earlier trials'
    parameters again (Optuna's random start-up draws do not look at the stored trials).
    """
    sampler_cfg = OmegaConf.select(config, "hydra.sweeper.sampler")
    if sampler_cfg is None or sampler_cfg.get("seed") is None or sampler_cfg.get("_partial_"):
        return sampler
    from mchad.targets import allowed_patterns, instantiate

    return instantiate(sampler_cfg, allowed_patterns(config), seed=int(sampler_cfg.seed) + earlier)


def run_search(impl: Any, arguments: list[str], outlier_params: DictConfig | None) -> Any:
    """Run hydra-optuna-sweeper's ``OptunaSweeperImpl.sweep`` with the additions above."""
    import optuna

    # Optuna's own handler writes colour codes (colorlog) even into a pipe, and a line per trial
    # that the sweep's trial lines already give: its warnings go through logging instead
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = impl.config
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)  # the SQLite storage is created in it
    impl.params = search_params(impl.params, outlier_params, config)
    study = load_study(impl.storage, impl.study_name)
    earlier = len(study.trials) if study is not None else 0
    if earlier:
        log.info("Continuing study %s (%d earlier trial(s)) in %s", impl.study_name, earlier, sweep_dir)
    impl.job_idx = earlier  # the plugin numbers jobs from job_idx: trial n -> <sweep>/<n>
    if earlier:
        impl.sampler = continued_sampler(config, impl.sampler, earlier)
    record(sweep_dir, done=earlier, run_now=impl.n_trials)
    try:
        result = impl.sweep(arguments)
    except ValueError:
        study = load_study(impl.storage, impl.study_name)
        if study is None or _completed(study):
            raise
        # the plugin asks for the best trial of a study without any: the sweep report names the causes
        log.error("no trial of study %s finished; nothing to report as best", impl.study_name)
        return None
    write_best(impl, sweep_dir)
    return result


def _completed(study: Any) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def write_best(impl: Any, sweep_dir: Path) -> None:
    """Add the best trial's folder and validation metrics to the plugin's results file."""
    study = load_study(impl.storage, impl.study_name)
    path = sweep_dir / RESULTS_FILE
    if study is None or not path.is_file():
        return
    import optuna

    results = OmegaConf.load(path)
    best = study.best_trial
    states = [t.state for t in study.trials]
    results.best_trial = best.number
    results.objective = OmegaConf.select(impl.config, "objective")
    results.study = {
        "name": study.study_name,
        "storage": impl.storage,
        "trials": len(states),
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "failed": states.count(optuna.trial.TrialState.FAIL),
    }
    folder = sweep_dir / str(best.number)
    if (folder / OBJECTIVE_FILE).is_file():
        results.best_trial_dir = str(folder)
        results.validation = OmegaConf.load(folder / OBJECTIVE_FILE)
    OmegaConf.save(results, path)
    log.info(
        "Best trial #%d: %s = %s (%s)",
        best.number,
        results.objective.metric if results.objective else "value",
        best.value,
        path,
    )
