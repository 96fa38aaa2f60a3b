"""OmegaConf resolvers used by ``config/`` (the generated experiment configs: :mod:`mchad.registry`).

``run_id`` makes run folders unique even for runs started in the same second (Hydra's
``${now:...}`` alone collides): it is fixed per process, so every resolution of the run
folder within one process agrees.

Multirun trials in Ray workers resolve the sweep folder again, in another process (maybe on
another machine): the Ray launcher (config/hydra/launcher/ray.yaml) passes the driver's
values as ``MCHAD_RUN_ID`` and ``MCHAD_ROOT`` to the workers, which these resolvers prefer,
so every trial writes below the driver's ``<sweep dir>/<job num>/``.
"""

import os
import secrets
import warnings
from datetime import datetime
from pathlib import Path

import omegaconf
from omegaconf import OmegaConf

_RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"


def project_root() -> str:
    """The folder holding ``run.py`` (set by it), else the current directory."""
    return os.environ.get("MCHAD_ROOT") or str(Path.cwd())


def run_id() -> str:
    """This process's id, or the sweep driver's (``MCHAD_RUN_ID``) inside its Ray workers."""
    return os.environ.get("MCHAD_RUN_ID") or _RUN_ID


def launch_id() -> str | None:
    """The name every process of one multi-process launch shares (DDP under torchrun or srun,
    each process composing its own config): torchrun's rendezvous id (``--standalone`` draws
    one, else ``--rdzv-id``), or SLURM's job and step; None for a process started alone."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    return None


_RUN_NAME: str | None = None


def run_name() -> str:
    """``<date>/<time>_<run id>`` of a new run folder, fixed at the first call in a process; for
    the processes of one torchrun/srun launch the same ``ddp/<launch id>`` (:func:`launch_id`),
    so that all of them use rank 0's folder."""
    global _RUN_NAME
    if _RUN_NAME is None:
        shared = launch_id()
        _RUN_NAME = f"ddp/{shared}" if shared else f"{datetime.now():%Y-%m-%d/%H-%M-%S}_{run_id()}"
    return _RUN_NAME


def locate_resume(resume: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint)`` of ``resume=``: a run folder (its ``checkpoints/last.ckpt``)
    or a checkpoint file inside one (``<run>/checkpoints/<name>.ckpt``). A relative path is
    taken from the working directory, else from the project root."""
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (Path(project_root()) / path).exists():
        path = Path(project_root()) / path
    path = path.resolve()
    if path.is_file():
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return folder, path
    return path, path / "checkpoints" / "last.ckpt"


def run_dir(resume: str | None, new: str) -> str:
    """``hydra.run.dir``: the folder of the run being resumed (``resume=``), else ``new``.

    A ``resume`` that is not a run folder yields ``new``; ``mchad.runs.train`` then says why.
    """
    if resume is None:
        return new
    folder, _ = locate_resume(resume)
    return str(folder) if (folder / "config.yaml").is_file() else new


def by_semantics(semantics: str, published, paper):
    """The value of ``model.semantics``'s reading: ``published`` or ``paper``."""
    if semantics not in ("published", "paper"):
        raise ValueError(f"model.semantics must be published or paper, got {semantics!r}")
    return published if semantics == "published" else paper


# OmegaConf 2.4 deprecates register_new_resolver for register_resolver (which in 2.3 is an older,
# deprecated function of another signature)
_OMEGACONF_2_4 = tuple(int(p) for p in omegaconf.__version__.split(".")[:2]) >= (2, 4)
_register = OmegaConf.register_resolver if _OMEGACONF_2_4 else OmegaConf.register_new_resolver


def register() -> None:
    _register("run_dir", run_dir, replace=True)
    _register("run_id", run_id, replace=True)
    _register("run_name", run_name, replace=True)
    _register("project_root", project_root, replace=True)
    # e.g. the backbone's input channels from the datamodule's normalisation: ${len:${datamodule.mean}}
    _register("len", lambda value: len(value), replace=True)
    # e.g. the published scheduler period: ${mul:${trainer.min_epochs},${trainer.limit_train_batches}}
    _register("mul", lambda a, b: a * b, replace=True)
    # a value per reading: ${by_semantics:${model.semantics},<published value>,<paper value>}
    _register("by_semantics", by_semantics, replace=True)


register()

# config/hydra/launcher/ray.yaml shares its name with hydra-ray-launcher's schema, which
# Hydra then validates it against (as intended) with a deprecation warning on every run.
warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/ray.* is validated against ConfigStore schema")
