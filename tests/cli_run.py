"""Run a console script's `main(argv)` in the test process and check a refusal (exit 2, one line naming the
problem, no output folder and no temporary folder left beside it). In-process because a subprocess per
refusal pays ~8 s of importing torch and transformers; in a process of its own only where what the process
imported is what is tested (run_main_alone)."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main(main, prog: str, *args) -> subprocess.CompletedProcess:
    """`prog ARGS` through `main`: its exit code (argparse's SystemExit included) and what it printed. An
    exception that escapes main() fails the test, as a traceback would."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([prog, *argv], code, out.getvalue(), err.getvalue())


def run_main_alone(module: str, *args, env: dict | None = None) -> tuple[subprocess.CompletedProcess, bool]:
    """`module`.main(ARGS) in a fresh Python process (with environment `env`, default this one's): (the process,
    whether torch had been imported when main returned). A refusal that needs no model should come before that
    import (~5 s)."""
    code = (f"import sys; from {module} import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    imported = proc.stdout.strip()
    assert imported in ("True", "False"), proc.stdout
    return proc, imported == "True"


def assert_refused_by(prog: str, proc, out: Path, *needles: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error:"), proc.stderr[-2000:]
    for n in needles:
        assert n in last, last
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary folder left behind"


@contextlib.contextmanager
def frozen(proc: subprocess.Popen):
    """SIGSTOP `proc` for the block, SIGCONT after: a test that looks at where a tool is (a file it wrote, a line it
    printed) and then signals it, signals it where it looked. A 2-core machine running servers beside the test can
    stall the test for seconds, and a tool left running finished first (test_care_bench once got exit 0, not 143).
    A signal sent within the block is delivered as the tool resumes."""
    import signal

    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)
