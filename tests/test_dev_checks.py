"""The contributor's checks are CI's: what .ci/run runs (lint, format, the suite) is what the
README's Development section tells a contributor to run and what pre-commit runs on a commit,
and the tree passes the lint and format checks."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml
from conftest import ROOT


def ci_commands() -> list[str]:
    """The checks .ci/run runs after installing (one command a line)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if re.match(r"\s*(ruff|python -m pytest)\b", line)]


def development_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))


def test_ci_runs_lint_format_and_the_suite_in_that_order():
    assert ci_commands() == [
        "ruff check .",
        "ruff format --check .",
        "python -m pytest -q",
        "python -m pytest -q -n0 -m slow tests/test_slurm.py",  # issue 41: SLURM preemption and srun in CI
    ]


def test_readme_development_section_names_every_ci_check():
    block = development_block()
    for command in ci_commands():
        plain = command.replace("python -m pytest -q", "pytest").replace("pytest -n0 ", "pytest ")
        assert re.search(rf"(^|&& ){re.escape(plain)}(\s|$)", block, re.M), f"README's Development lacks {plain!r}"
    assert "pre-commit install" in block


def test_pre_commit_runs_the_same_ruff_checks():
    hooks = [
        h for repo in yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"] for h in repo["hooks"]
    ]
    entries = {h["entry"].split(" --force-exclude")[0] for h in hooks}
    assert entries == {c.removesuffix(" .") for c in ci_commands() if c.startswith("ruff")}


def test_the_tree_is_lint_clean_and_formatted():
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"
