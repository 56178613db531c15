"""The one exception type the converter raises for bad input.

Why a dedicated type: the CLI turns exactly these into a one-line message and exit code 2, while
anything else is a bug and keeps its traceback.
"""


class ConversionError(Exception):
    """Bad input or an impossible request (names the offending file, tensor, or option)."""


class HealError(ConversionError):
    """Bad input for care-heal (one line, exit code 2)."""
