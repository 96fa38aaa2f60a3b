"""Where tensors live: the one rule of the package.

* **The training device** (``pl_module.device``, a GPU when training on one) holds the model,
  every batch it sees and everything computed from them; with ``datamodule.data_on_device``
  the uint8 data sets too (see :mod:`mchad.data.loaders`). Metrics are computed there.
* **The host** (CPU memory) holds what is handed *out* of training and testing: the
  validation sample of the callbacks, ``OODModel.test_outputs`` (for the plots), metric
  values, checkpoints read back, and every file written. :func:`to_host` is the one way
  there, applied where tensors leave the device (:func:`mchad.callbacks.sample.validation_sample`,
  ``OODModel.on_test_epoch_end``), so callbacks and plots only ever see host tensors.
  Data sources decode into host memory; loaders and the forward passes move batches to the
  device.

A tensor made in the package is made on the device of the tensors it will meet
(``device=x.device``), or on the host on purpose, with a ``# cpu: <why>`` comment on the
call: ``tests/test_device_guard.py`` checks every tensor factory in ``src/mchad`` for one of
the two, and runs training, the callbacks and testing with model and data on an emulated
second device, where mixing a host tensor into device computations fails as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

#: where everything handed out of training and testing lives
HOST = torch.device("cpu")


def to_host(value: Any) -> Any:
    """``value`` with every tensor (also inside dicts, lists and tuples) detached and on the host.

    A no-op for host tensors (no copy); other values are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(HOST)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value
