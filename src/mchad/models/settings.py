"""No setting that does nothing: every ``model.*`` value must be read by some part of the run.

A model config hands its values to the method by interpolation (``weight_ce: ${model.weight_ce}``
in its ``method`` node). A value that no interpolation names and that the framework does not read
itself (:data:`FRAMEWORK_KEYS`) changes nothing: ``experiment=cifar10-softmax model.margin=7``
would train the same model as without it, and a sweep over it would train identical models.
:func:`check_model_keys` refuses such a value before training, naming it.

A config without any interpolation naming ``model.*`` (a resumed run's saved config.yaml is
resolved) cannot tell what is read and is not checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from omegaconf import DictConfig, ListConfig

from mchad.errors import ConfigError

#: the model keys that the framework reads itself (mchad.runs.train, resume, the test pipeline)
FRAMEWORK_KEYS = frozenset(
    {
        "name", "n_embedding", "semantics", "pretrained_checkpoint", "channels_last", "compile",
        "backbone", "method", "optimizer", "scheduler",
    }
)  # fmt: skip
_REFERENCE = re.compile(r"\$\{[^{}]*?\bmodel\.(\w+)")


def _raw_strings(node) -> Iterator[str]:
    """Every string value below ``node`` as written (interpolations unresolved)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _raw_strings(node._get_node(key))
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _raw_strings(node._get_node(index))
    else:
        value = node._value() if hasattr(node, "_value") else node
        if isinstance(value, str):
            yield value


def unread_model_keys(cfg: DictConfig) -> list[str] | None:
    """The ``model.*`` keys that nothing reads (sorted); None where the config cannot tell."""
    model = cfg.get("model")
    if not isinstance(model, DictConfig):
        return None
    referenced = {name for text in _raw_strings(cfg) for name in _REFERENCE.findall(text)}
    if not referenced:
        return None
    return sorted(str(key) for key in model.keys() if key not in FRAMEWORK_KEYS and key not in referenced)


def check_model_keys(cfg: DictConfig) -> None:
    """Refuse (one line) a ``model.*`` value that no part of the run reads."""
    unread = unread_model_keys(cfg)
    if unread:
        key, name = unread[0], cfg.model.get("name", "the model")
        others = f" (and {', '.join('model.' + k for k in unread[1:])})" if len(unread) > 1 else ""
        raise ConfigError(
            f"model.{key}={cfg.model._get_node(key)._value()} is read by nothing: {name}'s config passes no "
            f"${{model.{key}}} to its method ({cfg.model.method.get('_target_')}); remove it{others}"
        )
