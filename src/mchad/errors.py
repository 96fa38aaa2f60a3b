"""Errors a user can fix, and any exception in one line. ``run.py`` prints a user error as one
line and exits non-zero (:mod:`mchad.task`)."""


class UserError(Exception):
    """A cause the user can act on (bad input, missing data); shown without a traceback."""


class DataNotFoundError(UserError):
    """A dataset is neither on disk nor downloadable."""


class ConfigError(UserError):
    """The composed configuration is inconsistent."""


class DataError(UserError):
    """A dataset is there but cannot be read (e.g. a corrupt image file)."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the configured model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary unpickling (it could run code) and was not trusted."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """The first line of ``error``'s message (its class name if it has none), at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]


def one_line(error: BaseException | str) -> str:
    """``error``'s whole message in one line; a bug (not a :class:`UserError`) named by its class."""
    text = " ".join(str(error).split())
    if isinstance(error, BaseException):
        name = type(error).__name__
        if not isinstance(error, UserError):
            text = f"{name}: {text}" if text else name
    return text


class Preempted(BaseException):
    """The run was stopped by a preemption signal (SIGTERM, SIGUSR1); its argument names it.

    A BaseException like KeyboardInterrupt: no ``except Exception`` takes it for a failure."""

    @property
    def signal_name(self) -> str:
        return str(self.args[0]) if self.args else "SIGTERM"
