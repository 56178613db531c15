"""converter/interrupts.py: under `stops_cleanly`, SIGTERM and SIGHUP unwind a tool like Ctrl-C.

Real signals, sent to this process with os.kill while a decorated main runs: the exit code is the shell's
128 + the signal's number, the tool says so in one line, a repeat during the cleanup does not cut it short,
and the handlers the caller had are back afterwards. What the unwinding saves is tested where it happens:
care-convert's temporary folder (test_converter_errors), care-heal's checkpoint (test_heal) and care-bench's
servers (test_care_bench). `interrupts_held` delays them past a block that must not be cut in two (care-heal's
update: test_heal).
"""
from __future__ import annotations

import errno
import importlib
import io
import os
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from converter.errors import run_tool
from converter.interrupts import Terminated, interrupts_held, stops_cleanly
from tests.cli_run import ROOT


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_a_signal_ends_main_with_one_line_and_its_exit_code(sig, code, said, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    @stops_cleanly("care-test")
    def main(argv=None):
        os.kill(os.getpid(), sig)
        time.sleep(30)
        raise AssertionError("the signal did not interrupt main")

    t0 = time.monotonic()
    assert main([]) == code
    assert time.monotonic() - t0 < 10
    assert capsys.readouterr().err == f"care-test: {said}\n"
    assert {s: signal.getsignal(s) for s in before} == before


class _GoneTerminal(io.TextIOBase):
    """stderr after SIGHUP closed the terminal: every write fails with EIO."""

    def write(self, text):
        raise OSError(errno.EIO, "Input/output error")


def test_a_terminal_gone_after_sighup_leaves_the_exit_code(monkeypatch):
    """The tool's interruption line cannot be written (its terminal closed, which is what sent SIGHUP): the tool
    still ends with 129, not with the OSError's traceback and 1."""
    @stops_cleanly("care-test")
    def main(argv=None):
        _, code = run_tool("care-test", lambda: (os.kill(os.getpid(), signal.SIGHUP), time.sleep(30)))
        return code

    monkeypatch.setattr(sys, "stderr", _GoneTerminal())
    assert main([]) == 129


def test_a_repeated_signal_does_not_cut_the_cleanup_short(capsys):
    """`timeout -k`, systemd and `docker stop` may signal again; the cleanup (deleting a temporary folder,
    stopping servers) runs to its end, and only then does main end."""
    done = []

    @stops_cleanly("care-test")
    def main(argv=None):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except Terminated as e:
            assert e.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)   # (the handlers would run here)
            done.append(True)
            raise
        return 0

    assert main([]) == 143
    assert done == [True]
    assert capsys.readouterr().err == "care-test: terminated (SIGTERM)\n"


def test_a_signal_the_caller_ignores_stays_ignored():
    """`nohup care-convert ...` starts it with SIGHUP ignored, so that it outlives its terminal: it still does."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        @stops_cleanly("care-test")
        def main(argv=None):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            return 0

        assert main([]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_ctrl_c_is_answered_in_one_line_with_130(capsys):
    @stops_cleanly("care-test")
    def main(argv=None):
        raise KeyboardInterrupt

    assert main([]) == 130
    assert capsys.readouterr().err == "care-test: interrupted\n"


def test_outside_the_main_thread_the_default_handlers_stay():
    """Python handles signals only in the main thread: a main called from another one runs unchanged."""
    result = []

    @stops_cleanly("care-test")
    def main(argv=None):
        result.append(signal.getsignal(signal.SIGTERM))
        return 0

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=lambda: result.append(main([])))
    t.start()
    t.join()
    assert result == [before, 0]


def test_every_console_script_stops_cleanly():
    """Each `care-*` command pyproject.toml installs is a main under stops_cleanly."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 5
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        # (every function stops_cleanly returns shares the code of its inner `run`)
        assert main.__code__ is stops_cleanly("x")(lambda argv=None: 0).__code__, name


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler, as in a terminal: pytest-xdist's workers ignore SIGINT, and an ignored signal
    stays ignored (by interrupts_held too)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated),
                                         (signal.SIGHUP, Terminated)])
def test_interrupts_held_delivers_the_first_signal_when_the_block_ends(sig, raised, ctrl_c, capsys):
    """Within the block a signal does nothing; when it ends, the first one is raised where the block was, by the
    handler that was there before (stops_cleanly's for SIGTERM/SIGHUP, Python's for Ctrl-C)."""
    steps = []

    @stops_cleanly("care-test")
    def main(argv=None):
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            with interrupts_held():
                os.kill(os.getpid(), sig)
                time.sleep(0.2)   # (an unheld handler would have raised here)
                steps.append("block ran to its end")
                os.kill(os.getpid(), signal.SIGTERM if sig != signal.SIGTERM else signal.SIGHUP)
            steps.append("not reached")
        except KeyboardInterrupt as e:
            assert type(e) is raised and getattr(e, "signum", signal.SIGINT) == sig
            steps.append("raised after the block")
            raise
        finally:
            if sig == signal.SIGINT:   # (stops_cleanly's own handlers are back; the second signal was dropped)
                assert {s: signal.getsignal(s) for s in before} == before
        return 0

    assert main([]) == 128 + sig
    assert steps == ["block ran to its end", "raised after the block"]


def test_interrupts_held_without_a_signal_changes_nothing(ctrl_c):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with interrupts_held():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in before} == before


def test_interrupts_held_outside_the_main_thread_holds_nothing():
    result = []

    def block():
        with interrupts_held():
            result.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=block)
    t.start()
    t.join()
    assert result == [before]


@pytest.mark.parametrize("second_rename", ["works", "fails", "no_old_out"])
def test_a_replaced_folder_is_never_lost_between_the_two_renames(tmp_path, monkeypatch, capsys, second_rename):
    """converter/write.replace_dir (care-convert --overwrite, care-heal's output and every checkpoint it saves)
    moves OUT aside, then the new folder in. SIGTERM right after the first rename is held until the second is
    done, so OUT holds the new folder and nothing is left hidden, and the tool's line says OUT was written; a
    second rename that fails puts the old OUT back. Raised between them, the signal left OUT missing, the old
    folder at .OUT.old-PID and the new one where the callers delete it. With no OUT before ("no_old_out"), a
    signal as the one rename happens also says OUT was written (it said nothing was)."""
    from converter import write

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for folder, text in ((out, "old"), (new, "new")):
        if folder == out and second_rename == "no_old_out":
            continue
        folder.mkdir()
        (folder / "weights").write_text(text)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == new and second_rename == "fails":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(src, dst)
        if Path(src) == (new if second_rename == "no_old_out" else out):   # OUT is aside now (or in place)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "rename", rename)

    @stops_cleanly("care-test")
    def main(argv=None):
        return run_tool("care-test", lambda: write.replace_dir(new, out))[1]

    assert main([]) == 143
    written = "nothing was written" if second_rename == "fails" else "OUT was written"
    assert capsys.readouterr().err == f"care-test: terminated (SIGTERM); {written}\n"
    kept = {"works": ("new", ["out"]), "fails": ("old", [".out.tmp-1", "out"]), "no_old_out": ("new", ["out"])}[
        second_rename]
    assert ((out / "weights").read_text(), sorted(p.name for p in tmp_path.iterdir())) == kept
