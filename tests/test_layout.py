"""The package's layout stays readable: no import cycles, no module over 600 lines, and the
"Adding a method" / "Adding a dataset" walk-throughs of docs/layout-and-extending.md work as
written."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, compose_config

PACKAGE = ROOT / "src" / "mchad"
WALKTHROUGHS = ROOT / "docs" / "layout-and-extending.md"
MAX_LINES = 600


# ----------------------------------------------------------------------------- imports


def module_names(package: Path) -> dict[str, Path]:
    """``{"mchad.callbacks.views": path, ...}`` for every module of the package below ``package``."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file: at module level and
    inside functions (``from mchad import plots`` is ``mchad.plots``, ``from mchad.x import y``
    is ``mchad.x`` unless ``y`` is a module itself)."""
    root = next(iter(modules)).split(".")[0]
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:  # `import mchad.data.sources` -> that module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == root and target != name:
                found.add(target)
    return found


def import_cycles(package: Path) -> list[list[str]]:
    """Each group of modules that import one another, directly or round a longer circle
    (the strongly connected components of the import graph with more than one module)."""
    modules = module_names(package)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:  # Tarjan's algorithm
        index[name] = low[name] = len(index)
        stack.append(name)
        for other in sorted(graph[name]):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            group = []
            while not group or group[-1] != name:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_function_level_and_longer_circles(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import c\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "sub" / "__init__.py").write_text("from .c import X\n")
    (package / "sub" / "c.py").write_text("import pkg.b\nX = 1\n")
    (package / "d.py").write_text("from pkg.a import something\n")  # imports into the circle only
    assert import_cycles(package) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    (package / "b.py").write_text("def f():\n    pass\n")
    assert import_cycles(package) == []
    # a module that imports its own package, whose __init__ imports it (relatively)
    (package / "sub" / "c.py").write_text("from pkg.sub import X\n")
    assert import_cycles(package) == [["pkg.sub", "pkg.sub.c"]]


def test_no_module_is_longer_than_600_lines():
    lengths = {path.relative_to(ROOT): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in lengths.items() if n > MAX_LINES}


# ----------------------------------------------------------------------------- docs walk-throughs


def walkthrough(title: str) -> tuple[dict[str, str], list[str]]:
    """The section ``## <title>`` of docs/layout-and-extending.md: its files (code blocks that
    name their file in a comment line at the top) and the overrides of its ``python run.py``
    command."""
    page = WALKTHROUGHS.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert found is not None, f"{WALKTHROUGHS.name} has no section '## {title}'"
    section = found.group(1)
    files, command = {}, None
    for indent, block in re.findall(r"^( *)```\w*\n(.*?)^\1```", section, re.S | re.M):
        lines = [line[len(indent):] for line in block.splitlines()]
        if lines[0].startswith("python run.py "):
            command = shlex.split(lines[0])[2:]
        else:  # the file's name: a comment line of its own at the top
            at = next(i for i, line in enumerate(lines) if re.fullmatch(r"# \S+\.(py|yaml)", line))
            name = lines[at][2:]
            files[name] = "\n".join(lines[:at] + lines[at + 1 :]) + "\n"
    assert command is not None, f"{WALKTHROUGHS.name}'s '{title}' has no `python run.py` command"
    return files, command


def follow(title: str, tmp_path: Path, monkeypatch, extra: list[str]) -> pd.DataFrame:
    """Write the walk-through's files (modules on the Python path, configs in a config folder
    Hydra searches), run its command and return results.csv."""
    from mchad.train import run

    files, command = walkthrough(title)
    code, configs = tmp_path / "code", tmp_path / "config"
    for name, text in files.items():
        target = configs / name.removeprefix("config/") if name.startswith("config/") else code / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(code))
    cfg = compose_config([*command, f"hydra.searchpath=[file://{configs}]", *extra], output_dir=tmp_path / "run")
    return pd.read_csv(run(cfg))


def test_adding_a_method_as_the_docs_say(tmp_path, monkeypatch):
    frame = follow("Adding a method", tmp_path, monkeypatch, [])
    assert (frame.method == "Energy").all()
    assert list(dict.fromkeys(frame.score)) == ["energy", "msp"]
    assert set(frame.test_case) == {"Digits6-9", "GaussianNoise", "UniformNoise"}
    assert frame[["Accuracy", "AUROC"]].notna().all().all()


def test_adding_a_dataset_as_the_docs_say(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "datasets" / "mydata").mkdir(parents=True)
    for split, n in (("train", 150), ("test", 30)):
        labels = np.arange(n) % 3  # 3 classes, told apart by their colour
        images = rng.normal(60, 20, (n, 32, 32, 3))
        images[np.arange(n), :, :, labels] += 120
        np.savez(tmp_path / "datasets" / "mydata" / f"{split}.npz", images=images.clip(0, 255).astype(np.uint8), labels=labels)
    frame = follow("Adding a dataset", tmp_path, monkeypatch, [f"dataset_dir={tmp_path / 'datasets'}"])
    assert (frame.id_dataset == "MyData").all()
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    assert frame[["Accuracy", "AUROC"]].notna().all().all()
