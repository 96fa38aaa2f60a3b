"""OmegaConf resolvers used by ``config/``.

``run_id`` makes run folders unique even for runs started in the same second (Hydra's
``${now:...}`` alone collides): it is fixed per process, so every resolution of the run
folder within one process agrees.
"""

import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf

_RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"


def project_root() -> str:
    """The folder holding ``run.py`` (set by it), else the current directory."""
    return os.environ.get("MCHAD_ROOT") or str(Path.cwd())


def register() -> None:
    OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID, replace=True)
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    # e.g. the backbone's input channels from the datamodule's normalisation: ${len:${datamodule.mean}}
    OmegaConf.register_new_resolver("len", lambda value: len(value), replace=True)


register()
