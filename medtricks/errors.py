"""The one base class of the errors medtricks raises for input a user can fix.

The CLI prints a :class:`MedtricksError` as one line (``medtricks run: error: ...``); anything else
is a bug and keeps its traceback. Subclasses also derive from the builtin that fits (``ValueError``,
``FileNotFoundError`` ...), so ``except ValueError`` in user code keeps working.
"""
from __future__ import annotations

__all__ = ["MedtricksError", "ConfigError"]


class MedtricksError(Exception):
    """Bad input or environment (a file, key or value that is wrong), with a message that says what to fix."""


class ConfigError(MedtricksError, ValueError):
    """A bad argument or setting passed to a medtricks function (names the argument and the allowed values)."""
