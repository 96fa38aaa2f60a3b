"""``python run.py ...`` for the tests, forked from a process that has imported what a run imports.

A ``python run.py`` started by a test spends about 3 s of CPU importing torch, torchvision,
Lightning and what they import, before its first line of our code; the default suite starts
dozens. :func:`run_py` asks multiprocessing's ``forkserver`` (one per pytest worker, started
on first use) whose preload made those imports once, with the collector paused as ``run.py``
does; each run is a fork of it that then does what the interpreter does for ``python
run.py``: working directory, environment, ``sys.argv``, ``sys.path``, its own stdout and
stderr, the exit status of ``SystemExit`` or of an uncaught exception (its traceback on
stderr), non-daemon threads joined, ``atexit`` handlers. Hydra's command line, the run, its
files and its console are the real code in a process of their own.

Measured on 2 cores, the default suite alternating with the code before (clean clones):
201.9 s before, 188.5 s after; 208.2 s, 194.8 s (busy CPU 387.6 -> 360.9 and 398.8 -> 373.6
core-seconds, from ``/proc/stat``). A short quick-start run: 4.5 s started, 1.1 s forked.

``MCHAD_TESTS_REAL_STARTS=1 pytest`` starts every run as its own interpreter, as before.

What a fork cannot have of a fresh interpreter, and how it is kept out of the tests:

* The settings an interpreter reads as it starts (``PYTHON*`` variables, locale, torch's
  and OpenMP's): a request whose values differ from the server's runs as a real process
  (``PYTHONWARNINGS`` and ``PYTHONUNBUFFERED`` are applied in the fork, as at a start).
* What is imported already: a test of what a command imports (``-X importtime``), of a copy
  of the project (its own sources) or of another script starts a real process.
* The hash seed is the server's, the same for all its runs: a test comparing two runs
  started this way compares them under one seed.
* Signals: a test that signals or watches a run holds a real process (``subprocess.Popen``).
* What an import decides from the state it meets: Lightning adds a console handler of its own
  where the root logger has none, as in the server; a run imports it once Hydra has set up
  logging, so the preload gives the root logger a stand-in handler (found by
  ``test_console_is_quiet_when_not_a_terminal``, whose run is forked).
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "run.py"
#: environment variables read as an interpreter starts, or by the server's imports (OpenMP's
#: threads, torch's settings, Lightning's rank and warnings): a request must agree with the
#: server on them, except those :func:`_start_like_python` applies
START_VARIABLES = (
    *("PYTHON", "LC_", "LANG", "LD_", "MALLOC_", "OMP_", "MKL_", "KMP_", "TORCH"),
    *("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "POSSIBLE_USER_WARNINGS"),
)
APPLIED_IN_FORK = ("PYTHONWARNINGS", "PYTHONUNBUFFERED")

if "pytest" not in sys.modules:  # imported as the fork server's preload (pytest never is)
    from mchad.runs.collector import import_heavy

    _FILTERS_AT_START = list(warnings.filters)
    # a run imports them once Hydra has set up logging: Lightning then adds no console handler
    # of its own (it does where the root logger has none), its records go through the root's
    _stand_in = logging.NullHandler()
    logging.getLogger().addHandler(_stand_in)
    import_heavy("mchad.runs.train")
    import mchad.cli  # noqa: F401
    import mchad.task  # noqa: F401

    logging.getLogger().removeHandler(_stand_in)
    _LIBRARY_FILTERS = warnings.filters[: len(warnings.filters) - len(_FILTERS_AT_START)]
    assert warnings.filters[len(_LIBRARY_FILTERS) :] == _FILTERS_AT_START, "an import appended a filter"

_server: dict = {}  # this worker's: its context, environment at start, sys.path of a fresh start


def run_py(
    args: list[str], *, cwd: Path | str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """As ``subprocess.run([sys.executable, "run.py", *args], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)``, forked when the environment allows it."""
    command = [sys.executable, str(RUN_PY), *args]
    env = dict(os.environ if env is None else env)
    if not forkable(env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forked-run-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        target_args = (str(RUN_PY), list(args), str(cwd), env, str(out), str(err), _server["path"])
        process = _server["context"].Process(target=_run, args=target_args, daemon=False)
        process.start()
        process.join(timeout)
        if process.exitcode is None:  # as subprocess.run: the run is killed, its output kept
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, _read(out), _read(err))
        return subprocess.CompletedProcess(command, process.exitcode, _read(out), _read(err))


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""  # text mode, universal newlines: as text=True


def _start_settings(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(START_VARIABLES) and k not in APPLIED_IN_FORK}


def forkable(env: dict[str, str]) -> bool:
    """Whether a run with this environment can be forked from this worker's server
    (``MCHAD_TESTS_REAL_STARTS=1``: never, every run starts its own interpreter)."""
    if os.environ.get("MCHAD_TESTS_REAL_STARTS", "") not in ("", "0"):
        return False
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if env.get("PYTHONWARNINGS") and not all(hasattr(warnings, f) for f in ("_processoptions", "_filters_mutated")):
        return False  # this Python's warnings module has not the functions _warning_options calls
    if not _server:
        _start_server()
    return _server["path"] is not None and _start_settings(env) == _server["settings"]


def _start_server() -> None:
    """The fork server's preload is this module (outside pytest it makes a run's imports); the
    ``sys.path`` that ``python run.py`` would have here must find the same ``mchad``."""
    fresh = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=True,
    )
    path = [str(ROOT), *json.loads(fresh.stdout)]
    import importlib.machinery

    import mchad

    spec = importlib.machinery.PathFinder.find_spec("mchad", path)
    same = spec is not None and spec.origin == mchad.__file__ and not sys.warnoptions
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    settings = _start_settings(dict(os.environ))
    # the server finds this module on its PYTHONPATH: in Python 3.11 its start ignores sys.path
    # (its preparation data's ``sys_path``); forks get a fresh start's sys.path (_start_like_python)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([before] if before else [])])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop("PYTHONPATH") if before is None else os.environ.update(PYTHONPATH=before)
    _server.update(context=context, settings=settings, path=path if same else None)


# ----------------------------------------------------------------------------- in the fork


def _run(script: str, args: list[str], cwd: str, env: dict, out: str, err: str, path: list[str]) -> None:
    _start_like_python(script, args, cwd, env, out, err, path)
    interrupted = False
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, True
    except BaseException:  # noqa: BLE001 - the interpreter's top level: traceback, status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit_like_python(code, interrupted)


def _start_like_python(script, args, cwd, env, out, err, path) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # found again from this environment (TMPDIR), as at a start
    for fd, name in ((1, out), (2, err)):
        file = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True)
    sys.argv = [script, *args]
    sys.path[:] = [os.path.dirname(script), *path[1:]]
    options = [o for o in env.get("PYTHONWARNINGS", "").split(",") if o]
    if options:  # the server started without any: its filters are a fresh start's
        _warning_options(options)


def _warning_options(options: list[str]) -> None:
    """The filters of ``PYTHONWARNINGS``: at a start they go before the defaults and after
    the filters the imports add (in front of all, as libraries do; checked at the preload)."""
    sys.warnoptions[:] = options
    warnings.filters[:] = []
    warnings._processoptions(options)  # what the warnings module does with them at a start
    warnings.filters[:] = _LIBRARY_FILTERS + warnings.filters + _FILTERS_AT_START
    warnings._filters_mutated()


def _exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # SystemExit("message"): the interpreter prints it, status 1
    return 1


def _exit_like_python(code: int, interrupted: bool) -> None:
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None and not stream.closed:
            stream.flush()
    if interrupted:  # an uncaught Ctrl-C ends the interpreter by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)
