"""CPU-side guards against tensors on the wrong device (CI has no GPU), see mchad.devices.

1. Static: every tensor factory call in ``src/mchad`` (``torch.zeros``, ``torch.from_numpy``,
   ``torch.Generator``, ... and ``torch.load``) says where its tensor goes: a ``device=``
   (``map_location=`` for ``torch.load``) argument, or a ``# cpu: <why>`` comment on the call
   or the line above it. A new factory cannot slip in without a decision.
2. Dynamic: training, validation with the default callbacks and testing run with the model
   and the batches on an emulated second device (:mod:`device_emulation`): a tensor made on
   the host and mixed into device computations fails there as it would on a GPU.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, compose_config
from device_emulation import EMULATED, DeviceMismatch, EmulatedDevice, on_emulated_device

SRC = ROOT / "src" / "mchad"

#: torch functions that create a tensor (or generator) from nothing: the device must be chosen
FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
    "randint", "randperm", "normal", "tensor", "as_tensor", "asarray", "from_numpy", "frombuffer",
    "empty_strided", "scalar_tensor", "tril_indices", "triu_indices", "Generator", "load",
}  # fmt: skip
DEVICE_KEYWORD = {"load": "map_location"}
MARKER = re.compile(r"#\s*cpu:\s*\S")


def unplaced_factories(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: torch.<factory>(...)`` for each factory call without a device decision."""
    tree = ast.parse(source)
    lines = source.splitlines()
    # the first line of the statement holding each node: a marker may sit on the line above it
    statement_line: dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    statement_line.setdefault(id(child), node.lineno)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            for alias in node.names:
                if alias.name in FACTORIES:
                    problems.append(f"{filename}:{node.lineno}: `from torch import {alias.name}` hides a factory from this check")
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
        ):
            continue
        keyword = DEVICE_KEYWORD.get(node.func.attr, "device")
        if any(k.arg == keyword for k in node.keywords):
            continue
        first = statement_line.get(id(node), node.lineno)
        span = lines[max(0, first - 2) : node.end_lineno]
        if any(MARKER.search(line) for line in span):
            continue
        problems.append(f"{filename}:{node.lineno}: torch.{node.func.attr}(...) without {keyword}= or a `# cpu: <why>` comment")
    return problems


def test_every_tensor_factory_in_the_package_says_where_its_tensor_goes():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += unplaced_factories(path.read_text(), str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "code, flagged",
    [
        ("x = torch.zeros(3)", True),
        ("x = torch.from_numpy(a)", True),
        ("x = torch.load(p)", True),
        ("from torch import zeros", True),
        ("x = torch.zeros(3,\n    dtype=torch.long)", True),
        ("x = torch.zeros(3, device=y.device)", False),
        ("x = torch.load(p, map_location='cpu')", False),
        ("x = torch.from_numpy(a)  # cpu: host data", False),
        ("# cpu: host data\nx = torch.full((n,), -1)", False),
        ("x = torch.cat([a, b])", False),
        ("x = torch.zeros_like(a)", False),
        ("x = torch.tensor(3)  # cpu:", True),  # a marker needs a reason
    ],
)
def test_the_static_check_flags_factories_without_a_decision(code, flagged):
    assert bool(unplaced_factories(code)) == flagged
