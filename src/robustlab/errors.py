"""Errors robustlab raises for a user's mistake.

Every error a user can cause derives from :class:`RobustlabError`, so the command line can print its message and
exit with a non-zero code instead of a traceback. The message names the mistake and, where possible, the fix.
"""

from __future__ import annotations


class RobustlabError(Exception):
    """Base class of every error caused by bad input, configuration or data."""


class InvalidInputError(RobustlabError, ValueError):
    """Inputs or labels do not fit the threat model or the model (NaN, out of bounds, wrong shape, ...)."""


class ConfigError(RobustlabError, ValueError):
    """An option, method, norm or eps that is not valid."""


class ModelError(RobustlabError):
    """A model that cannot be loaded or does not behave like a classifier."""


class DataNotFoundError(RobustlabError, FileNotFoundError):
    """A data set or file that is not where it was looked for."""


class QueryBudgetExceeded(RobustlabError):
    """A black-box oracle was asked for more queries than its budget allows for some example."""


class StateFileError(RobustlabError):
    """A saved state, checkpoint or result file that cannot be read safely: damaged, truncated, empty, written by
    another program, or holding pickled Python objects (which robustlab never loads, since that can run code)."""
