"""Errors a user can fix. ``run.py`` prints them as one line and exits non-zero."""


class UserError(Exception):
    """A cause the user can act on (bad input, missing data); shown without a traceback."""


class DataNotFoundError(UserError):
    """A dataset is neither on disk nor downloadable."""


class ConfigError(UserError):
    """The composed configuration is inconsistent."""
