"""Compose every experiment of ``config/experiment`` and the generated ``osr-*`` ones with
Hydra's compose API and write their resolved configs to one YAML file (name -> config).

    python tests/composed_snapshot.py tests/data/composed_experiments.yaml

``tests/test_experiments.py`` composes them again and compares: a change to how experiments
are made (the method registry) must leave every published experiment's config as it was.
Paths below the project root are written as ``<root>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MCHAD_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

import mchad  # noqa: E402, F401  (resolvers, generated experiments)
from mchad.registry import KINDS, experiments, methods  # noqa: E402
from mchad.targets import VERSION_BASE_KWARGS  # noqa: E402

#: the run folder in the snapshot
OUTPUT_DIR = "<output>"
#: libyaml's loader where PyYAML has it: the snapshot (72 configs) loads in 0.1 s instead of 0.6 s
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def experiment_names() -> list[str]:
    """Every experiment of the methods with published values (those of the snapshot)."""
    published = [m.key for m in methods().values() if m.published]
    return [name for kind in KINDS for name in experiments(kind, published)]


def composed(name: str) -> dict:
    """The resolved config of ``experiment=<name>``, as a run sees it (no hydra node)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), **VERSION_BASE_KWARGS):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = OUTPUT_DIR
        del cfg["hydra"]
    return as_saved(cfg)


def as_saved(cfg) -> dict:
    """``cfg`` (a run's config, ``paths.output_dir`` set to :data:`OUTPUT_DIR`) as the snapshot holds it."""
    text = OmegaConf.to_yaml(cfg, resolve=True).replace(str(ROOT), "<root>")
    return yaml.load(text, Loader=LOADER)


def snapshot() -> dict[str, dict]:
    return {name: composed(name) for name in experiment_names()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.write_text(yaml.safe_dump(snapshot(), sort_keys=True, width=120))
    print(f"{out}: {len(experiment_names())} experiments")
