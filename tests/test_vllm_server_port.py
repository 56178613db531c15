"""The port `vllm serve` listens on, as the launcher (care_vllm.loadtest.server.VllmServer) picks and re-picks it.

Why: the launcher draws a free port and vLLM binds it some seconds later, after its imports. In between, any process
may take it; CI saw one (a server beside another test's engine processes, which bind ports of their own) exit with
"[Errno 98] Address already in use". The launcher now draws below the kernel's ephemeral range, which other
processes' `bind(0)` never returns, and a server that still finds its port taken is restarted on a fresh one.

- `free_port()` returns a port that can be bound and lies outside /proc's ip_local_port_range.
- A real `vllm serve` started on a port another socket listens on: with no retries it fails, naming the cause;
  with the default retries it comes up on another port (port, base_url and the recorded command line say which,
  the log says why) and serves model_defs' greedy tokens.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from care_vllm.loadtest.server import free_port
from tests.served_reference import (greedy, mixed_rank_conversion, one_completion, random_prompts, reference_model,
                                    serve_args)
from tests.vllm_server import ServerError, VLLMServer

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


@pytest.mark.slow
def test_a_taken_port_is_replaced_and_the_server_serves_model_defs_tokens(tmp_path, calib_file):
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    _, out, cfg = mixed_rank_conversion(tmp_path / "conv", "llama", calib_file)
    model, _ = reference_model(out)
    ids = random_prompts(cfg["vocab_size"], n=1, seed=11)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        with pytest.raises(ServerError, match="Address already in use"):
            with VLLMServer(out, *serve_args(), port=taken, port_retries=0, log_path=tmp_path / "no_retry.log"):
                pass
        with VLLMServer(out, *serve_args(), port=taken, log_path=tmp_path / "retry.log") as server:
            assert server.port != taken
            assert server.base_url.endswith(f":{server.port}")
            assert f"--port {server.port}" in " ".join(server.args)
            assert f"port {taken} was taken" in server.log_text()
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
            got, logprob_error = one_completion(client, model, ids, 8, temperature=0)
    assert got == greedy(model, ids, 8)
    assert logprob_error < 1e-3, logprob_error
