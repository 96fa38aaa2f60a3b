"""The SLURM and local launchers of ``python run.py -m`` (config/hydra/launcher/slurm.yaml, local.yaml).

hydra-submitit-launcher's ``SlurmLauncher`` and ``LocalLauncher`` with the behaviour of a sweep on
Ray (:mod:`mchad.sweeps.slurm`): every trial composed and its targets checked before anything is
submitted, one console line per finished trial, a job that ended without a result recorded as a
failed trial, and on SLURM a preempted trial's job requeued to continue from its checkpoint.
It lives here because Hydra only instantiates launchers from the ``hydra_plugins`` package.
Importing it must stay cheap (Hydra imports every plugin at start-up, also for single runs):
no submitit, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


class _Trials:
    """What both launchers change: how trials are launched and awaited (driver), and how a job
    prepares its trial and answers a preemption (in the job)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mchad.sweeps.slurm import launch_on_submitit

        return launch_on_submitit(self, job_overrides, initial_job_idx)

    def __call__(
        self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str, singleton_state: dict[Any, Any]
    ) -> JobReturn:
        from mchad.sweeps.slurm import prepare_job, requeue_if_preempted

        Singleton.set_state(singleton_state)
        setup_globals()
        overrides = prepare_job(self, list(sweep_overrides), job_num)
        result = super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)
        requeue_if_preempted(result, job_num)
        return result


class MchadSlurmLauncher(_Trials, SlurmLauncher):
    pass


class MchadLocalLauncher(_Trials, LocalLauncher):
    pass
