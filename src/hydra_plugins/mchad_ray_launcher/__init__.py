"""The Ray launcher of ``python run.py -m`` (config/hydra/launcher/ray.yaml).

hydra-ray-launcher's ``RayLauncher`` with one change (see :func:`mchad.sweeps.sweep.launch_on_ray`):
a trial whose worker process dies (killed, out of memory) is recorded as a failed trial and
the sweep goes on to report it, instead of the whole sweep stopping at the first dead worker.
It lives here because Hydra only instantiates launchers from the ``hydra_plugins`` package.
Importing it must stay cheap (Hydra imports every plugin at start-up, also for single runs):
no ray, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher


class MchadRayLauncher(RayLauncher):
    def __init__(self, ray, prepare_data: bool = True) -> None:
        super().__init__(ray=ray)
        self.prepare_data = prepare_data

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from mchad.sweeps.sweep import launch_on_ray

        if self.prepare_data:  # every trial's data fetched once, here, before any trial starts
            from mchad.data.prepare import prepare_sweep
            from mchad.runs.collector import import_heavy

            import_heavy("mchad.data.datamodule")  # the data modules import torch and Lightning
            prepare_sweep(self, job_overrides)
        return launch_on_ray(self, job_overrides, initial_job_idx)
