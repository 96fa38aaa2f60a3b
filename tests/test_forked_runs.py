"""tests/forked_runs.py: a forked ``python`` ends as a started one."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import forked_runs
import pytest
from conftest import ROOT, _test_env


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


def test_a_fork_with_another_pythonpath_starts_as_python_would(tmp_path):
    """A ``PYTHONPATH`` with a ``sitecustomize`` in front: ``python -c`` and ``python -m``, forked,
    print what they print started (sys.argv, sys.path[0], the customization first)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('customized')\n")
    env = {**_test_env(), "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    if not forked_runs.forkable(env):
        pytest.skip("runs start as real processes here (tests/forked_runs.py: forkable)")
    code = "import sys, __main__; print(sys.argv, repr(sys.path[0]), sys.path[1], __main__.__name__)"
    for argv in (["-c", code, "x"], ["-m", "mchad.registry", "keys"]):
        forked = forked_runs.start_python(argv, cwd=tmp_path, env=env).wait(120)
        started = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert (forked.returncode, forked.stdout, forked.stderr) == (started.returncode, started.stdout, started.stderr)
        assert forked.returncode == 0 and forked.stdout.startswith("customized\n"), forked.stderr


def test_a_pythonpath_that_would_find_an_imported_module_elsewhere_is_not_forked(tmp_path):
    """A fork has the server's numpy: a start whose path finds another one starts for real."""
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    env = {**_test_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    assert not forked_runs.forkable(env)
    assert forked_runs.forkable({**env, "PYTHONPATH": str(ROOT / "src")}) == forked_runs.forkable(_test_env())


@pytest.mark.parametrize("name", ["KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR"])
def test_settings_a_test_s_imports_add_reach_the_fork(name, tmp_path):
    """scikit-learn sets KMP_INIT_AT_FORK as it is imported, inductor its cache folder's variable
    as it compiles (in a test of this worker, say). Intel's OpenMP runtime, which reads the first,
    is loaded neither by the server nor by a run here; inductor reads the second where it uses it.
    So the run is forked all the same, with the variable in its environment."""
    if not forked_runs.forkable(_test_env()):
        pytest.skip("runs start as real processes here (tests/forked_runs.py: forkable)")
    if name.startswith("KMP_") and "KMP_" not in forked_runs._server["unread"]:
        pytest.skip("Intel's OpenMP runtime is loaded here: its settings need a real start")
    env = {**_test_env(), name: str(tmp_path)}
    assert forked_runs.forkable(env)
    code = f"import os; print(os.environ[{name!r}])"
    assert forked_runs.start_python(["-c", code], cwd=tmp_path, env=env).wait(60).stdout == f"{tmp_path}\n"
