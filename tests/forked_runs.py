"""``python run.py ...`` (or ``python -c``/``-m``) for the tests, forked from a process that has
imported what a run imports.

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
``python -c``, ``-m`` and other ``PYTHONPATH``s forked too (the DDP runs, the prepare command,
the four processes that load one data set), and KMP_* applied in the fork: 177.0 s before,
166.0 s after; 178.7 s, 158.6 s (busy CPU 339.0 -> 313.3 and 342.4 -> 295.8 core-seconds).

``MCHAD_TESTS_REAL_STARTS=1 pytest`` starts every run as its own interpreter, as before.

What a fork cannot have of a fresh interpreter, and how it is kept out of the tests:

* The settings an interpreter reads as it starts (``PYTHON*`` variables, locale, torch's
  and OpenMP's): a request whose values differ from the server's runs as a real process
  (``PYTHONWARNINGS`` and ``PYTHONUNBUFFERED`` are applied in the fork, as at a start).
* ``PYTHONPATH``: the fork gets the ``sys.path`` a start with the request's would have, and
  imports the ``sitecustomize`` found there, as ``site`` does; only if every module the server
  imported is found there where a start with the server's ``PYTHONPATH`` finds it (else a real
  process). A ``sitecustomize`` then meets those modules imported already.
* What is imported already: a test of what a command imports (``-X importtime``) or of a copy
  of the project (its own sources, found elsewhere: refused by the path check) starts a real
  process; so does one whose per-process state is the subject (two run ids in one second).
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
import importlib
import importlib.machinery
import json
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import types
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
APPLIED_IN_FORK = ("PYTHONWARNINGS", "PYTHONUNBUFFERED", "PYTHONPATH")
#: read from the environment where used, not on import (torch's inductor sets its cache folder's
#: variable in a worker that compiled, e.g. tests/test_compile.py): applied in the fork too
READ_AT_USE = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
#: imported by every start that finds one on its path (the ``site`` module)
CUSTOMIZE = ("sitecustomize", "usercustomize")

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

_server: dict = {}  # this worker's: its context, start settings, modules, sys.path per PYTHONPATH


def run_py(
    args: list[str], *, cwd: Path | str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """As ``subprocess.run([sys.executable, "run.py", *args], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)``, forked when the environment allows it."""
    return start_python([str(RUN_PY), *args], cwd=cwd, env=env).wait(timeout)


def start_python(argv: list[str], *, cwd: Path | str, env: dict[str, str] | None = None) -> Started:
    """As ``subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=PIPE,
    stderr=PIPE, text=True)``, forked when the environment allows it. ``argv``: a script and
    its arguments, ``["-c", code, *args]`` or ``["-m", module, *args]``."""
    env = dict(os.environ if env is None else env)
    command = [sys.executable, *argv]
    path = fork_path(env)
    if path is None:
        pipe = subprocess.PIPE
        return Started(command, subprocess.Popen(command, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True))
    folder = tempfile.mkdtemp(prefix="forked-run-")
    out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
    process = _server["context"].Process(target=_run, args=(list(argv), str(cwd), env, out, err, path), daemon=False)
    process.start()
    return Started(command, process, folder)


class Started:
    """A started ``python``: a real process (``subprocess.Popen``) or a fork of the server
    (a ``multiprocessing`` process writing its output to files in ``folder``)."""

    def __init__(self, command: list[str], process, folder: str | None = None):
        self.command, self.process, self.folder = command, process, folder

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """As the end of ``subprocess.run``: its output and exit status; past ``timeout`` it is
        killed and ``TimeoutExpired`` (with the output so far) raised."""
        if self.folder is None:
            try:
                out, err = self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
                raise subprocess.TimeoutExpired(self.command, timeout, out, err) from None
            return subprocess.CompletedProcess(self.command, self.process.returncode, out, err)
        try:
            self.process.join(timeout)
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join()
                raise subprocess.TimeoutExpired(self.command, timeout, self._read("stdout"), self._read("stderr"))
            return subprocess.CompletedProcess(
                self.command, self.process.exitcode, self._read("stdout"), self._read("stderr")
            )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _read(self, name: str) -> str:
        path = Path(self.folder, name)  # text mode, universal newlines: as text=True
        return path.read_text() if path.is_file() else ""


def _start_settings(env: dict[str, str], unread: tuple[str, ...] = ()) -> dict[str, str]:
    """The start-time settings in ``env``, but those applied in the fork and those whose reader
    the server has not loaded (``unread``: the fork's environment has them when it loads it)."""
    ignored = (*APPLIED_IN_FORK, *READ_AT_USE, *unread)
    return {k: v for k, v in env.items() if k.startswith(START_VARIABLES) and not k.startswith(ignored)}


def forkable(env: dict[str, str]) -> bool:
    """Whether a ``python`` with this environment can be forked from this worker's server."""
    return fork_path(env) is not None


def fork_path(env: dict[str, str]) -> list[str] | None:
    """The ``sys.path`` (its first entry aside) of a ``python`` started with ``env``, where a fork
    of this worker's server can stand in for that start; else None (``MCHAD_TESTS_REAL_STARTS=1``:
    always, every run starts its own interpreter)."""
    if os.environ.get("MCHAD_TESTS_REAL_STARTS", "") not in ("", "0"):
        return None
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    if env.get("PYTHONWARNINGS") and not all(hasattr(warnings, f) for f in ("_processoptions", "_filters_mutated")):
        return None  # this Python's warnings module has not the functions _warning_options calls
    if not _server:
        _start_server()
    if not _server["modules"] or _start_settings(env, _server["unread"]) != _server["settings"]:
        return None
    key = env.get("PYTHONPATH", "")
    if key not in _server["paths"]:
        path = _fresh_path(env)
        same = path is not None and all(_found(name, path) == found for name, found in _server["modules"].items())
        _server["paths"][key] = path if same else None
    return _server["paths"][key]


def _fresh_path(env: dict[str, str]) -> list[str] | None:
    """``sys.path`` of ``python -c`` started with ``env``, with a placeholder first entry (None:
    that start failed, e.g. in its ``sitecustomize``)."""
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if fresh.returncode != 0:
        return None
    return ["", *json.loads(fresh.stdout.splitlines()[-1])]  # the last line: a sitecustomize may print


def _found(name: str, path: list[str]) -> object:
    """Where an import of the top-level module ``name`` finds it on ``path`` (None: not there)."""
    spec = importlib.machinery.PathFinder.find_spec(name, path[1:])
    if spec is None:
        return None
    return spec.origin if spec.origin not in (None, "namespace") else tuple(spec.submodule_search_locations or ())


def _start_server() -> None:
    """The fork server's preload is this module (outside pytest it makes a run's imports); the
    ``sys.path`` that ``python run.py`` would have here must find the same ``mchad``. The
    modules it imported, and where this environment's start finds them, are what a request
    with another ``PYTHONPATH`` must find at the same places."""
    import mchad

    env = dict(os.environ)
    path = _fresh_path(env)
    same = path is not None and _found("mchad", path) == mchad.__file__ and not sys.warnoptions
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    # the server finds this module on its PYTHONPATH: in Python 3.11 its start ignores sys.path
    # (its preparation data's ``sys_path``); forks get a fresh start's sys.path (_start_like_python)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *([before] if before else [])])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop("PYTHONPATH") if before is None else os.environ.update(PYTHONPATH=before)
    names, libraries = _server_modules(context) if same else ([], [])
    modules = {name: _found(name, path) for name in names}
    # Intel's OpenMP runtime reads KMP_*; scikit-learn and joblib set two of them as they are
    # imported (by a test in this worker, say), and neither the server nor a run loads that runtime
    unread = () if any(name.startswith("libiomp") for name in libraries) else ("KMP_",)
    paths = {env.get("PYTHONPATH", ""): path}
    settings = _start_settings(env, unread)
    _server.update(context=context, settings=settings, unread=unread, modules=modules, paths=paths)


def _server_modules(context) -> tuple[list[str], list[str]]:
    """The top-level modules the server has imported (this module aside) and the shared
    libraries it has loaded (all, where /proc/self/maps is missing), from a fork of it."""
    with tempfile.TemporaryDirectory(prefix="forked-run-") as folder:
        listing = os.path.join(folder, "modules.json")
        process = context.Process(target=_list_modules, args=(listing,), daemon=False)
        process.start()
        process.join(60)
        if process.exitcode != 0:
            return [], []
        return tuple(json.loads(Path(listing).read_text()))


# ----------------------------------------------------------------------------- in the fork


def _run(argv: list[str], cwd: str, env: dict, out: str, err: str, path: list[str]) -> None:
    _start_like_python(argv, cwd, env, out, err, path)
    interrupted = False
    try:
        if argv[0] == "-c":
            main = types.ModuleType("__main__")
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
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


def _start_like_python(argv, cwd, env, out, err, path) -> None:
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
    # sys.path[0] and sys.argv as the interpreter sets them (for -m, runpy then puts the module's
    # file in sys.argv[0])
    if argv[0] in ("-c", "-m"):
        first, sys.argv = ("" if argv[0] == "-c" else os.getcwd()), [argv[0], *argv[2:]]
    else:
        first, sys.argv = os.path.dirname(argv[0]), list(argv)
    sys.path[:] = [first, *path[1:]]
    options = [o for o in env.get("PYTHONWARNINGS", "").split(",") if o]
    if options:  # the server started without any: its filters are a fresh start's
        _warning_options(options)
    for name in CUSTOMIZE[: 2 if site.ENABLE_USER_SITE else 1]:  # as site does (the server's: checked)
        if name not in sys.modules and importlib.machinery.PathFinder.find_spec(name, sys.path[1:]):
            importlib.import_module(name)


def _list_modules(listing: str) -> None:
    names = {name.partition(".")[0] for name in sys.modules} - {"__main__", "__mp_main__", __name__}
    maps = Path("/proc/self/maps")
    if maps.is_file():
        libraries = {os.path.basename(line.split()[-1]) for line in maps.read_text().splitlines() if ".so" in line}
    else:  # unknown: as if Intel's OpenMP runtime were loaded
        libraries = {"libiomp (unknown)"}
    Path(listing).write_text(json.dumps([sorted(names), sorted(libraries)]))


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
