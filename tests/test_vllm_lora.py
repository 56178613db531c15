"""End to end: `vllm serve OUT --enable-lora` with an adapter that care-convert-lora rewrote from a PEFT adapter of
the tiny original (every attention and MLP projection targeted), on Llama and Qwen3 conversions with different
ranks per layer and the o_proj refit, the Qwen3 one served with `--tensor-parallel-size 2` (the suite's TP test of
the Qwen3 class: both ranks bind KV tensors of the checkpoint's per-layer widths, and the base-model requests are
compared with model_defs alone).

Checked through the `openai` client, with requests for the adapter and for the base model in flight together
(one batch mixes them): greedy tokens identical to model_defs with the converted adapter applied by PEFT (and
to model_defs alone for the base requests) for 24 tokens on 4 concurrent prompts each, prompt and generated
logprobs within 1e-3 (fp32). An adapter that also targets kv_b_proj (which the decode reads absorbed, so a
delta there could not reach it) is refused when loaded at run time, naming the modules vLLM expects.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.served_reference import PROMPTS, compare_concurrent, reference_model, serve_args
from tests.test_lora import adapted_conversion
from tests.vllm_server import VLLMServer, assert_tp_ranks_cache_full_widths, one_core_per_rank

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

N_NEW = 24
RUNTIME_LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


# Qwen3 under --tensor-parallel-size 2: vLLM shards the adapters with their base layers (B by output rows on the
# column-parallel q_proj and gate/up, A by input columns on the row-parallel o_proj and down_proj; the replicated
# k_proj and latent projections keep theirs whole). Llama in one process.
@pytest.fixture(scope="module", params=[("llama", 1), ("qwen3", 2)], ids=["llama", "qwen3-tp2"])
def served(request, tmp_path_factory, calib_file):
    arch, tp = request.param
    root = tmp_path_factory.mktemp(f"lora_serve_{arch}")
    out, cfg, lora_flags = adapted_conversion(root, arch, calib_file)
    # (LoRA turns vLLM's CPU compilation off: eager either way)
    server = VLLMServer(out, *serve_args(*lora_flags, "--tensor-parallel-size", str(tp)), log_path=root / "care.log",
                        env={**RUNTIME_LORA_ENV, **(one_core_per_rank() if tp > 1 else {})})
    with server:
        if tp > 1:   # (the suite's TP test of the Qwen3 class)
            assert_tp_ranks_cache_full_widths(server.log_text(), cfg)
        yield arch, root, out, server


def _client(server):
    # (retries, as the openai client's default: greedy requests are safe to repeat)
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=2)


def test_adapter_and_base_requests_together_match_model_defs(served):
    from peft import PeftModel

    arch, root, out, server = served
    base, tok = reference_model(out)
    adapted, _ = reference_model(out)
    adapted = PeftModel.from_pretrained(adapted, root / "adapter_mla").merge_and_unload().eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        moved = (adapted(torch.tensor([ids[0]])).logits - base(torch.tensor([ids[0]])).logits).abs().max().item()
    assert moved > 0.5, "the adapter must change the model"
    client = _client(server)
    base_name = client.models.list().data[0].id
    with ThreadPoolExecutor(2) as ex:
        with_adapter = ex.submit(compare_concurrent, client, adapted, ids, N_NEW, name="care-ad")
        without = ex.submit(compare_concurrent, client, base, ids, N_NEW, name=base_name)
        results = {"adapter": with_adapter.result(), "base": without.result()}
    for which, r in results.items():
        assert r["prompt"] < 1e-3 and r["generated"] < 1e-3, (which, r)
        assert len(r["distinct"]) >= 4, (which, r["distinct"])
    assert "care-ad" in {m.id for m in client.models.list().data}


def test_an_adapter_on_kv_b_proj_is_refused(served):
    arch, root, out, server = served
    bad = root / "adapter_kv_b"
    shutil.copytree(root / "adapter_mla", bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    rank = json.loads((bad / "adapter_config.json").read_text())["r"]
    width = cfg["k_ranks"][0] + cfg["v_ranks"][0]
    rows = cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"])
    key = "base_model.model.model.layers.0.self_attn.kv_b_proj"
    tensors[key + ".lora_A.weight"] = torch.zeros(rank, width)
    tensors[key + ".lora_B.weight"] = torch.zeros(rows, rank)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    conf = json.loads((bad / "adapter_config.json").read_text())
    conf["target_modules"] = sorted({*conf["target_modules"], "kv_b_proj"})
    (bad / "adapter_config.json").write_text(json.dumps(conf))
    from care_vllm.loadtest.server import fetch

    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(server.base_url + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)}, timeout=60)
    body = info.value.read().decode()
    assert "kv_b_proj" in body and "expected target modules" in body, body
    assert "bad" not in {m.id for m in _client(server).models.list().data}
