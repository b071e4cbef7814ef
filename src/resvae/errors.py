"""The errors resvae raises for what a user can fix: a bad flag, config value, file, data set or
run directory, and a full disk. Each message names the flag, key or file and what was expected.

`resvae`'s command line prints these as one line (exit 2; a full disk exits 74) and nothing
else: any other exception is a bug in resvae or below it, and keeps its traceback. Each class
also derives from the built-in error it refines, so `except ValueError` (or FileNotFoundError,
OSError) in a caller's code still catches it.
"""

from __future__ import annotations


class ResvaeError(Exception):
    """Bad input that the user can correct; the message says how."""


class ConfigError(ResvaeError, ValueError):
    """A bad config value, key or flag; the message names it, its source and what was expected."""


class DataError(ResvaeError, ValueError):
    """A data set that cannot be found, read or validated."""


class RunError(ResvaeError, ValueError):
    """A run directory, checkpoint, weights file or exported folder that is corrupt, foreign, or
    does not fit what was asked of it."""


class RunNotFound(RunError, FileNotFoundError):
    """A run directory, checkpoint or file that is not there."""


class RunLocked(ConfigError):
    """Another live process holds the run directory's lock."""


class MissingDependency(ResvaeError, ImportError):
    """An optional package or program a command needs is not installed; the message says how to
    install it."""


class DiskFullError(ResvaeError, OSError):
    """A write failed because its file system is full (ENOSPC) or the user's quota is spent
    (EDQUOT); the message names the file and what was kept."""


__all__ = ["ResvaeError", "ConfigError", "DataError", "RunError", "RunNotFound", "RunLocked",
           "MissingDependency", "DiskFullError"]
