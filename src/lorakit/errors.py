"""The one exception type for user mistakes.

The CLI catches `LorakitError`, prints its message and exits non-zero, so a bad config, row,
target or file never ends in a bare traceback. Library code raises it (or a subclass) with a
message that names the row, field, module or file at fault.
"""


class LorakitError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class ConfigError(LorakitError, ValueError):
    """A bad config value or key."""


class DataError(LorakitError, ValueError):
    """A dataset row or file that does not fit the chosen format."""


class AdapterError(LorakitError, ValueError):
    """An adapter that does not fit the model, or a corrupt adapter file."""
