"""A full latent cache under load: `vllm serve` with room for fewer tokens than its running requests need, so
the scheduler preempts requests (frees their blocks) and later prefills them again, prompt and generated tokens
(in full in the runs here: their freed blocks had been reused, no prefix-cache hits). That is what a load test
drives a server into when it pushes concurrency past the cache; the converted model's per-layer widths must come
through it unchanged.

A Llama conversion with per-layer ranks and the o_proj refit (tests/served_reference.mixed_rank_conversion),
served with a 140,000-byte cache: 176 tokens at its 768 bytes per token, for 8 concurrent requests of 20-59 prompt
tokens and 64 generated ones (up to 123 tokens each; 9-11 preemptions per run). Checked: vLLM's /metrics counts
preemptions, the greedy tokens are model_defs' (fp32, full recomputation), generated-token logprobs are within
1e-3.
"""
from __future__ import annotations

import pytest

from care_vllm.loadtest.server import scrape_metrics
from tests.served_reference import compare_concurrent, mixed_rank_conversion, random_prompts, reference_model
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

FP32 = 4
KV_BYTES = 140_000
MAX_LEN = 128
N_NEW = 64


def test_preempted_requests_resume_with_model_defs_tokens(tmp_path, calib_file):
    _, out, cfg = mixed_rank_conversion(tmp_path, "llama", calib_file)
    per_token = sum(k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])) * FP32
    prompts = random_prompts(cfg["vocab_size"], n=8, seed=1, lengths=(20, 60))
    assert sum(len(p) + N_NEW for p in prompts) > 2 * KV_BYTES // per_token, "the cache must run out"
    model, _ = reference_model(out)
    # eager: preemption is the scheduler's, compiled or not (the Llama class compiles in tests/test_vllm_serve.py)
    args = ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
            "--max-num-seqs", "8", "--enforce-eager"]
    with VLLMServer(out, *args, log_path=tmp_path / "preempt.log") as server:
        capacity = server.kv_cache_tokens()
        assert MAX_LEN <= capacity <= KV_BYTES // per_token, capacity
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
        result = compare_concurrent(client, model, prompts, N_NEW, prompt_logprobs=False)
        preemptions = scrape_metrics(server.base_url)["vllm:num_preemptions_total"]
    assert preemptions > 0, "no request was preempted: the test needs a smaller cache"
    assert result["generated"] < 1e-3, result
