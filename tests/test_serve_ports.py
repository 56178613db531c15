"""The ports the launcher (care_vllm.loadtest.server.free_port) gives `vllm serve`.

Why: the launcher draws a free port and vLLM binds it some seconds later, after its imports. A port from `bind(0)`
may meanwhile be handed to any other process's `bind(0)` (CI saw a server fail so, beside another test's engine
processes). Drawn below the kernel's ephemeral range, it never is. (A server that still finds its port taken is
restarted on a fresh one: tests/test_vllm_prompt_embeds_pooling.py starts its pooling server so.)
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from care_vllm.loadtest.server import free_port

EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_free_port_is_bindable_and_outside_the_kernels_ephemeral_range():
    if not EPHEMERAL.exists():
        pytest.skip(f"{EPHEMERAL} is missing: not Linux")
    lo, hi = (int(x) for x in EPHEMERAL.read_text().split())
    for _ in range(20):
        port = free_port()
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
