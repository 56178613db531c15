"""End to end: `vllm serve OUT` (care_vllm plugin, CPU vLLM) on real conversions of tiny random
Llama-3 and Qwen3 originals whose layers get DIFFERENT latent ranks.

One care server per variant (module-scoped fixture), plus the GQA original served by stock vLLM
with the same KV-cache budget, started alongside and stopped once its KV cache is allocated.
Checked through the `openai` client: completions, chat (the checkpoint's chat template), streaming,
concurrent requests; greedy tokens identical to model_defs (transformers) for 32 tokens on 4
concurrent prompts; prompt logprobs within 1e-3 (fp32); the KV cache vLLM allocates per token
(from the engine's own per-layer lines and its capacity line) equals sum_l (r_K + r_V + d_r) * 4
bytes and is below the original's.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.tiny_models import make_tiny_original
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

KV_BYTES = 32 << 20          # --kv-cache-memory-bytes for both servers (same budget)
MAX_LEN = 512
FP32 = 4
PROMPTS = [
    "The latent cache of every layer",
    "Once upon a time, in a small village by the sea, there lived",
    "Attention is all you need, said the",
    "1, 2, 3, 4, 5,",
]


def _serve_args(extra=()):
    return ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
            "--max-num-seqs", "8", *extra]


def _varied_original(path: Path, arch: str) -> Path:
    """A tiny random original whose greedy continuations vary (a plain random model with tied
    embeddings mostly repeats its last token, which would make the greedy comparison weak): the
    attention and MLP outputs are scaled up so that the context, not the current token, decides."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_original(path, arch, num_layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=1)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(str(f))
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = tensors[name] * 4.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    return src


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request, tmp_path_factory, calib_file):
    """(arch, out_dir, report, care_server, original_kv_tokens)."""
    from converter.pipeline import convert

    arch = request.param
    root = tmp_path_factory.mktemp(f"serve_{arch}")
    src = _varied_original(root / "orig", arch)
    out = root / "mla"
    report = convert(src, out, calib_files=[calib_file], method="care", ranks="adjusted", kv_ratio=0.75,
                     rope_dim=8, calib_samples=16, calib_seqlen=64, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    widths = [k + v for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert len(set(widths)) > 1, f"the test needs layers of different ranks, got {widths}"

    # The llama server runs compiled (vLLM's default), the qwen3 one eager: both paths are covered.
    care = VLLMServer(out, *_serve_args([] if arch == "llama" else ["--enforce-eager"]),
                      log_path=root / "care.log")
    orig = VLLMServer(src, *_serve_args(["--enforce-eager"]), log_path=root / "orig.log")
    care.start()
    orig.start()
    try:
        orig.wait_ready()
        orig_tokens = orig.kv_cache_tokens()
        orig.stop()
        care.wait_ready()
        yield arch, out, report, care, orig_tokens
    finally:
        orig.stop()
        care.stop()


def _client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)


def _model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(served):
    """model_defs (transformers) on the same checkpoint, fp32."""
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, *_ = served
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    return model, tok


def _greedy(model, ids, n):
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.argmax()))
    return new


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
    server = served[3]
    model, tok = reference
    client = _client(server)
    name = _model_name(client)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    n_new = 32

    def ask(ids):
        return client.completions.create(model=name, prompt=ids, max_tokens=n_new, temperature=0,
                                         logprobs=0, extra_body={"ignore_eos": True, "prompt_logprobs": 0,
                                                                 "return_token_ids": True})

    with ThreadPoolExecutor(len(prompt_ids)) as ex:
        results = list(ex.map(ask, prompt_ids))

    worst = worst_decode = 0.0
    distinct = set()
    for ids, r in zip(prompt_ids, results):
        choice = r.choices[0]
        got = list(choice.token_ids)
        assert len(got) == n_new
        want = _greedy(model, ids, n_new)
        assert got == want, f"prompt {ids}: vLLM {got} != model_defs {want}"
        distinct.update(got)

        # every decode step's logprob (paged latent decode) against model_defs on the full sequence
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([ids + got])).logits[0].double(), -1)
        for j, lp in enumerate(choice.logprobs.token_logprobs):
            worst_decode = max(worst_decode, abs(lp - full[len(ids) - 1 + j, got[j]].item()))

        plp = getattr(choice, "prompt_logprobs", None) or (choice.model_extra or {}).get("prompt_logprobs")
        assert plp is not None and len(plp) == len(ids) and plp[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for i in range(1, len(ids)):
            entry = plp[i][str(ids[i])]
            lp = entry["logprob"] if isinstance(entry, dict) else entry.logprob
            worst = max(worst, abs(lp - ref[i - 1, ids[i]].item()))
    print(f"[{served[0]}] greedy tokens identical on {len(prompt_ids)} concurrent prompts x {n_new}; "
          f"{len(distinct)} distinct tokens; max |logprob diff| prompt {worst:.2e}, generated {worst_decode:.2e}")
    assert worst < 1e-3, f"max |prompt logprob diff| {worst}"
    assert worst_decode < 1e-3, f"max |generated-token logprob diff| {worst_decode}"
    assert len(distinct) >= 24, f"degenerate generations, the comparison would be weak: {distinct}"


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

    # 3) below the GQA original served by stock vLLM with the same budget
    orig_per_token = report["original_cache_values_per_token"] * FP32
    assert care_tokens > orig_tokens
    assert KV_BYTES / orig_tokens >= orig_per_token * 0.99   # the original really pays its full K+V
    assert per_token_bytes < orig_per_token
    print(f"[{served[0]}] layer widths {widths} (block {block_size}, {next(iter(num_blocks))} blocks): "
          f"{per_token_bytes} B/token, {care_tokens} tokens in {KV_BYTES} B; original (stock vLLM) "
          f"{orig_per_token} B/token, {orig_tokens} tokens")
