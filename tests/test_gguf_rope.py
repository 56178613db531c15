"""Rope scaling (and head_dim) of GGUF sources (converter/gguf_meta.py): llama.cpp stores Llama-3.x's llama3 rope scaling as
a `rope_freqs.weight` tensor that transformers skips. The reference is transformers' own llama3 rope:
a tiny Llama-3 folder written as a GGUF the way llama.cpp's converter writes it loads with the folder's
inverse frequencies and logits exactly, and its conversion keeps them; the divisors of real Llama 3.1 /
3.2 shapes map back to their rope_parameters. Yarn (Qwen3's long-context setting) is stored as rope.scaling.*
metadata, which transformers does not read either: a tiny Qwen3-yarn GGUF loads with the folder's frequencies,
attention factor and logits. What cannot be mapped is refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from converter.errors import ConversionError
from converter.gguf_meta import GgufMeta, apply, apply_rope
from converter.load import load_source
from tests.gguf_files import llama3_rope_factors, write_gguf
from tests.tiny_models import LLAMA3_ROPE, QWEN3_YARN, make_tiny_original


@pytest.mark.parametrize("caching", ["on", "off"])
def test_llama3_gguf_keeps_its_rope(tmp_path, monkeypatch, calib_file, caching):
    from converter.pipeline import convert

    if caching == "off":
        monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    # head_dim 64 (32 frequencies): three of them in the interpolated band of the tiny model's 256-token
    # original context, as Llama 3.1's 128-dim heads have seven in its 8192-token one
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2, hidden=128, heads=2, kv_heads=1, head_dim=64)
    gguf = write_gguf(src, tmp_path / "tiny-llama3.F32.gguf")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    source = load_source(gguf)
    assert source.config.rope_parameters == {**LLAMA3_ROPE}
    rotary = source.model.model.rotary_emb.inv_freq
    assert torch.equal(rotary, ref.model.rotary_emb.inv_freq)
    x = torch.randint(0, ref.config.vocab_size, (2, 300))   # past the original context (256)
    with torch.no_grad():
        assert torch.equal(source.model(x).logits, ref(x).logits)

    out = tmp_path / "care"
    convert(gguf, out, calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4, calib_seqlen=64)
    kept = json.loads((out / "config.json").read_text())["rope_inv_freq"]
    assert set(kept) <= set(rotary.tolist())   # the decoupled rope key's frequencies: the llama3 ones,
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    assert set(kept) - set(plain.tolist())     # some of them scaled (what a plain-rope load would miss)


def test_yarn_gguf_keeps_its_rope(tmp_path, calib_file):
    """Qwen3 with yarn (its long-context setting) as llama.cpp writes it: rope.scaling.* metadata, which
    transformers' GGUF reader drops. Loaded from the GGUF, the model has the folder's frequencies, attention
    factor and logits, and its conversion the folder's softmax scale."""
    from converter.pipeline import convert

    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=2, hidden=128, heads=2, kv_heads=1,
                             head_dim=64, rope=QWEN3_YARN)
    gguf = write_gguf(src, tmp_path / "tiny-qwen3-yarn.F32.gguf")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    source = load_source(gguf)
    assert source.config.rope_parameters == QWEN3_YARN
    rotary = source.model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, ref.model.rotary_emb.inv_freq)
    assert rotary.attention_scaling == ref.model.rotary_emb.attention_scaling != 1.0
    x = torch.randint(0, ref.config.vocab_size, (2, 300))   # past the original context (256)
    with torch.no_grad():
        assert torch.equal(source.model(x).logits, ref(x).logits)

    convert(gguf, tmp_path / "from_gguf", calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4,
            calib_seqlen=64)
    convert(src, tmp_path / "from_folder", calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4,
            calib_seqlen=64)
    got, want = ({k: json.loads((tmp_path / d / "config.json").read_text())[k]
                  for k in ("softmax_scale", "rope_inv_freq", "source_rope_parameters")}
                 for d in ("from_gguf", "from_folder"))
    assert got == want


@pytest.mark.parametrize("head_dim,factor,old_ctx", [(128, 8.0, 8192), (128, 32.0, 8192), (64, 8.0, 256)])
def test_rope_freqs_map_back_to_llama3_parameters(head_dim, factor, old_ctx):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) shapes, and the tiny test model's."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": old_ctx}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    apply_rope(cfg, GgufMeta(None, llama3_rope_factors(rope, head_dim), {}), "x.gguf")
    assert cfg.rope_parameters == rope


def test_rope_scaling_metadata():
    def cfg():
        return LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

    linear = cfg()
    apply_rope(linear, GgufMeta(None, None, {"type": "linear", "factor": 4.0}), "x.gguf")
    assert linear.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    plain = cfg()
    apply_rope(plain, GgufMeta(None, np.ones(32, dtype=np.float32), {}), "x.gguf")
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    yarn = cfg()
    apply_rope(yarn, GgufMeta(None, None, {"type": "yarn", "factor": 4.0, "original_context_length": 32768,
                                           "yarn_beta_fast": 16.0, "finetuned": False}), "x.gguf")
    assert yarn.rope_parameters == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 32768, "beta_fast": 16.0}
    with pytest.raises(ConversionError, match="x.gguf: rope scaling 'longrope'"):
        apply_rope(cfg(), GgufMeta(None, None, {"type": "longrope", "factor": 4.0}), "x.gguf")
    with pytest.raises(ConversionError, match="x.gguf: rope scaling 'yarn' without original_context_length"):
        apply_rope(cfg(), GgufMeta(None, None, {"type": "yarn", "factor": 4.0}), "x.gguf")
    with pytest.raises(ConversionError, match="'yarn' with yarn_attn_factor .*not understood"):
        apply_rope(cfg(), GgufMeta(None, None, {"type": "yarn", "factor": 4.0, "original_context_length": 256,
                                                "yarn_attn_factor": 1.0}), "x.gguf")
    with pytest.raises(ConversionError, match="x.gguf: rope_freqs.weight .*matches no llama3"):
        apply_rope(cfg(), GgufMeta(None, np.linspace(1, 3, 32).astype(np.float32)[::-1].copy(), {}), "x.gguf")
    with pytest.raises(ConversionError, match="x.gguf: rope_freqs.weight has 16 entries"):
        apply_rope(cfg(), GgufMeta(None, np.full(16, 2.0, dtype=np.float32), {}), "x.gguf")
    qwen = Qwen3Config(hidden_size=256, num_attention_heads=4, head_dim=64)
    with pytest.raises(ConversionError, match="only understood for Llama"):
        apply_rope(qwen, GgufMeta(None, np.full(32, 2.0, dtype=np.float32), {}), "x.gguf")


def test_head_dim_from_metadata():
    """transformers gives a Qwen3 GGUF Qwen3Config's default head_dim 128; the file's key_length wins."""
    qwen = Qwen3Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    assert qwen.head_dim == 128
    apply(qwen, GgufMeta(None, None, {}, 32, 32), "x.gguf")
    assert qwen.head_dim == 32
    with pytest.raises(ConversionError, match="x.gguf: key and value head dimensions differ"):
        apply(Qwen3Config(), GgufMeta(None, None, {}, 64, 32), "x.gguf")
