"""Train and test a model: ``python run.py [experiment=<dataset>-<method>] [overrides...]``.

- continue an interrupted run in its folder: ``python run.py resume=logs/runs/<date>/<time>_<id>``
- only test a trained model: ``python run.py [experiment=...] train=false ckpt_path=<run folder> [testmodules=...]``

An input mistake ends with one line ``error: <cause>`` (``MCHAD_TRACEBACK=1`` adds its
traceback). See README.md; the configuration lives in config/ (Hydra).
"""

import gc
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

gc.disable()  # until a run's heavy imports are done, or a sweep starts: mchad.runs.collector

# data/ and logs/ are found next to this file, wherever the command is started from
os.environ.setdefault("MCHAD_ROOT", str(Path(__file__).resolve().parent))

from mchad.targets import MAIN_KWARGS  # noqa: E402


@hydra.main(config_path="config", config_name="train", **MAIN_KWARGS)
def main(cfg: DictConfig) -> float | None:
    from mchad.cli import quiet_console

    quiet_console()  # before torch and Lightning are imported: their notices go to run.log only
    from mchad.task import main as train_main  # heavy imports after Hydra parsed the command line

    return train_main(cfg)  # a sweep trial's validation objective, for search sweepers


if __name__ == "__main__":
    from mchad.cli import guard

    guard(main, Path(__file__).resolve().parent / "config")  # input mistakes: one `error:` line
