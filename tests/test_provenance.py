"""Provenance of a run (mchad.runs.provenance): code state with and without git, the config hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import compose_config

from mchad.runs import provenance


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_code_state_outside_git_is_unknown_and_never_fails(tmp_path, monkeypatch):
    """No checkout (an installed package) and no git at all both give 'unknown', not an error."""
    state = provenance.code_state(tmp_path)
    assert state["git_commit"] == provenance.UNKNOWN and state["git_dirty"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    state = provenance.code_state()
    assert state["git_commit"] == provenance.UNKNOWN
    assert provenance.code_version(state) == f"{state['package_version']}+unknown"


def test_code_state_names_the_commit_and_its_changes(tmp_path):
    """The commit, a dirty flag and a hash of the uncommitted changes (two different edits of
    one commit are two code versions)."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "loss.py").write_text("weight = 1\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance.code_state(repo)
    assert clean["git_commit"] == _git(repo, "rev-parse", "HEAD") and clean["git_dirty"] is False
    assert provenance.code_version(clean).endswith("+" + clean["git_commit"][:12])
    (repo / "loss.py").write_text("weight = 2\n")
    first = provenance.code_version(provenance.code_state(repo))
    (repo / "loss.py").write_text("weight = 3\n")
    second = provenance.code_version(provenance.code_state(repo))
    assert ".dirty-" in first and ".dirty-" in second and first != second


def test_config_hash_ignores_seed_and_locations_but_not_settings(tmp_path):
    """Trials of one sweep (other seed, other run folder) share the hash; another setting does not."""
    base = provenance.config_hash(compose_config(["seed=1"], tmp_path / "a"))
    assert provenance.config_hash(compose_config(["seed=2", f"dataset_dir={tmp_path}"], tmp_path / "b")) == base
    assert provenance.config_hash(compose_config(["seed=1", "model.weight_center=2"], tmp_path / "c")) != base


def test_config_hash_of_a_saved_config_is_the_same(tmp_path):
    """A resumed run starts from its resolved config.yaml (datamodule.seed written out, no
    longer ${seed}): its hash equals the original run's."""
    from omegaconf import OmegaConf

    cfg = compose_config(["seed=3"], tmp_path)
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert provenance.config_hash(OmegaConf.load(tmp_path / "config.yaml")) == provenance.config_hash(cfg)
