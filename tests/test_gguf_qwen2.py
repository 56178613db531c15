"""A Qwen2 GGUF (q/k/v biases stored as llama.cpp's `attn_q.bias`/`attn_k.bias`/`attn_v.bias`) loads with its
folder's logits, and converts as that folder does (biases included: converter/assemble.py).

Read directly (CARE_VLLM_CACHE=off): the tests' GGUF stores the llama3 BPE tokenizer, which transformers
rebuilds as a Qwen2Tokenizer that does not load back as saved, so the dequantized cache folder (which
checks that) is not written for it; the direct read is the fallback every GGUF load has."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from converter.load import load_source
from converter.pipeline import convert
from tests.gguf_files import write_gguf
from tests.tiny_models import make_tiny_original


def test_qwen2_gguf_loads_and_converts_as_its_folder(tmp_path, monkeypatch, calib_file):
    monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    src = make_tiny_original(tmp_path / "orig", "qwen2", num_layers=2, hidden=128, heads=2, kv_heads=1, head_dim=64)
    gguf = write_gguf(src, tmp_path / "tiny-qwen2.F32.gguf")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    source = load_source(gguf)
    assert source.model.model.layers[0].self_attn.q_proj.bias is not None
    x = torch.randint(0, ref.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert torch.equal(source.model(x).logits, ref(x).logits)

    opts = dict(calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4, calib_seqlen=64)
    convert(gguf, tmp_path / "from_gguf", **opts)
    convert(src, tmp_path / "from_folder", **opts)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("from_gguf", "from_folder"))
    assert a.keys() == b.keys() and "model.layers.1.self_attn.o_proj.bias" in a
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert json.loads((tmp_path / "from_gguf" / "config.json").read_text())["attention_bias"] is True
