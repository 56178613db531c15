"""The one exception type the converter raises for bad input.

Why a dedicated type: the CLI turns exactly these into a one-line message and exit code 2, while
anything else is a bug and keeps its traceback.
"""


class ConversionError(Exception):
    """Bad input or an impossible request (names the offending file, tensor, or option)."""


class HealError(ConversionError):
    """Bad input for care-heal (one line, exit code 2)."""


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name if there is none): what a tool's
    one-line error quotes of a library's multi-line one."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def run_tool(prog: str, action):
    """Run a command-line tool's work: (its result, 0); or (None, 2) after one line naming the problem of a
    ConversionError; or (None, 128 + the signal's number) after Ctrl-C, or after SIGTERM or SIGHUP under
    converter/interrupts.py's stops_cleanly. Only for tools that write their output atomically
    (converter/write.py atomic_dir), which is why an interrupted run can say that nothing was written, or, for a
    signal that came as OUT was swapped in (write.replace_dir), that OUT was."""
    import sys

    from .interrupts import describe, exit_code, say

    try:
        return action(), 0
    except ConversionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt as e:
        written = "OUT was written" if getattr(e, "swapped_in", None) else "nothing was written"   # (atomic_dir's)
        say(f"{prog}: {describe(e)}; {written}")   # (after SIGHUP the terminal may be gone)
        return None, exit_code(e)
