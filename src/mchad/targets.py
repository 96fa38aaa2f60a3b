"""What a config may instantiate, and the one place where Hydra 1.3 and 1.4 differ.

A ``_target_`` is code that runs: ``+callbacks.x._target_=torch.load`` would unpickle any file.
Hydra 1.3 refuses only a short blocklist (``os.system``, ``subprocess.*``, ...), Hydra 1.4 warns
without an execution allow-list (an error from 1.5 on). So before anything runs,
:func:`check_targets` walks the whole composed config and refuses every ``_target_`` outside
:data:`ALLOWED` and the config's own ``allowed_targets`` (e.g. ``[my_lab.*]``); on Hydra 1.4
:func:`instantiate` hands the same list to Hydra's own check as well.

Patterns: ``package.*`` allows everything below ``package``; any other entry is one exact name.

Trusting one's own code once: the class of every method in the registry
(``src/mchad/registry/methods.yaml``, its ``class:``) is allowed on every command, so a registered
method of one's own (``class: my_methods.ProtoX``) needs no ``allowed_targets=``; other packages of
one's own go into ``allowed_targets`` in ``config/train.yaml`` once (e.g. ``[my_lab.*]``). Neither
can be set by a config file someone hands over (the registry is code; a config's ``allowed_targets``
is the command's or one's own train.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from mchad import registry
from mchad.errors import ConfigError

#: the parts of each library that the framework's configs name (config/**.yaml)
ALLOWED = (
    "mchad.*",
    "torch.optim.*",  # optimisers, lr_scheduler
    "pytorch_lightning.Trainer",
    "pytorch_lightning.callbacks.*",
    "pytorch_lightning.loggers.*",
    "pytorch_lightning.strategies.*",  # trainer.strategy, e.g. DDP's options
    "pytorch_lightning.plugins.*",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.*",
    "lightning.pytorch.loggers.*",
    "lightning.pytorch.strategies.*",
    "lightning.pytorch.plugins.*",
    "pytorch_ood.detector.*",
    "pytorch_ood.loss.*",
    "pytorch_ood.model.*",
    "pytorch_ood.benchmark.*",
    "pytorch_ood.dataset.*",
    "torchvision.datasets.*",
    "torchvision.transforms.*",
    "optuna.samplers.*",  # hydra/sweeper=optuna's sampler (continued with a moved seed, mchad.sweeps.search)
)
#: what Hydra itself instantiates from its own config node: its plugins (launchers, sweepers) and
#: our sweep report callback; on Hydra 1.4 handed to ``@hydra.main`` (it reaches Ray workers too)
HYDRA_OWN = ("hydra_plugins.*", "hydra._internal.*", "mchad.*", "optuna.samplers.*")
#: the config key that extends the list, e.g. ``allowed_targets: [my_lab.*]``
EXTRA_KEY = "allowed_targets"

HYDRA_VERSION = tuple(int(part) for part in hydra.__version__.split(".")[:2])
#: Hydra 1.4 deprecates ``version_base`` (removed in 1.5); 1.3 needs it to pick today's defaults
VERSION_BASE_KWARGS: dict[str, str] = {} if HYDRA_VERSION >= (1, 4) else {"version_base": "1.3"}
#: ``@hydra.main``'s arguments: the allow-list where Hydra has one, else today's defaults
MAIN_KWARGS: dict[str, Any] = (
    {"execution_whitelist": [*ALLOWED, *registry.trusted_targets(), *HYDRA_OWN]}
    if HYDRA_VERSION >= (1, 4)
    else VERSION_BASE_KWARGS
)


def allowed_patterns(cfg: DictConfig | None = None) -> list[str]:
    """:data:`ALLOWED`, the registered methods' classes and the config's ``allowed_targets``."""
    extra = [] if cfg is None else OmegaConf.select(cfg, EXTRA_KEY, default=None) or []
    if isinstance(extra, str):
        extra = [extra]
    trusted = [t for t in registry.trusted_targets() if not is_allowed(t, ALLOWED)]
    return [*ALLOWED, *trusted, *(str(p) for p in extra)]


def is_allowed(target: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            if target.startswith(pattern[:-1]):
                return True
        elif target == pattern:
            return True
    return False


def config_targets(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, target)`` for every ``_target_`` below ``node``; values are not resolved
    (an interpolation is reported as written, and refused: a target must be a plain name)."""
    if isinstance(node, DictConfig):
        for name in node.keys():
            path = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                yield path, node._get_node(name)._value()
            else:
                yield from config_targets(node._get_node(name), path)
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from config_targets(node._get_node(index), f"{key}[{index}]")


def check_targets(cfg: DictConfig) -> None:
    """Refuse (one line naming the key and the target) any ``_target_`` of ``cfg`` off the list."""
    patterns = allowed_patterns(cfg)
    for key, target in config_targets(cfg):
        if not isinstance(target, str) or not is_allowed(target, patterns):
            raise ConfigError(
                f"{key}={target} is not an allowed target (a config target runs code): the allowed are "
                f"{', '.join(patterns)}; to trust a package of your own: {EXTRA_KEY}=['my_package.*'] (once: in "
                "config/train.yaml; a method: its entry in src/mchad/registry/methods.yaml)"
            )


def instantiate(node: Any, patterns: list[str], **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with the allow-list handed to Hydra where it has one (1.4)."""
    from hydra.utils import instantiate as hydra_instantiate

    if HYDRA_VERSION >= (1, 4):
        kwargs["_execution_whitelist_"] = patterns
    return hydra_instantiate(node, **kwargs)


def store_config(store: Any, **kwargs: Any) -> None:
    """``ConfigStore.store``, replacing an earlier entry on purpose (Hydra 1.4 warns without
    ``replace=``, 1.5 raises; 1.3 has no such argument and always replaces)."""
    if HYDRA_VERSION >= (1, 4):
        kwargs["replace"] = True
    store.store(**kwargs)
