"""The project's own errors: expected failures whose message is meant for the user.

Each names the thing that is wrong and what was expected. They also derive from the matching built-in
(ValueError for bad input, RuntimeError for bad data, ...) so callers can catch them either way. The command
lines turn any `DitJaxError` (and OSError: a missing or unwritable file) into one line on stderr and exit 1;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class DitJaxError(Exception):
    """Base class of the expected failures."""


class ConfigError(DitJaxError, ValueError):
    """A config field or flag with a value outside its range, or fields that do not fit together."""


class DataError(DitJaxError, RuntimeError):
    """Bad input data (missing/empty directory, unprepared data set, nothing readable)."""


class CheckpointError(DitJaxError, RuntimeError):
    """A training checkpoint that cannot be restored, or that does not match the config."""


class NonFiniteLossError(DitJaxError, FloatingPointError):
    """The training loss became NaN or infinite."""
