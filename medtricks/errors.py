"""The one base class of the errors medtricks raises for input a user can fix.

The CLI prints a :class:`MedtricksError` as one line (``medtricks run: error: ...``); anything else
is a bug and keeps its traceback. Subclasses also derive from the builtin that fits (``ValueError``,
``FileNotFoundError`` ...), so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations

__all__ = ["MedtricksError", "ConfigError", "MissingFileError", "UnknownKeyError", "ConfigTypeError", "ResourceError"]


class MedtricksError(Exception):
    """Bad input or environment (a file, key or value that is wrong), with a message that says what to fix."""


class ConfigError(MedtricksError, ValueError):
    """A bad argument or setting passed to a medtricks function (names the argument and the allowed values)."""


class MissingFileError(MedtricksError, FileNotFoundError):
    """A file or folder the user named (or a run needs) does not exist; the message says which and why."""


class UnknownKeyError(MedtricksError, KeyError):
    """A name that is not among the known ones (a metric, a registered block type); lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as a sentence
        return str(self.args[0]) if self.args else ""


class ConfigTypeError(MedtricksError, TypeError):
    """An argument of the wrong type (names the argument, the type expected and the type given)."""


class ResourceError(MedtricksError, RuntimeError):
    """A file or resource on this machine that exists but cannot be used (e.g. an unreadable checkpoint)."""
