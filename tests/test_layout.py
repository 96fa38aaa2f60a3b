"""The package's layout stays readable: modules grouped by concern into layers that import only
downwards, no import cycles, no module over 600 lines, a small top level, and the
"Adding a method" / "Adding a dataset" walk-throughs of docs/layout-and-extending.md work as
written."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, compose_config

PACKAGE = ROOT / "src" / "mchad"
WALKTHROUGHS = ROOT / "docs" / "layout-and-extending.md"
MAX_LINES = 600
#: lines of a function or method in src/, its signature and docstring included
MAX_FUNCTION_LINES = 60
#: modules of the top level beside the subpackages (``__init__`` not counted)
MAX_TOP_LEVEL = 9

#: The package's layers, highest first: a module may import from its own layer and the ones
#: below it only. An entry names a module or a subpackage (all its modules); the package's
#: own ``__init__`` is the root's name (``mchad``), in the base layer.
LAYERS = {
    "task": ["mchad.task", "mchad.cli"],
    "sweeps, bench": ["mchad.sweeps", "mchad.bench"],
    "runs": ["mchad.runs"],
    "callbacks, models": ["mchad.callbacks", "mchad.models"],
    "results": ["mchad.results"],
    "data": ["mchad.data"],
    "base": [
        "mchad",
        "mchad.errors",
        "mchad.devices",
        "mchad.distributed",
        "mchad.checkpoints",
        "mchad.failures",
        "mchad.resolvers",
        "mchad.targets",
        "mchad.registry",
    ],
}


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
    inside functions (``from mchad.results import plots`` is ``mchad.results.plots``, ``from mchad.x import y``
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


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` for every module below ``package``."""
    modules = module_names(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(package: Path) -> list[list[str]]:
    """Each group of modules that import one another, directly or round a longer circle
    (the strongly connected components of the import graph with more than one module)."""
    graph = import_graph(package)
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


def layer_of(name: str, layers: dict[str, list[str]]) -> int | None:
    """The rank of ``name``'s layer (0: the lowest), by the longest entry naming it or a
    package above it (the root package's entry names its ``__init__`` only); None if undeclared."""
    root = name.split(".")[0]
    matches = [
        (len(entry), rank)
        for rank, entries in enumerate(reversed(list(layers.values())))
        for entry in entries
        if name == entry or (entry != root and name.startswith(entry + "."))
    ]
    return max(matches)[1] if matches else None


def layer_violations(package: Path, layers: dict[str, list[str]]) -> list[str]:
    """One line per import from a higher layer (``<file> imports <module> (<layer> above
    <layer>)``) and per module in no declared layer."""
    modules = module_names(package)
    names = list(reversed(layers))
    found = []
    for name, imported in sorted(import_graph(package).items()):
        where = modules[name].relative_to(package.parent).as_posix()
        rank = layer_of(name, layers)
        if rank is None:
            found.append(f"{where}: {name} is in no layer of LAYERS (declare it)")
            continue
        for other in sorted(imported):
            other_rank = layer_of(other, layers)
            if other_rank is not None and other_rank > rank:
                found.append(f"{where} imports {other} (layer '{names[other_rank]}' is above '{names[rank]}')")
    return found


def test_no_module_imports_from_a_higher_layer():
    violations = layer_violations(PACKAGE, LAYERS)
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_the_layer_check_sees_upward_imports(tmp_path):
    package = tmp_path / "pkg"
    for sub in ("task", "runs", "data"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from pkg import base\n")
    (package / "base.py").write_text("X = 1\n")
    (package / "task" / "main.py").write_text("from pkg.runs.job import run\nimport pkg.data.read\n")
    (package / "runs" / "job.py").write_text("from pkg import base\nfrom pkg.data import read\nfrom . import other\n")
    (package / "runs" / "other.py").write_text("")
    (package / "data" / "read.py").write_text("import pkg.base\n")
    layers = {"task": ["pkg.task"], "runs": ["pkg.runs"], "data": ["pkg.data"], "base": ["pkg", "pkg.base"]}
    assert layer_violations(package, layers) == []  # downwards and within a layer only
    (package / "data" / "read.py").write_text("def f():\n    from ..runs.job import run\n")  # function-level, relative
    (package / "base.py").write_text("import pkg.task.main\n")
    (package / "__init__.py").write_text("from pkg.data.read import f\n")
    (package / "stray.py").write_text("")
    assert layer_violations(package, layers) == [
        "pkg/__init__.py imports pkg.data.read (layer 'data' is above 'base')",
        "pkg/base.py imports pkg.task.main (layer 'task' is above 'base')",
        "pkg/data/read.py imports pkg.runs.job (layer 'runs' is above 'data')",
        "pkg/stray.py: pkg.stray is in no layer of LAYERS (declare it)",
    ]


def test_the_top_level_holds_few_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules beside the subpackages (at most {MAX_TOP_LEVEL}): {top}"


def test_no_module_is_longer_than_600_lines():
    lengths = {
        path.relative_to(ROOT): len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")
    }
    assert not {p: n for p, n in lengths.items() if n > MAX_LINES}


def long_functions(root: Path, limit: int) -> dict[str, int]:
    """``{"path:line name": lines}`` of every function or method below ``root`` longer than ``limit`` lines."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"] = lines
    return found


def test_no_function_in_src_is_longer_than_60_lines():
    assert long_functions(ROOT / "src", MAX_FUNCTION_LINES) == {}


def test_long_functions_are_found(tmp_path):
    """Guards the check above: a 61-line function and method are reported; a 60-line function and
    a class of 62 lines whose method has 60 are not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    method = "".join(f"        x{i} = {i}\n" for i in range(59))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        f"def long():\n{body}    return 0\n\n\ndef short():\n{body}\n\n"
        f"class C:\n    def m(self):\n{method}\n\nclass D:\n    def m(self):\n{method}        return 0\n"
    )
    assert long_functions(tmp_path / "pkg", 60) == {"pkg/m.py:1 long": 61, "pkg/m.py:190 m": 61}


# ----------------------------------------------------------------------------- docs walk-throughs


#: a code block's first comment line naming its file; "(at its end)": appended to that file
FILE_LINE = re.compile(r"# (\S+\.(?:py|yaml))( \(at its end\))?")


def walkthrough(title: str) -> tuple[dict[str, str], list[str], set[str]]:
    """The section ``## <title>`` of docs/layout-and-extending.md: its files (code blocks that
    name their file in a comment line at the top), the overrides of its ``python run.py``
    command and the files it adds to rather than creates (``# <file> (at its end)``)."""
    page = WALKTHROUGHS.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert found is not None, f"{WALKTHROUGHS.name} has no section '## {title}'"
    section = found.group(1)
    files, command, appended = {}, None, set()
    for indent, block in re.findall(r"^( *)```\w*\n(.*?)^\1```", section, re.S | re.M):
        lines = [line[len(indent) :] for line in block.splitlines()]
        if lines[0].startswith("python run.py "):
            command = shlex.split(lines[0])[2:]
        else:  # the file's name: a comment line of its own at the top
            at = next(i for i, line in enumerate(lines) if FILE_LINE.fullmatch(line))
            name, append = FILE_LINE.fullmatch(lines[at]).groups()
            files[name] = "\n".join(lines[:at] + lines[at + 1 :]) + "\n"
            if append:
                appended.add(name)
    assert command is not None, f"{WALKTHROUGHS.name}'s '{title}' has no `python run.py` command"
    return files, command, appended


def follow(title: str, tmp_path: Path, monkeypatch, extra: list[str]) -> pd.DataFrame:
    """Write the walk-through's files (modules on the Python path, configs in a config folder
    Hydra searches), run its command and return results.csv."""
    from mchad.runs.train import run

    files, command, appended = walkthrough(title)
    assert not appended, "a walk-through that adds to the project's files: follow it in a copy (project_copy)"
    code, configs = tmp_path / "code", tmp_path / "config"
    for name, text in files.items():
        target = configs / name.removeprefix("config/") if name.startswith("config/") else code / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(code))
    cfg = compose_config([*command, f"hydra.searchpath=[file://{configs}]", *extra], output_dir=tmp_path / "run")
    return pd.read_csv(run(cfg))


#: what a copy of the project needs to run, sweep and aggregate (no tests, no data: the quick-start's
#: digits come with scikit-learn)
PROJECT_PARTS = ("run.py", "config", "src", "bash")


def project_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    for part in PROJECT_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, copy / part)
    return copy


def in_copy(copy: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A command in the project copy, with its own package (not this checkout's) on the path."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MCHAD_", "PYTEST_")) and k != "PYTHONPATH"}
    base.update(PYTHONPATH=str(copy / "src"), PYTHON=sys.executable, **env)
    return subprocess.run(list(args), cwd=copy, env=base, capture_output=True, text=True, timeout=600)


COMPOSE_SNIPPET = """
import sys
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
import mchad
from mchad.runs.collector import import_heavy
from mchad.targets import VERSION_BASE_KWARGS, check_targets
import_heavy("mchad.models.methods")  # torch and pytorch-ood, as the project's commands import them
for name in sys.argv[1:]:
    with initialize_config_dir(config_dir=str(__import__("pathlib").Path("config").resolve()), **VERSION_BASE_KWARGS):
        cfg = compose("train", overrides=[f"experiment={name}", "model.weight_ce=0.25"])
    check_targets(cfg)
    print(cfg.name, cfg.model.name, cfg.datamodule._target_, instantiate(cfg.model.method).weights["nll"])
"""


def test_adding_a_method_as_the_docs_say(tmp_path):
    """Follow "Adding a method" in a copy of the project (its class, model config and registry
    entry only): the documented run trains; its experiments compose on every benchmark; a value
    it does not read is refused; the replication scripts sweep it."""
    copy, command = add_method_as_documented(tmp_path)
    result = in_copy(copy, sys.executable, "run.py", *command, f"paths.log_dir={tmp_path / 'logs'}")
    assert result.returncode == 0, result.stderr[-3000:]
    (results,) = (tmp_path / "logs").rglob("results.csv")
    frame = pd.read_csv(results)
    assert (frame.method == "ProtoX").all()
    assert list(dict.fromkeys(frame.score)) == ["distance", "msp"]
    assert set(frame.test_case) == {"Digits6-9", "GaussianNoise", "UniformNoise"}
    assert frame[["Accuracy", "AUROC"]].notna().all().all()

    names = ["cifar10-protox", "svhn-protox", "openood-cifar100-protox", "osr-cifar10-protox"]
    composed = in_copy(copy, sys.executable, "-c", COMPOSE_SNIPPET, *names)
    assert composed.returncode == 0, composed.stderr[-3000:]
    rows = [line.split() for line in composed.stdout.splitlines()]
    assert [row[:2] for row in rows] == [[name, "ProtoX"] for name in names]
    assert [row[2] for row in rows] == ["mchad.data.OODDataModule"] * 2 + [
        "mchad.data.OODDataModule",
        "mchad.data.OpenSetDataModule",
    ]
    assert {row[3] for row in rows} == {"0.25"}  # a value it reads reaches the method

    refused = in_copy(copy, sys.executable, "run.py", "experiment=cifar10-protox", "+model.weight_center=7")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "model.weight_center=7 is read by nothing" in lines[0], lines

    for script, expected in (
        ("run-experiments.sh", "cifar10-protox"),
        ("run-openood.sh", "openood-cifar10-protox"),
        ("run-openset.sh", "osr-cifar10-protox"),
    ):
        dry = in_copy(copy, "bash", f"bash/{script}", "--dry-run", PRETRAINED="none")
        assert dry.returncode == 0, dry.stderr
        (line,) = [line for line in dry.stdout.splitlines() if line.startswith("+ ")]
        experiments = next(a for a in shlex.split(line[2:]) if a.startswith("experiment=")).split("=", 1)[1]
        assert expected in experiments.split(","), (script, experiments)


def add_method_as_documented(tmp_path: Path) -> tuple[Path, list[str]]:
    """A project copy with the walk-through's method added (its files only); its run command."""
    copy = project_copy(tmp_path)
    files, command, appended = walkthrough("Adding a method")
    assert len(files) <= 3 and appended == {"src/mchad/registry/methods.yaml"}
    for name, text in files.items():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((target.read_text(encoding="utf-8") if name in appended else "") + text, encoding="utf-8")
    return copy, command


@pytest.mark.slow  # two trainings and the aggregate in subprocesses: about a minute on 2 cores
def test_a_sweep_with_the_added_method_aggregates_its_row_in_its_place(tmp_path):
    """Sweep the added method and MCHAD (in that order) and aggregate: the table has its row,
    after MCHAD as the registry orders them."""
    copy, _ = add_method_as_documented(tmp_path)
    logs = tmp_path / "logs"
    sweep = in_copy(
        copy, sys.executable, "run.py", "-m", "model=protox,mchad", "hydra/launcher=basic",
        "++trainer.fast_dev_run=true", f"paths.log_dir={logs}",
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    (folder,) = (logs / "multiruns").iterdir()
    aggregate = in_copy(copy, sys.executable, "-m", "mchad.results.aggregate", str(folder))
    assert aggregate.returncode == 0, aggregate.stderr[-3000:]
    table = pd.read_csv(folder / "aggregate" / "table.csv")
    assert list(table.Model) == ["MCHAD", "ProtoX"]
    assert list(table.Score) == ["distance", "distance"]


def test_adding_a_dataset_as_the_docs_say(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "datasets" / "mydata").mkdir(parents=True)
    for split, n in (("train", 150), ("test", 30)):
        labels = np.arange(n) % 3  # 3 classes, told apart by their colour
        images = rng.normal(60, 20, (n, 32, 32, 3))
        images[np.arange(n), :, :, labels] += 120
        np.savez(
            tmp_path / "datasets" / "mydata" / f"{split}.npz",
            images=images.clip(0, 255).astype(np.uint8),
            labels=labels,
        )
    frame = follow("Adding a dataset", tmp_path, monkeypatch, [f"dataset_dir={tmp_path / 'datasets'}"])
    assert (frame.id_dataset == "MyData").all()
    assert set(frame.test_case) == {"GaussianNoise", "UniformNoise"}
    assert frame[["Accuracy", "AUROC"]].notna().all().all()
