"""The project's error for bad input, as opposed to a bug.

Every value, file, setting or request that the project refuses raises `UsageError` (or a subclass) with a
message naming what was wrong and where. The commands print it and exit 2; any other exception is a bug
and shows its traceback. `UsageError` is a `ValueError`, and `UsageTypeError` (a value of the wrong type)
also a `TypeError`, so callers that catch the built-in types still catch them.
"""


class UsageError(ValueError):
    """Bad input: the message names the value, file, line or field."""


class UsageTypeError(UsageError, TypeError):
    """Bad input of the wrong type (an unexpected keyword, a config that is not a config)."""


# What the commands report in one line and exit 2 on: the project's refusals, and the system's about files,
# permissions and missing optional packages. Anything else is a bug and shows its traceback.
COMMAND_ERRORS = (UsageError, OSError, ImportError)
