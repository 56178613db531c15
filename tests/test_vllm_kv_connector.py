"""KV transfer out of and into a served converted model through vLLM's KV-connector API, the interface that
disaggregated prefill (NIXL, Mooncake, P2P), LMCache and KV offloading build on. Each of those moves a layer's
paged cache as vLLM laid it out; for a care_mla checkpoint that is, per token and layer, `[c_K | c_V | rope(k_pe)]`
at that layer's own width.

vLLM's ExampleConnector (its reference connector) writes, per prompt and layer, the cache rows of the prompt's full
blocks to a safetensors file, and on a later request for the same prompt loads them back into the paged cache,
so that the engine prefills only the rest. A Llama conversion with per-layer ranks is served with it
(`kv_role` kv_both, prefix caching off so that a repeated prompt is served from the connector's store). Checked
against model_defs (fp32): the stored rows of every layer are the latent cache model_defs builds for the prompt
(its DynamicCache: the latent c and rope(k_pe)), at that layer's width; the first requests (stored) and the
repeated ones (loaded: vLLM logs the injection) give model_defs' greedy tokens with logprobs within 1e-3; and a
repeated request whose stored rows were zeroed gives other logprobs, so the loaded rows are what the engine used.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.served_reference import (compare_concurrent, mixed_rank_conversion, one_completion, random_prompts,
                                     reference_model, serve_args)
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

BLOCK = 16
N_NEW = 16


def stored_rows(ids: list[int]) -> int:
    """How many of a prompt's tokens ExampleConnector stores: the full blocks of all but its last token (vLLM's
    example_connector.align_to_block_size)."""
    return (len(ids) - 1) // BLOCK * BLOCK


def stored_folder(store: Path, ids: list[int]) -> Path:
    """Where ExampleConnector keeps a prompt's rows: a hash of the token ids it stores
    (example_connector._generate_foldername_debug)."""
    from vllm.utils.hashing import safe_hash

    digest = safe_hash(torch.tensor(ids[:stored_rows(ids)]).numpy().tobytes(), usedforsecurity=False)
    return store / digest.hexdigest()


def model_defs_latents(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the rows model_defs caches for the prompt: [T, r_K + r_V + d_r] = [c | rope(k_pe)]."""
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [torch.cat([layer.keys[0, 0], layer.values[0, 0]], -1) for layer in cache.layers]


@pytest.mark.parametrize("arch", ["llama"])      # Qwen3 (latents of the normed keys) checked the same way by hand
def test_connector_moves_model_defs_latents_at_per_layer_widths(tmp_path, calib_file, arch):
    from safetensors.torch import load_file, save_file

    _, out, cfg = mixed_rank_conversion(tmp_path, arch, calib_file)
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    store = tmp_path / "kv_store"
    transfer = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(store)}}
    prompts = random_prompts(cfg["vocab_size"], n=4, seed=3, lengths=(40, 90))
    # ExampleConnector stores (len - 1) // BLOCK blocks but looks up (len - 2) // BLOCK: a prompt of k BLOCK + 1
    # tokens is stored under one name and looked up under another (never found). Not such prompts here.
    assert all((len(ids) - 1) % BLOCK for ids in prompts)
    model, _ = reference_model(out)
    log = tmp_path / "connector.log"
    # eager: the connector saves and loads each layer's cache around the attention op, which a compiled graph keeps
    # as its own piece (the Llama class compiles in tests/test_vllm_serve.py; a compile costs ~35 s on 2 cores)
    args = serve_args("--enforce-eager", "--block-size", str(BLOCK), "--no-enable-prefix-caching",
                      "--kv-transfer-config", json.dumps(transfer))
    with VLLMServer(out, *args, log_path=log) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
        stored = compare_concurrent(client, model, prompts, N_NEW, prompt_logprobs=False)

        worst = 0.0
        for ids in prompts:
            folder = stored_folder(store, ids)
            n = stored_rows(ids)
            for layer, (want, width) in enumerate(zip(model_defs_latents(model, ids), widths)):
                got = load_file(str(folder / f"model.layers.{layer}.self_attn.attn.safetensors"))["kv_cache"]
                assert got.shape == (n, width), (layer, got.shape)
                worst = max(worst, (got - want[:n]).abs().max().item())
                assert torch.allclose(got, want[:n], atol=1e-4, rtol=1e-4), (layer, worst)

        loaded = compare_concurrent(client, model, prompts, N_NEW, prompt_logprobs=False)
        injected = server.log_text().count("Inject KV cache of")
        assert injected == len(prompts), f"{injected} loads from the connector, expected {len(prompts)}"

        for f in stored_folder(store, prompts[0]).iterdir():
            save_file({"kv_cache": torch.zeros_like(load_file(str(f))["kv_cache"])}, str(f))
        _, off = one_completion(client, model, prompts[0], N_NEW, temperature=0)
        assert off > 0.05, f"zeroed stored rows changed the served logprobs by only {off}: were they loaded?"
    print(f"[{arch}] stored rows within {worst:.1e} of model_defs' cache; logprobs: stored {stored['generated']:.1e}, "
          f"loaded {loaded['generated']:.1e}, zeroed rows {off:.2f}")
    assert stored["generated"] < 1e-3 and loaded["generated"] < 1e-3, (stored, loaded)
