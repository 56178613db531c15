"""Tensor parallelism: `vllm serve OUT --tensor-parallel-size 2` (two CPU workers, gloo) on a converted tiny
Mixtral with per-layer ranks: Llama's latent attention (CareMixtralForCausalLM) with its MoE experts sharded by vLLM's
FusedMoE, as for a stock Qwen3-MoE (the same block a Qwen3-MoE conversion's sparse layers use): the suite's serving
test of that class.

Under TP the query heads, kv_b_proj (the absorbed up-projections) and o_proj are split by heads and
the latent projections are replicated (MLA keeps one latent per token, not per head), so every rank
caches the full `r_K + r_V + d_r` per layer. Checked: greedy tokens on 4 concurrent prompts identical
to model_defs (fp32, one process), prompt and generated-token logprobs within 1e-3, and both
workers bind KV tensors of exactly the per-layer widths of the checkpoint. And the stopped server leaves nothing
behind: the IPC sockets' folder, the torch.distributed file store and the two ranks' shared-memory segments that
vLLM's log names exist while it serves and are gone after (care_vllm/loadtest/leftovers.py), and so are its
processes, workers included, once the server's context has exited.

The other classes are served under TP elsewhere, with the same checks: the Llama class (dense MLP) in
tests/test_vllm_quantized.py (W8A8, every linear but kv_b_proj int8), the Qwen3 class (q/k norms, q_rope_proj split by
heads) in tests/test_vllm_lora.py, whose base-model requests are compared with model_defs alone. A TP server costs
~60 s on 2 cores, so each class is served under TP once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from care_vllm.loadtest.leftovers import file_stores

from tests.served_reference import PROMPTS, compare_concurrent, reference_model, serve_args, varied_original
from tests.vllm_server import VLLMServer, assert_tp_ranks_cache_full_widths, one_core_per_rank, running_in_group

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


# (the Qwen3-MoE class itself is served in tests/test_vllm_serve.py, and under PP in
# tests/test_vllm_pipeline_parallel.py)
@pytest.mark.parametrize("arch", ["mixtral"])
def test_tp2_serves_the_same_tokens_as_model_defs(arch, tmp_path, calib_file):
    from converter.pipeline import convert

    src = varied_original(tmp_path / "orig", arch)
    out = tmp_path / "mla"
    convert(src, out, calib_files=[calib_file], method="care", ranks="adjusted", kv_ratio=0.75, rope_dim=8,
            calib_samples=16, calib_seqlen=64, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert len(set(widths)) > 1 and cfg["num_attention_heads"] % 2 == 0

    model, tok = reference_model(out)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    with VLLMServer(out, *serve_args("--enforce-eager", "--tensor-parallel-size", "2"),
                    log_path=tmp_path / "tp2.log", env=one_core_per_rank()) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        diff = compare_concurrent(client, model, prompt_ids, 24)
        log = server.log_text()
        ipc, stores = server.ipc, file_stores(log)
        segments = [seg for name in stores.values() for seg in Path("/dev/shm").glob(f"{name}-*")]
        assert any(ipc.iterdir()), f"vLLM put no IPC socket in {ipc}"
        assert len(stores) == 1 and all(p.exists() for p in stores), f"the workers' file store: {stores}"
        assert len(segments) == 2, f"one shared-memory segment per TP rank, got {segments}"
        group = server.proc.pid   # (the server runs in a process group of its own, which its pid names)

    left = [p for p in [ipc, *stores, *segments] if p.exists()]
    assert not left, f"the stopped server left {left}"
    assert not running_in_group(group), f"the stopped server's processes still run: {running_in_group(group)}"
    assert_tp_ranks_cache_full_widths(log, cfg)
    print(f"[{arch}] TP=2: greedy identical on {len(prompt_ids)} concurrent prompts; max |logprob diff| "
          f"prompt {diff['prompt']:.2e}, generated {diff['generated']:.2e}; per-rank widths {widths}")
    assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
    assert len(diff["distinct"]) >= 16, f"degenerate generations: {diff['distinct']}"
