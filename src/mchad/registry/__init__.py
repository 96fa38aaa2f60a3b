"""The method registry: the one place that names each method and what the rest needs to know of it.

Each entry of ``methods.yaml`` (beside this module) is one method, in table order::

    protox:                         # the key: experiment=cifar10-protox, METHODS=protox
      name: ProtoX                  # results.csv's method column, the tables' row name
      model: protox                 # config/model/protox.yaml
      class: my_methods.ProtoX      # the model config's method._target_ (trusted, see below)
      score: distance               # headline score: the first of the class's score_names
      outliers: false               # true: trains with outlier exposure (TinyImages300k)
      published: false              # true: config/experiment/<dataset>-<key>.yaml hold published values
      embedding_is_classes: false   # true: n_embedding = known classes (CAC's anchors)

What derives from it (nothing else lists the methods):

- ``experiment=<dataset>-<key>`` for :data:`DATASETS`: the readable files of the published
  experiments (``published: true``), else generated here from ``config/benchmark/<dataset>.yaml``
  (the dataset's defaults: data, backbone, epochs, test cases) and the model config;
- ``experiment=openood-<dataset>-<key>`` for :data:`OPENOOD_DATASETS` (the method's experiment +
  ``config/openood/recipe.yaml``) and ``experiment=osr-<setting>-<key>`` for :data:`OSR_SETTINGS`
  (the method's CIFAR-10 experiment + ``config/osr/<setting>.yaml``), generated here;
- the method lists of ``bash/run-experiments.sh``, ``run-openood.sh`` and ``run-openset.sh``
  (``python -m mchad.registry keys``), the aggregate's row order, names and scores
  (:func:`table_methods`), the allow-list of config targets (:func:`trusted_targets`) and the
  tests' parametrisation.

API: :func:`methods` (key -> :class:`Method`), :func:`keys`, :func:`experiments`,
:func:`table_methods`, :func:`trusted_targets`, :func:`register_experiments` (called on
``import mchad``: Hydra's ConfigStore, before any config is composed).

The open-set settings are here, not in :mod:`mchad.data.osr` (which reads them): ``import mchad``
registers the ``osr-*`` experiments before Hydra composes, and the foundation (this package)
may not import ``mchad.data``. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path
from typing import Any

import yaml

#: the paper's ID datasets: experiment=<dataset>-<key>
DATASETS = ("cifar10", "cifar100", "svhn")
#: OpenOOD v1.5's ID datasets: experiment=openood-<dataset>-<key>
OPENOOD_DATASETS = ("cifar10", "cifar100")
#: open-set setting -> (known dataset, its number of classes, unknown dataset, its number of classes, title);
#: experiment=osr-<setting>-<key>, class splits in mchad.data.osr
OSR_SETTINGS = {
    "cifar10": ("CIFAR10", 10, "CIFAR10", 10, "CIFAR10 6/4"),
    "cifarplus10": ("CIFAR10", 10, "CIFAR100", 100, "CIFAR+10"),
    "cifarplus50": ("CIFAR10", 10, "CIFAR100", 100, "CIFAR+50"),
    "tinyimagenet": ("TinyImageNet", 200, "TinyImageNet", 200, "TinyImageNet 20/180"),
}
#: the experiment kinds of :func:`experiments`
KINDS = ("paper", "openood", "osr")
REGISTRY_FILE = Path(__file__).with_name("methods.yaml")


@dataclasses.dataclass(frozen=True)
class Method:
    """One registry entry (see the module docstring)."""

    key: str
    name: str
    model: str
    cls: str
    score: str
    outliers: bool = False
    published: bool = False
    embedding_is_classes: bool = False


class RegistryError(ValueError):
    """A malformed entry of methods.yaml."""


def _entry(key: str, fields: Any) -> Method:
    if not isinstance(fields, dict):
        raise RegistryError(f"{REGISTRY_FILE}: entry {key} must be a mapping of name, model, class, score, ...")
    fields = dict(fields)
    fields["cls"] = fields.pop("class", None)
    known = {f.name for f in dataclasses.fields(Method)} - {"key"}
    unknown = sorted(set(fields) - known)
    missing = sorted(f for f in ("name", "model", "cls", "score") if not fields.get(f))
    if unknown or missing:
        raise RegistryError(f"{REGISTRY_FILE}: entry {key}: unknown fields {unknown}, missing {missing}")
    return Method(key=str(key), **fields)


@cache
def methods() -> dict[str, Method]:
    """key -> entry, in table order."""
    entries = yaml.safe_load(REGISTRY_FILE.read_text(encoding="utf-8")) or {}
    return {str(key): _entry(key, fields) for key, fields in entries.items()}


def keys() -> list[str]:
    return list(methods())


def experiments(kind: str = "paper", keys_: list[str] | None = None) -> list[str]:
    """The experiment names of one kind (:data:`KINDS`), dataset by dataset, methods in table order."""
    chosen = keys() if keys_ is None else keys_
    places = {"paper": DATASETS, "openood": OPENOOD_DATASETS, "osr": OSR_SETTINGS}[kind]
    prefix = "" if kind == "paper" else f"{kind}-"
    return [f"{prefix}{place}-{key}" for place in places for key in chosen]


def table_methods() -> list[dict[str, str]]:
    """The aggregate's rows: ``{"method", "name", "score"}`` per entry, in table order."""
    return [{"method": m.name, "name": m.name, "score": m.score} for m in methods().values()]


def trusted_targets() -> list[str]:
    """The registered methods' classes: config targets allowed without ``allowed_targets=``."""
    return sorted({m.cls for m in methods().values()})


def experiment_nodes() -> dict[str, dict[str, Any]]:
    """The generated experiment configs: name -> config node (package ``_global_``), each its
    defaults, then its own values (``_self_``: ``name`` and what it changes)."""
    nodes: dict[str, dict[str, Any]] = {}
    for method in methods().values():
        if not method.published:  # the published ones are readable files in config/experiment/
            for dataset in DATASETS:
                defaults: list[Any] = [f"/benchmark/{dataset}", {"override /model": method.model}]
                if method.outliers:
                    defaults.append({"override /datamodule/outliers": "tinyimages"})
                nodes[f"{dataset}-{method.key}"] = {"defaults": defaults}
        for dataset in OPENOOD_DATASETS:
            nodes[f"openood-{dataset}-{method.key}"] = {"defaults": [f"{dataset}-{method.key}", "/openood/recipe"]}
        for setting in OSR_SETTINGS:
            node: dict[str, Any] = {"defaults": [f"cifar10-{method.key}", {"/osr": setting}]}
            if method.embedding_is_classes:  # CAC's embedding has one dimension per known class
                node["model"] = {"n_embedding": "${datamodule.n_classes}"}
            nodes[f"osr-{setting}-{method.key}"] = node
    for name, node in nodes.items():
        node["defaults"].append("_self_")
        node["name"] = name
    return nodes


def register_experiments() -> None:
    """Put :func:`experiment_nodes` into Hydra's ConfigStore (group ``experiment``)."""
    import hydra
    from hydra.core.config_store import ConfigStore

    # replacing an earlier entry on purpose: Hydra 1.4 warns without replace=, 1.5 raises; 1.3 lacks it
    replace = {"replace": True} if tuple(int(p) for p in hydra.__version__.split(".")[:2]) >= (1, 4) else {}
    store = ConfigStore.instance()
    for name, node in experiment_nodes().items():
        store.store(group="experiment", name=name, node=node, package="_global_", **replace)
