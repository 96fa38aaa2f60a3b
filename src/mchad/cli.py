"""What ``python run.py`` shows on the console: one line per input mistake, no library noise.

* :func:`guard` runs Hydra's ``main``. A mistake Hydra finds while composing the config
  (unknown key or option, unparsable override) or a run folder it cannot create becomes one
  line ``error: <cause>`` on stderr and exit status 1. Any other exception is a bug: its
  full traceback is printed, then one ``error:`` line. ``MCHAD_TRACEBACK=1`` also prints the
  traceback of input mistakes (mchad.runs.train's user errors included).
* :func:`trial_console`: a sweep trial's records go to its run.log only.
* :func:`quiet_console` (called once logging is configured): the console shows this
  package's and Hydra's messages and every warning except deprecation notices; other
  libraries' info messages (Lightning's tips, ``limit_*`` notices, accelerator summary) and
  deprecation warnings go to ``<run folder>/run.log`` only, which keeps everything.

Imported before torch: no heavy imports at module level.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from mchad.errors import UserError, first_line

#: ``log.error(..., extra=FILE_ONLY)``: into run.log, not onto the console
FILE_ONLY = {"file_only": True}
CONSOLE_PACKAGES = ("mchad", "hydra", "__main__")
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def show_tracebacks() -> bool:
    return os.environ.get("MCHAD_TRACEBACK", "") not in ("", "0")


def guard(main: Callable[[], None], config_dir: str | Path) -> None:
    """Run ``main`` (a ``@hydra.main`` function) with input mistakes reported in one line."""
    # Hydra then raises composition errors instead of printing them over several lines
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except Exception as error:  # noqa: BLE001 - every exception ends in one error line
        message = explain(error, config_dir, [a for a in sys.argv[1:] if not a.startswith("-")])
        if message is None or show_tracebacks():
            traceback.print_exc()
        if message is None:
            cause = f"{type(error).__name__}: {first_line(error, limit=None)}"
            message = f"internal error, a bug ({cause}); the traceback is above"
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def explain(error: BaseException, config_dir: str | Path, overrides: list[str]) -> str | None:
    """One line for an input mistake that reaches the entry point, None for a bug."""
    from mchad.runs.validate import explain_config_error

    if isinstance(error, UserError):
        return first_line(error, limit=None)
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS and error.filename:
        return f"cannot write {error.filename}: {error.strerror}; set paths.log_dir=<a writable folder>"
    return explain_config_error(error, config_dir, overrides)


# ---------------------------------------------------------------------------- the console


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in CONSOLE_PACKAGES


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    deprecation = issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
    # Lightning's SLURM detection warns on every run of a host that has `srun` (twice a run)
    file_only = deprecation or str(message).startswith("The `srun` command is available on your system")
    logging.getLogger("py.warnings").warning(
        "%s (%s:%s: %s)", message, filename, lineno, category.__name__, extra={"file_only": file_only}
    )


def quiet_console() -> None:
    """Filter the root logger's console handlers (run.log keeps every record) and route
    Python warnings through logging."""
    for handler in logging.getLogger().handlers:
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if is_console and not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
            handler.addFilter(_ConsoleFilter())
    warnings.showwarning = _show_warning


class _NothingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def trial_console() -> None:
    """In a sweep's trial: nothing of the trial on the console (its run.log keeps every record);
    the sweep prints one line per finished trial and the report (mchad.sweeps.sweep)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NothingFilter())
