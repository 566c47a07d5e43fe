"""Every error that is the user's to fix, in one place at the bottom of the import order.

Each carries a one-line message; ``python -m dpl`` prints it as ``error: <message>`` and
exits with status 2 (:func:`user_errors`), 1 for a failed rank or a diverged run. They
live here, not in the modules that raise them, so that the entry point, the launcher and
the components can all name them without importing each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a dpl checkpoint; one-line message."""


class DatasetUnavailable(RuntimeError):
    """The dataset's files are missing or unreadable; the message (one line) says where to put them."""


class TrackingError(RuntimeError):
    """The tracking store cannot be opened or reached; the one-line message names it."""


class WriteError(RuntimeError):
    """A file the run writes could not be written (a full disk, a read-only mount); one line naming it."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class RankFailure(RuntimeError):
    """A rank died, hung or failed, and the job stopped; the one-line message names the rank."""


class OutOfRequeues(RuntimeError):
    """A scheduler's job reached its time limit more often than it may be requeued
    (``hydra.launcher.max_num_timeout``); the one-line message says how to go on."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: reported in one line, exit status 2."""
    return ConfigError, CheckpointError, DatasetUnavailable, TrackingError, WriteError, OutOfRequeues


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 500 characters): what a one-line error shows."""
    return (str(e).strip().splitlines() or [""])[0][:500]
