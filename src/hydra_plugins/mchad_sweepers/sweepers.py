"""Hydra sweepers of mchad; the logic lives in :mod:`mchad.sweeps.sweep_resume` and :mod:`mchad.sweeps.search`.

Hydra imports this module at every start (plugin discovery): it must stay light (no torch,
no ray, no optuna at import time) and must not fail when hydra-optuna-sweeper is missing.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


def check_job_targets(config: DictConfig) -> None:
    """Refuse a sweep whose job config names a target off the allow-list before any trial
    starts (:mod:`mchad.targets`; Hydra's own nodes, its plugins', are not job targets)."""
    from omegaconf import OmegaConf

    from mchad.targets import check_targets

    check_targets(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]))


class ResumableSweeper(BasicSweeper):
    """Hydra's basic sweeper that completes an earlier sweep given ``hydra.sweep.dir=<its folder>``:
    trials with results.csv are not run again (``config/hydra/sweeper/resumable.yaml``)."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from mchad.sweeps.sweep_resume import LaunchPending

        check_job_targets(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = LaunchPending(self.launcher, self)


try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # hydra-optuna-sweeper not installed: hydra/sweeper=optuna is unavailable
    OptunaSweeper = None

if OptunaSweeper is not None:

    class OptunaSearch(OptunaSweeper):
        """hydra-optuna-sweeper with its study kept in the sweep folder and continued there
        (``config/hydra/sweeper/optuna.yaml``, :mod:`mchad.sweeps.search`).

        ``outlier_params``: search spaces added to ``params`` only when the run trains with
        outliers (``datamodule.outliers`` set), e.g. ``model.weight_oe``.
        """

        def __init__(self, outlier_params: DictConfig | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.outlier_params = outlier_params

        def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
            check_job_targets(config)
            super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

        def sweep(self, arguments: list[str]) -> Any:
            from mchad.sweeps.search import run_search

            return run_search(self.sweeper, arguments, self.outlier_params)


class OptunaSearchConfig(SearchPathPlugin):
    """Makes ``hydra/sweeper=optuna`` mean ``config/hydra/sweeper/optuna_search.yaml``.

    hydra-optuna-sweeper registers ``hydra/sweeper/optuna`` in Hydra's ConfigStore, and a
    file of that name in config/ would be validated against it (which Hydra refuses for a
    schema with a defaults list). So the name is registered again, as an alias of our file.
    It happens here, after Hydra's plugin scan: the scan re-imports every plugin module, the
    optuna plugin's registration included, in an order that depends on sys.path.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if OptunaSweeper is not None:
            from mchad.targets import store_config

            store_config(
                ConfigStore.instance(),
                group="hydra/sweeper",
                name="optuna",
                node={"defaults": ["optuna_search"]},
                provider="mchad",
            )
