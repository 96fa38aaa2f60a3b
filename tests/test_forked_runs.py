"""tests/forked_runs.py: a forked ``python run.py`` ends as a started one."""

from __future__ import annotations

import re

import forked_runs
import pytest
from conftest import _test_env


def _without_times(text: str) -> list[str]:
    return [re.sub(r"^\[[0-9-]+ [0-9:,]+\]", "[time]", line) for line in text.splitlines()]


def test_a_forked_run_ends_as_a_started_one(failed_run, tmp_path):
    """The shared failing run (``python -X importtime run.py model.margin=-1``, a real start) and
    the same command forked: the same exit status, console, log lines and FAILED.txt."""
    env = _test_env()
    if not forked_runs.forkable(env):
        pytest.skip("runs start as real processes here (tests/forked_runs.py: forkable)")
    forked = forked_runs.run_py(
        ["model.margin=-1", "trainer.max_epochs=1", f"paths.log_dir={tmp_path}"], cwd=tmp_path, env=env
    )
    assert forked.returncode == failed_run.returncode == 1
    assert forked.stderr.splitlines() == failed_run.console().splitlines()
    assert _without_times(forked.stdout) == _without_times(failed_run.stdout)
    (mine,) = tmp_path.glob("runs/*/*/FAILED.txt")
    (theirs,) = failed_run.logs.glob("runs/*/*/FAILED.txt")
    assert mine.read_text() == theirs.read_text()


def test_a_request_the_server_cannot_start_like_runs_as_a_real_process(tmp_path):
    """Another interpreter setting (here the hash seed) is not forked: it needs a fresh start."""
    env = {**_test_env(), "PYTHONHASHSEED": "123"}
    assert not forked_runs.forkable(env)
    result = forked_runs.run_py(["modle.margin=2", f"paths.log_dir={tmp_path}"], cwd=tmp_path, env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
