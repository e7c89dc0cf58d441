"""Errors caused by the user's input (config, paths, run ids, options, data), as opposed to bugs.

The CLI prints a :class:`UserError` as one line with exit code 2; any other exception is a
programming error and keeps its traceback. The Key/Value variants keep ``except KeyError`` /
``except ValueError`` callers working.
"""

from __future__ import annotations


class UserError(Exception):
    """Caused by the user's input: printed as one line, exit code 2."""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else ""


class UserKeyError(UserError, KeyError):
    """A run, class, key or column the user named does not exist."""


class UserValueError(UserError, ValueError):
    """A value the user gave cannot be used."""
