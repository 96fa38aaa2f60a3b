"""What a new user met (issue 39): provenance of untracked code, the own-data page offline,
library noise on the console, and one-line messages for a truncated checkpoint, a missing image
folder and a value of the wrong type."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mchad.runs import provenance


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_changes_with_an_untracked_module(tmp_path):
    """A method kept in an untracked file (docs/layout-and-extending.md's my_methods.py) is code
    the run imported: editing it gives another code version, also seen from a subfolder."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "src" / "loss.py").write_text("weight = 1\n")
    (repo / ".gitignore").write_text("/logs/\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    (repo / "my_methods.py").write_text("weight = 2.0\n")
    first = provenance.code_version(provenance.code_state(repo / "src"))
    (repo / "my_methods.py").write_text("weight = 9.0\n")
    second = provenance.code_version(provenance.code_state(repo / "src"))
    assert ".dirty-" in first and ".dirty-" in second and first != second
    (repo / "logs").mkdir()  # ignored files (a run's outputs) are not code
    (repo / "logs" / "results.csv").write_text("a,b\n")
    assert provenance.code_version(provenance.code_state(repo / "src")) == second
