"""End to end: `vllm serve OUT` (care_vllm plugin, CPU vLLM) on real conversions of tiny random
Llama-3 (llama3 rope scaling), Qwen3 (yarn), Qwen3-MoE (plain rope) and Qwen2 (q/k/v biases: the converted
q_proj, kv_a_proj_with_mqa and o_proj have biases) originals whose layers get DIFFERENT latent ranks. The Qwen2 and
Qwen3-MoE ones are converted with `--latent joint`, one latent that keys and values both read (for Qwen3 the sum of
k_latent_proj's latent rows on the post-norm keys and v_latent_proj's on the input), so their layers decode in
the joint form where the others split key and value.

One care server per variant (module-scoped fixture), plus, for the Llama one, the GQA original served by stock
vLLM with the same KV-cache budget, started alongside and stopped once its KV cache is allocated (the others compare
with the original's K+V per token from its config.json: stock vLLM's allocation for a GQA model is measured once, not
four times at ~25 s each).
Checked through the `openai` client: completions, chat (the checkpoint's chat template), streaming,
concurrent requests; greedy tokens identical to model_defs (transformers) for 32 tokens on 4
concurrent prompts; prompt logprobs within 1e-3 (fp32); the KV cache vLLM allocates per token
(from the engine's own per-layer lines and its capacity line) equals sum_l (r_K + r_V + d_r) * 4
bytes and is below the original's.

The care servers run with `--max-num-batched-tokens 48` and vLLM's defaults otherwise, i.e. prefix
caching and chunked prefill on (which vLLM 0.32 turns off for MLA models on CPUs without AMX and the
plugin keeps on for care_mla, care_vllm/cpu_scheduling.py): ~250-token prompts sharing a prefix are
prefilled in chunks and read the prefix from the cache. On the Qwen3-MoE server
(CARE_VLLM_CPU_LATENT_PREFILL_TOKENS=1) both go through vLLM's MLA "prefill with context" path at our
per-layer widths (cached latent rows gathered, up-projected by each layer's kv_b_proj, attended, merged
with the new tokens' attention); on the Llama and Qwen3 servers (the default, 128) every chunk of <= 48
new tokens attends in the latent form straight over the cached rows, as a decode does. Checked: /metrics
count the cache hits, greedy tokens and generated-token logprobs (the first comes from that prefill)
equal model_defs.
"""
from __future__ import annotations

import json
import re

import pytest

from care_vllm.loadtest.server import prefix_cache_counters
from tests.served_reference import (KV_BYTES, MAX_LEN, PROMPTS, compare_concurrent, generated_logprob_error, log_probs,
                                     one_completion, random_prompts, reference_model, serve_args, varied_original)
from tests.tiny_models import QWEN3_YARN
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

FP32 = 4
CHUNK = 48  # --max-num-batched-tokens of the care servers: longer prompts are prefilled in chunks
JOINT = ("qwen2", "qwen3_moe")   # the variants converted with --latent joint (one Llama-path, one Qwen3)
MHA_PREFILL_ENV = {"CARE_VLLM_CPU_LATENT_PREFILL_TOKENS": "1"}   # every prefill through vLLM's MLA prefill flow


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen3_moe", "qwen2"])
def served(request, tmp_path_factory, calib_file):
    """(arch, out_dir, report, care_server, original_kv_tokens)."""
    from converter.pipeline import convert

    arch = request.param
    root = tmp_path_factory.mktemp(f"serve_{arch}")
    # the Qwen3 original with yarn (Qwen3's long-context setting: its attention factor is in the converted
    # softmax scale), the Llama one with llama3 scaling, the Qwen3-MoE one with plain rope
    src = varied_original(root / "orig", arch, rope=QWEN3_YARN if arch == "qwen3" else None)
    out = root / "mla"
    # qwen3_moe without the o_proj refit: refitted on the synthetic 40-word calibration text, this random
    # model's greedy continuation of the English prompts below collapses to one repeated token (the
    # original's has 2 distinct, the unrefitted conversion's 7), too weak a comparison. The refit only
    # changes o_proj's values, which the llama and qwen3 servers cover.
    report = convert(src, out, calib_files=[calib_file], method="care", ranks="adjusted", kv_ratio=0.75,
                     rope_dim=8, calib_samples=16, calib_seqlen=64, seed=0, o_proj_refit=arch != "qwen3_moe",
                     latent="joint" if arch in JOINT else "separate")
    cfg = json.loads((out / "config.json").read_text())
    widths = [k + v for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert len(set(widths)) > 1, f"the test needs layers of different ranks, got {widths}"

    # The llama and qwen3_moe servers run compiled (vLLM's default; one per plugin model class), the
    # qwen3 and qwen2 ones eager (qwen2 is served by the Llama class: its compile, ~40 s on two cores,
    # would add nothing but its q/k/v biases): both paths are covered. The qwen3_moe one prefills through
    # vLLM's MLA prefill flow (new tokens up-projected, cached context gathered, up-projected and merged),
    # the others' prompt chunks (<= CHUNK tokens) attend in the latent form over the cache (the plugin's
    # default for short prefills on CPU).
    care = VLLMServer(out, *serve_args("--max-num-batched-tokens", str(CHUNK),
                                       *(["--enforce-eager"] if arch in ("qwen3", "qwen2") else [])),
                      log_path=root / "care.log", env=MHA_PREFILL_ENV if arch == "qwen3_moe" else None)
    orig = VLLMServer(src, *serve_args("--enforce-eager"), log_path=root / "orig.log") if arch == "llama" else None
    care.start()
    try:
        orig_tokens = None
        if orig is not None:
            orig.start().wait_ready()
            orig_tokens = orig.kv_cache_tokens()
            orig.stop()
        care.wait_ready()
        yield arch, out, report, care, orig_tokens
    finally:
        if orig is not None:
            orig.stop()
        care.stop()


def _client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)


def _model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(served):
    """model_defs (transformers) on the same checkpoint, fp32."""
    return reference_model(served[1])


def test_completions_text(served):
    server = served[3]
    client = _client(server)
    r = client.completions.create(model=_model_name(client), prompt="Hello, my name is", max_tokens=8,
                                  temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8


def test_chat_completions_uses_chat_template(served):
    _, out, _, server, _ = served
    from transformers import AutoTokenizer

    client = _client(server)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=_model_name(client), messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"
    tok = AutoTokenizer.from_pretrained(out)
    templated = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(templated, dict) or hasattr(templated, "keys"):
        templated = templated["input_ids"]
    assert r.usage.prompt_tokens == len(templated)


def test_streaming_matches_non_streaming(served):
    server = served[3]
    client = _client(server)
    name = _model_name(client)
    kw = dict(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == full


def test_concurrent_greedy_and_prompt_logprobs_match_model_defs(served, reference):
    """As converted with separate latents, kv_b_proj is block-diagonal, so every layer decodes with the key/value
    split (scores over [c_K | k_pe], values over c_V); the joint latent (qwen2, qwen3_moe: --latent joint) and a healed
    checkpoint (test_heal.py) decode in the joint form, every latent column read by keys and values."""
    model, tok = reference
    cfg = json.loads((served[1] / "config.json").read_text())
    joint = cfg["care"].get("latent") == "joint"
    assert served[3].kv_layer_decode_forms() == {
        l: "joint latent" if joint else f"key/value split {k}+{v}"
        for l, (k, v) in enumerate(zip(cfg["k_ranks"], cfg["v_ranks"]))}
    assert joint == (served[0] in JOINT) == cfg.get("joint_latent", False)
    # prefill through the plugin's tiled CPU kernels, not vLLM's dense CPU_SDPA_MLA they replace
    assert served[3].kv_layer_prefill_backends() == {l: "CARE_CPU_MLA_PREFILL" for l in range(len(cfg["k_ranks"]))}
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    n_new = 32
    diff = compare_concurrent(_client(served[3]), model, prompt_ids, n_new)
    print(f"[{served[0]}] greedy tokens identical on {len(prompt_ids)} concurrent prompts x {n_new}; "
          f"{len(diff['distinct'])} distinct tokens; max |logprob diff| prompt {diff['prompt']:.2e}, "
          f"generated {diff['generated']:.2e}")
    assert diff["prompt"] < 1e-3, f"max |prompt logprob diff| {diff['prompt']}"
    assert diff["generated"] < 1e-3, f"max |generated-token logprob diff| {diff['generated']}"
    assert len(diff["distinct"]) >= 24, f"degenerate generations, the comparison would be weak: {diff['distinct']}"


def test_decodes_over_very_different_context_lengths_match_model_defs(served, reference):
    """A request over ~400 cached tokens decoding beside ones over ~10: the CPU decode plan groups
    requests by context length (care_vllm.backends.cpu.plan_latent_decode), so the short ones are not
    padded to the long one's rows; greedy tokens and logprobs as model_defs computes them."""
    from care_vllm.backends.cpu import GROUP_COST_ROWS

    model, tok = reference
    long_prompt = tok(" ".join(f"Line {i}: the cache keeps one latent row per token." for i in range(36)))["input_ids"]
    prompt_ids = [long_prompt, *(tok(p)["input_ids"] for p in PROMPTS[:3])]
    assert len(long_prompt) - max(len(p) for p in prompt_ids[1:]) > GROUP_COST_ROWS, len(long_prompt)
    assert len(long_prompt) + 16 <= MAX_LEN
    diff = compare_concurrent(_client(served[3]), model, prompt_ids, 16)
    print(f"[{served[0]}] prompts of {[len(p) for p in prompt_ids]} tokens decoded together: greedy tokens "
          f"identical; max |logprob diff| prompt {diff['prompt']:.2e}, generated {diff['generated']:.2e}")
    assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
    assert len(diff["distinct"]) >= 12, f"degenerate generations, the comparison would be weak: {diff['distinct']}"


def test_parallel_sampling_logprobs_match_model_defs(served, reference):
    """`n` samples of one prompt at temperature 1 (best-of-n, RL rollouts): vLLM runs them as sibling requests
    over the same prompt, the later ones reading its blocks from the prefix cache. Each sampled token's logprob
    (vLLM's raw logprobs; at temperature 1 with no top-k/p the sampling distribution) must be model_defs' on that
    sample's own tokens, and the samples must differ (else one cache row mix-up could pass unseen)."""
    model, tok = reference
    ids = tok(PROMPTS[1])["input_ids"]
    client = _client(served[3])
    r = client.completions.create(model=_model_name(client), prompt=ids, max_tokens=16, n=4, temperature=1.0,
                                  logprobs=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    samples = [list(c.token_ids) for c in r.choices]
    assert len(samples) == 4 and len({tuple(s) for s in samples}) == 4, samples
    worst = max(generated_logprob_error(log_probs(model, ids + got), len(ids), got, c.logprobs.token_logprobs)
                for c, got in zip(r.choices, samples))
    print(f"[{served[0]}] 4 samples of 16 tokens: max |logprob diff| {worst:.2e}")
    assert worst < 1e-3, worst


def test_seeded_sampling_over_a_chunked_prefill(served, reference):
    """A request with a `seed` whose prompt (96 tokens) is prefilled in chunks of 48: vLLM samples and discards a
    token after the first chunk and rewinds the request's generator, which vllm-cpu 0.32 cannot do ("CPU Generator
    does not use offset": the engine stops, stock Llama too; care_vllm/cpu_seeded_sampling.py). The same request
    again finds its prompt in the prefix cache and is prefilled at once: with the seeded stream left as if nothing
    had been discarded (vLLM's semantics on CUDA), both give the same tokens, and another seed other tokens. Each
    sampled token's logprob is model_defs'."""
    model, _ = reference
    ids = random_prompts(model.config.vocab_size, n=1, seed=11, lengths=(96, 97))[0]
    assert len(ids) > CHUNK
    client = _client(served[3])

    def sample(seed):
        return one_completion(client, model, ids, 16, temperature=1.0, seed=seed)

    before = prefix_cache_counters(served[3].base_url)
    (chunked, err1), (cached, err2), (other, err3) = sample(7), sample(7), sample(8)
    hits = prefix_cache_counters(served[3].base_url)["hits"] - before["hits"]
    # each repeat read its prompt from the cache, bar fewer than CHUNK tokens: prefilled in one step
    assert hits >= 2 * (len(ids) - CHUNK + 1), f"{hits} prefix-cache hits"
    assert chunked == cached, (chunked, cached)
    assert other != chunked
    assert max(err1, err2, err3) < 1e-3, (err1, err2, err3)


def test_kv_cache_per_token_is_the_sum_of_layer_widths(served):
    _, out, report, server, orig_tokens = served
    cfg = json.loads((out / "config.json").read_text())
    d_r = cfg["qk_rope_head_dim"]
    widths = [k + v + d_r for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert sum(widths) == report["cache_values_per_token"]

    # 1) what the engine bound to each layer (care_vllm logs every KV tensor it is given)
    shapes = server.kv_layer_shapes()
    assert sorted(shapes) == list(range(cfg["num_hidden_layers"])), server.log_tail()
    assert [shapes[l][-1] for l in range(len(widths))] == widths
    block_size = shapes[0][1]
    num_blocks = {s[0] for s in shapes.values()}
    assert len(num_blocks) == 1, "all layers share one block table"

    # 2) the engine's capacity: num_blocks = budget // sum of per-layer pages
    page_bytes = [block_size * w * FP32 for w in widths]
    care_tokens = server.kv_cache_tokens()
    assert care_tokens == (KV_BYTES // sum(page_bytes)) * block_size == next(iter(num_blocks)) * block_size
    per_token_bytes = sum(page_bytes) // block_size
    assert per_token_bytes == sum(widths) * FP32

    # 3) below the GQA original's K+V (for Llama: served by stock vLLM with the same budget)
    orig_per_token = report["original_cache_values_per_token"] * FP32
    orig_cfg = json.loads((out.parent / "orig" / "config.json").read_text())   # the original's own config
    assert orig_per_token == \
        2 * orig_cfg["num_key_value_heads"] * orig_cfg["head_dim"] * orig_cfg["num_hidden_layers"] * FP32
    assert per_token_bytes < orig_per_token
    if orig_tokens is not None:
        assert care_tokens > orig_tokens
        assert KV_BYTES / orig_tokens >= orig_per_token * 0.99   # the original really pays its full K+V
    print(f"[{served[0]}] layer widths {widths} (block {block_size}, {next(iter(num_blocks))} blocks): "
          f"{per_token_bytes} B/token, {care_tokens} tokens in {KV_BYTES} B; original {orig_per_token} B/token"
          + (f", {orig_tokens} tokens (stock vLLM)" if orig_tokens is not None else ""))


def test_prefix_cache_hits_and_chunked_prefill_match_model_defs(served, reference):
    arch, _, _, server, _ = served
    model, tok = reference
    client = _client(server)
    settings = re.search(r"enable_prefix_caching=(\w+), enable_chunked_prefill=(\w+)", server.log_text())
    assert settings and settings.groups() == ("True", "True"), server.log_tail()
    # vLLM logs that it turns both off for MLA on CPU: the plugin's line after it says they stay on (it was logged
    # under a logger of its own, which has no handler: nothing said so)
    assert "care_vllm: care_mla's CPU latent backend prefills over cached context: chunked prefill on, prefix " \
           "caching on" in server.log_text(), server.log_tail()
    from care_vllm.backends.cpu import DEFAULT_LATENT_PREFILL_TOKENS

    latent = f"requests with up to {DEFAULT_LATENT_PREFILL_TOKENS} new tokens attend in the latent" in server.log_text()
    assert latent == (arch != "qwen3_moe"), "the short-prefill path is not the one this server was started for"

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
    block = server.kv_layer_shapes()[0][1]   # the KV cache's block size (16: vLLM's CPU setting for MLA)
    assert hits >= 3 * (len(prefix) // block - 1) * block, f"too few prefix-cache hits: {hits}"
    assert worst < 1e-3, f"max |generated-token logprob diff| {worst}"
    assert len(rest["distinct"]) >= 6, f"degenerate generations (the comparison would be weak): {rest['distinct']}"
