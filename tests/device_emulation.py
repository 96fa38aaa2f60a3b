"""A second device on a CPU-only machine, for tests: CI has no GPU, yet must catch code that
mixes tensors made on the host into computations on the training device.

Inside :func:`on_emulated_device`, a :class:`~torch.overrides.TorchFunctionMode` tracks which
tensors live on :data:`EMULATED` (``torch.device("cpu", 1)``: a device torch accepts and
computes on the CPU, but that compares unequal to ``cpu``):

- ``.to(EMULATED)`` (also ``module.to``, Lightning's batch transfer) and factories with
  ``device=EMULATED`` make device tensors (a copy, as a real transfer does); operations on
  device tensors give device tensors; ``.grad``/``.data`` follow their owner;
- ``tensor.device`` says :data:`EMULATED` for device tensors, so ``device=x.device`` works as
  on a GPU;
- ``.cpu()``/``.to("cpu")`` copy back to the host; every other tensor is a host tensor
  (factories without ``device=``, ``torch.from_numpy``, ``torch.load``, ...);
- as CUDA does, an operation that meets device tensors and a host tensor of dimension > 0
  raises :class:`DeviceMismatch` (host 0-dim tensors mix, host index tensors may index device
  tensors, ``copy_`` and ``param.data = ...`` cross devices); ``.numpy()`` of a device tensor
  raises;
- while ``recording`` is on, every operation that would make the host wait for a GPU is
  listed in ``syncs`` with where it was called from: reading a device tensor's value
  (``.item()``, ``bool()``, ``float()``, ``.tolist()``, printing), a copy to the host, and the
  operations whose output shape depends on the values (``nonzero``, boolean-mask indexing,
  ``unique``, ``masked_select``, ...), which is what ``torch.cuda.set_sync_debug_mode``
  reports on a GPU.

What it cannot see: code that never goes through torch's Python API (C++ internals, custom
kernels, e.g. a synchronisation inside a CUDA kernel's launcher), the accelerator-specific branches (``device.type ==
"cuda"``: the emulated device is
of type ``cpu``), numerics (precision, compile), memory, and CUDA-only APIs.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

EMULATED = torch.device("cpu", 1)
HOST = torch.device("cpu")

#: operations that may take tensors of either device (transfers, copies, attribute setters)
CROSS_DEVICE = {"copy_", "__set__", "_has_compatible_shallow_copy_type", "is_same_size", "set_"}
#: indexing: a host index into a device tensor is fine on a GPU
INDEXING = {"__getitem__", "__setitem__"}
#: operations that read a device tensor's values on the host, or whose output shape depends on
#: them: on a GPU the host waits until the device has computed everything queued before
SYNCHRONISING = {
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "__repr__", "__format__",
    "__str__", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
    "repeat_interleave", "bincount", "masked_scatter", "nonzero_static",
}  # fmt: skip


class DeviceMismatch(RuntimeError):
    """A host tensor met device tensors (on a GPU: ``Expected all tensors to be on the same device``)."""


def _where() -> str:
    """The innermost frame of the project (src/ or tests/) that led here."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/src/mchad/" in f.filename]
    frame = frames[-1] if frames else traceback.extract_stack()[-3]
    return f"{frame.filename}:{frame.lineno} ({frame.line})"


def _name(func) -> str:
    return getattr(func, "__name__", "") or str(func)


def _caller() -> str:
    """The innermost frame outside torch and this module: who asked for the operation."""
    here = __file__
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != here and "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (what torch calls take and return), in order.
    Runs on every torch call; with torch's pytree ``tree_flatten`` instead, test_device_guard took
    24.7 s of CPU, with this 22.7 s."""
    found, stack = [], [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return found


def _boolean_index(index) -> bool:
    return any(t.dtype == torch.bool for t in _tensors(index))


class EmulatedDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.on_device = WeakTensorKeyDictionary()
        #: record host synchronisations in :attr:`syncs` (see the module docs)
        self.recording = False
        self.syncs: list[str] = []

    def _record_sync(self, name: str, args, on_device: list) -> None:
        if not (self.recording and on_device):
            return
        # a step without the single-argument torch.where(condition) = nonzero
        if (
            name in SYNCHRONISING
            or (name == "where" and len(args) == 1)
            or (name in INDEXING and len(args) > 1 and self.is_device(args[0]) and _boolean_index(args[1]))
        ):
            self.syncs.append(f"{name} at {_caller()}")

    # --- bookkeeping -------------------------------------------------------------------
    def is_device(self, tensor: torch.Tensor) -> bool:
        return tensor in self.on_device

    def _place(self, value, on_device: bool):
        for tensor in _tensors(value):
            if on_device:
                self.on_device[tensor] = True
            else:
                self.on_device.pop(tensor, None)
        return value

    def _copy_to(self, tensor: torch.Tensor, out: torch.Tensor, on_device: bool) -> torch.Tensor:
        if out is tensor and self.is_device(tensor) != on_device:
            out = out.clone()  # a transfer copies; the source keeps its device
        return self._place(out, on_device)

    # --- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        owner = getattr(getattr(func, "__self__", None), "__name__", None)  # getset descriptors
        if name == "__get__" and owner == "device":
            return EMULATED if self.is_device(args[0]) else func(*args, **kwargs)
        if name == "__set__":  # param.data = value, tensor.grad = value: the owner follows the value
            out = func(*args, **kwargs)
            if owner in ("data", "grad") and isinstance(args[1], torch.Tensor):
                self._place(args[0], self.is_device(args[1]))
            return out
        if name in ("to", "cpu", "cuda", "numpy", "__array__") and args and isinstance(args[0], torch.Tensor):
            return self._transfer(func, name, args, kwargs)
        tensors = _tensors((args, kwargs))
        on_device = [t for t in tensors if self.is_device(t)]
        self._record_sync(name, args, on_device)
        if on_device and name not in CROSS_DEVICE:
            host = [t for t in tensors if not self.is_device(t) and t.dim() > 0]
            if name in INDEXING and self.is_device(args[0]):
                host = []  # host indices and values (a copy) into a device tensor
            if host:
                raise DeviceMismatch(
                    f"{name}: a host tensor {tuple(host[0].shape)} met tensors on the device {EMULATED} at {_where()}"
                )
        out = func(*args, **kwargs)
        if name in CROSS_DEVICE or out is None:
            return out
        device = kwargs.get("device")
        if device is not None:
            return self._place(out, torch.device(device) == EMULATED)
        return self._place(out, bool(on_device)) if on_device else out

    def _transfer(self, func, name, args, kwargs):
        tensor = args[0]
        if self.recording and self.is_device(tensor) and name in ("cpu", "numpy", "__array__", "to"):
            target = None if name != "to" else torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if name != "to" or (target is not None and torch.device(target) != EMULATED):
                self.syncs.append(f"{name} (a copy to the host) at {_caller()}")
        if name in ("numpy", "__array__"):
            if self.is_device(tensor):
                raise DeviceMismatch(f"{name}() of a tensor on the device {EMULATED} at {_where()} (call .cpu() first)")
            return func(*args, **kwargs)
        if name == "cuda":
            raise DeviceMismatch(f".cuda() at {_where()}: use the device of the model or data")
        out = func(*args, **kwargs)
        if name == "cpu":
            return self._copy_to(tensor, out, False)
        device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        if device is None:  # a dtype or memory-format change stays where it is
            return self._place(out, self.is_device(tensor))
        return self._copy_to(tensor, out, torch.device(device) == EMULATED)


@contextlib.contextmanager
def on_emulated_device() -> Iterator[EmulatedDevice]:
    """Track devices (see the module docs) while the block runs."""
    with EmulatedDevice() as mode:
        yield mode
