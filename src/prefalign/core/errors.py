"""The errors a user can cause, each reported by the CLI as one `error:` line and exit code 2.

Everything else (a bug, an interrupted download, an out-of-memory) keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a config key, a data row, a model folder. `str(e)` is the whole message."""


class ConfigError(UserError):
    """A config problem, reported as one line naming the key."""


class DataError(UserError):
    """Bad preference data, as one line naming the source, row and field (also kept as attributes)."""

    def __init__(self, message: str, *, source=None, row=None, field=None, reason: str = "invalid"):
        super().__init__(message)
        self.source, self.row, self.field, self.reason = source, row, field, reason


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""
