"""SIGTERM and SIGHUP end a command-line tool the way Ctrl-C does: as an exception in the main thread, so that
the cleanup written for Ctrl-C runs for them too.

Why: Python's default for SIGTERM and SIGHUP is to die at once, without unwinding: no `finally`, no
`except BaseException`, no atexit. Yet they are how a run is stopped when nobody is at the keyboard: `timeout`,
a batch scheduler's time limit (Slurm), `docker stop`, systemd, a closed ssh session. Killed so, care-convert
left its hidden temporary folder (.OUT.tmp-*, holding the shards written so far) beside OUT, and care-bench
left the `vllm serve` it had started running (it runs in a session of its own, so that it can be stopped as a
process group), holding its port and the accelerator's memory.
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread. A KeyboardInterrupt, so that every `except
    KeyboardInterrupt` that cleans up after Ctrl-C cleans up after these as well."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(e: KeyboardInterrupt) -> int:
    """The shell's code for a process ended by that signal: 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


def describe(e: KeyboardInterrupt) -> str:
    """'interrupted' (Ctrl-C) or 'terminated (SIGTERM)': the start of the tool's last line."""
    return f"terminated ({signal.Signals(e.signum).name})" if isinstance(e, Terminated) else "interrupted"


def say(line: str) -> None:
    """One line to stderr while stopping; after SIGHUP the terminal may be gone, and that must not end the cleanup."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _raise_terminated(signum, frame):
    for s in SIGNALS:   # a repeat must not cut the cleanup short (`timeout -k` and systemd follow with SIGKILL)
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def stops_cleanly(prog: str):
    """Decorator for a tool's `main(argv) -> int`. While main runs, SIGTERM and SIGHUP raise Terminated (one that
    the caller ignores stays ignored: `nohup care-convert ...` outlives its terminal as before). An
    interruption that main does not answer itself ends the tool with one line ('care-bench: interrupted') and
    128 + the signal's number instead of a traceback. The previous handlers are restored when main returns (the
    tests call main in their own process)."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            previous = {}
            try:
                for s in SIGNALS:
                    if signal.getsignal(s) is not signal.SIG_IGN:   # (`nohup` ignores SIGHUP: it stays ignored)
                        previous[s] = signal.signal(s, _raise_terminated)
            except ValueError:   # not the main thread, where Python cannot handle signals: defaults stay
                pass
            try:
                return main(argv)
            except KeyboardInterrupt as e:
                say(f"{prog}: {describe(e)}")
                return exit_code(e)
            finally:
                for s, handler in previous.items():
                    if handler is not None:
                        signal.signal(s, handler)
        return run
    return wrap


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C, SIGTERM and SIGHUP while the block runs; the first one that came is delivered as the block
    ends, to whatever handled it before (so it raises there, or ends the process if nothing handled it).

    Why: care-heal's optimizer update, scheduler step and step count must change together. An interruption
    between them leaves weights of one step with the count of another, and the checkpoint care-heal saves when
    it is interrupted would then resume to other weights than the uninterrupted run's. The block is short (one
    AdamW update), so the stop is delayed by that much. Outside the main thread nothing is held."""
    held: list[int] = []

    def hold(signum, frame):
        held.append(signum)

    previous = {}
    try:
        for s in (signal.SIGINT, *SIGNALS):
            handler = signal.getsignal(s)
            if handler is not None and handler is not signal.SIG_IGN:   # (None: set outside Python, cannot restore)
                previous[s] = signal.signal(s, hold)
    except ValueError:   # not the main thread
        pass
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])
