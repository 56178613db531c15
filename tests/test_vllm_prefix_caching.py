"""End to end: a care_mla checkpoint served on CPU with prefix caching and chunked prefill, which
vLLM 0.32 switches off for MLA models on CPUs without AMX and the plugin keeps on
(care_vllm/cpu_scheduling.py).

Both exercise vLLM's MLA "prefill with context" path at our per-layer widths: the cached latent
rows are gathered from the paged cache, up-projected by each layer's kv_b_proj and attended, and
the result merged with the new tokens' attention. A tiny Llama-3 (compiled) and Qwen3 (eager)
conversion with different ranks per layer are served with `--max-num-batched-tokens 48`, so a
~200-token prompt is prefilled in chunks; prompts sharing a long prefix are sent after one that
fills the cache, so their prefill starts from cached blocks. Checked: vLLM's /metrics report
prefix-cache hits, and greedy tokens and generated-token logprobs (the first of which comes from
the chunked / cached prefill) equal model_defs recomputing the whole sequence.
"""
from __future__ import annotations

import json
import re

import pytest

from care_vllm.loadtest.server import prefix_cache_counters
from tests.served_reference import compare_concurrent, reference_model, serve_args, varied_original
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

CHUNK = 48  # --max-num-batched-tokens: prompts longer than this are prefilled in chunks


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request, tmp_path_factory, calib_file):
    from converter.pipeline import convert

    arch = request.param
    root = tmp_path_factory.mktemp(f"prefix_{arch}")
    src = varied_original(root / "orig", arch)
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], method="care", ranks="adjusted", kv_ratio=0.75,
            rope_dim=8, calib_samples=16, calib_seqlen=64, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    assert len({k + v for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])}) > 1, "needs per-layer ranks"
    extra = ["--max-num-batched-tokens", str(CHUNK)] + (["--enforce-eager"] if arch == "qwen3" else [])
    with VLLMServer(out, *serve_args(*extra), log_path=root / "care.log") as server:
        yield arch, out, server


def test_prefix_cache_hits_and_chunked_prefill_match_model_defs(served):
    arch, out, server = served
    model, tok = reference_model(out)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)

    prefix = tok(" ".join(f"Item {i} of the list is a word about caching latent rows." for i in range(16)))["input_ids"]
    assert len(prefix) > 3 * CHUNK, len(prefix)
    suffixes = [" The first", " Then the second one", " And finally", " Counting again: 1, 2,"]
    prompt_ids = [prefix + tok(s, add_special_tokens=False)["input_ids"] for s in suffixes]

    hits_before = prefix_cache_counters(server.base_url)["hits"]
    first = compare_concurrent(client, model, prompt_ids[:1], 8, prompt_logprobs=False)   # fills the cache
    rest = compare_concurrent(client, model, prompt_ids[1:], 24, prompt_logprobs=False)   # reads it
    hits = prefix_cache_counters(server.base_url)["hits"] - hits_before
    worst = max(first["generated"], rest["generated"])
    print(f"[{arch}] prompts of {[len(p) for p in prompt_ids]} tokens, prefill chunks of {CHUNK}: "
          f"{hits:.0f} prefix-cache hit tokens; greedy tokens identical to model_defs; "
          f"max |generated-token logprob diff| {worst:.2e}")
    settings = re.search(r"enable_prefix_caching=(\w+), enable_chunked_prefill=(\w+)", server.log_text())
    assert settings and settings.groups() == ("True", "True"), server.log_tail()
    assert hits >= 3 * (len(prefix) // 16) * 16 - 16, f"too few prefix-cache hits: {hits}"
    assert worst < 1e-3, f"max |generated-token logprob diff| {worst}"
    assert len(rest["distinct"]) >= 12, f"degenerate generations: {rest['distinct']}"
