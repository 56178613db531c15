"""Phi-3 / Phi-4 sources (`Phi3ForCausalLM`: Llama with fused qkv_proj and gate_up_proj; converter/phi3.py).

The reference is independent of the converter's re-expression: this test splits the fused tensors itself into
a plain Llama folder (transformers' Phi3Attention/Phi3MLP order: [q; k; v], [gate; up]), whose conversion is
the already tested Llama path (exactness, serving). A Phi-3 folder and a Phi-3 GGUF must convert to that
folder's checkpoint, tensor for tensor. (Exactness against the Phi-3 original's own logits:
tests/test_converter_exact.py, variant phi3. Refusals: tests/test_converter_errors.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.load import load_source
from converter.pipeline import convert
from tests.gguf_files import write_gguf
from tests.tiny_models import TOKENIZER_FILES, make_tiny_original

# what the conversions may differ in: where they came from
SOURCE_KEYS = {"source_model", "source_architecture", "source_rope_parameters", "_name_or_path"}


def _llama_twin(phi: Path, out: Path) -> Path:
    """The Phi-3 folder's network as a LlamaForCausalLM folder, split by hand."""
    from transformers import LlamaConfig

    cfg = json.loads((phi / "config.json").read_text())
    n_h, n_kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    tensors = {}
    for k, v in load_file(str(phi / "model.safetensors")).items():
        if k.endswith("qkv_proj.weight"):
            base = k.removesuffix("qkv_proj.weight")
            tensors[base + "q_proj.weight"] = v[: n_h * d].clone()
            tensors[base + "k_proj.weight"] = v[n_h * d: (n_h + n_kv) * d].clone()
            tensors[base + "v_proj.weight"] = v[(n_h + n_kv) * d:].clone()
        elif k.endswith("gate_up_proj.weight"):
            base = k.removesuffix("gate_up_proj.weight")
            half = v.shape[0] // 2
            tensors[base + "gate_proj.weight"], tensors[base + "up_proj.weight"] = v[:half].clone(), v[half:].clone()
        else:
            tensors[k] = v
    rope = {k: v for k, v in cfg["rope_parameters"].items() if k != "partial_rotary_factor"}
    llama = LlamaConfig(**{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                              "eos_token_id", "pad_token_id", "bos_token_id", "hidden_act")},
                        rope_parameters=rope, attention_bias=False, mlp_bias=False)
    llama.architectures = ["LlamaForCausalLM"]
    out.mkdir()
    llama.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZER_FILES:
        (out / f).write_bytes((phi / f).read_bytes())
    return out


@pytest.fixture(scope="module")
def phi_and_twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    phi = make_tiny_original(root / "phi3", "phi3", num_layers=3, hidden=128, heads=4, kv_heads=2, head_dim=32)
    return root, phi, _llama_twin(phi, root / "llama")


def _assert_same_checkpoint(a: Path, b: Path, ignore: set[str] = SOURCE_KEYS) -> dict:
    """Same tensors (to float rounding), same config but for the keys in `ignore`; returns a's config."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=0, atol=1e-6), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ca.items() if k not in ignore} == {k: v for k, v in cb.items() if k not in ignore}
    return ca


def test_phi3_loads_as_its_llama_twin(phi_and_twin):
    """The converter's view of the Phi-3 model computes the Phi-3 original's logits (transformers' Phi3 code)
    with Llama's q/k/v and gate/up projections."""
    from transformers import AutoModelForCausalLM

    _, phi, _ = phi_and_twin
    source = load_source(phi)
    attn = source.model.model.layers[0].self_attn
    assert source.arch == "llama" and hasattr(attn, "k_proj") and not hasattr(attn, "qkv_proj")
    ref = AutoModelForCausalLM.from_pretrained(phi, dtype=torch.float32).eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(source.model(x).logits, ref(x).logits, rtol=0, atol=1e-5)


def test_phi3_converts_to_its_llama_twins_checkpoint(phi_and_twin, calib_file):
    """Adjusted ranks, partial RoPE and the o_proj refit: every step that reads the source sees the same
    network, so the served checkpoint is the Llama one (CareLlamaForCausalLM), with the source recorded."""
    root, phi, twin = phi_and_twin
    opts = dict(calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4, calib_seqlen=64)
    convert(phi, root / "from_phi3", **opts)
    convert(twin, root / "from_llama", **opts)
    cfg = _assert_same_checkpoint(root / "from_phi3", root / "from_llama")
    assert cfg["architectures"] == ["CareLlamaForCausalLM"]
    assert cfg["source_architecture"] == "Phi3ForCausalLM"


def test_phi3_gguf_converts_as_its_folder(phi_and_twin, tmp_path, calib_file):
    """llama.cpp's phi3 layout (fused `attn_qkv`, `ffn_up` holding [gate; up], NeoX rope: no row permutation)."""
    _, phi, _ = phi_and_twin
    gguf = write_gguf(phi, tmp_path / "tiny-phi3.F32.gguf")
    opts = dict(calib_files=[calib_file], kv_ratio=0.5, rope_dim=16, calib_samples=4, calib_seqlen=64)
    convert(gguf, tmp_path / "from_gguf", **opts)
    convert(phi, tmp_path / "from_folder", **opts)
    # the tests' GGUF stores no BOS id (transformers' GGUF config then keeps Phi3Config's default 1), and GGUF
    # stores rms_norm_eps as a float32
    cfg = _assert_same_checkpoint(tmp_path / "from_gguf", tmp_path / "from_folder",
                                  SOURCE_KEYS | {"bos_token_id", "rms_norm_eps"})
    assert cfg["source_architecture"] == "Phi3ForCausalLM" and cfg["rms_norm_eps"] == pytest.approx(1e-6, rel=1e-6)


def test_phi3_gguf_with_a_sliding_window_is_refused(phi_and_twin, tmp_path):
    """transformers' GGUF config does not read `phi3.attention.sliding_window` (Phi-3-mini-4k's 2047): without
    the check the windowed model would load, and convert, as a full-attention one."""
    from converter.errors import ConversionError

    _, phi, _ = phi_and_twin
    gguf = write_gguf(phi, tmp_path / "tiny-phi3-4k.F32.gguf", sliding_window=47)
    with pytest.raises(ConversionError, match=r"sliding-window attention is not supported \(attention.sliding_window=47"):
        load_source(gguf)


@pytest.mark.parametrize("kind", ["partial_rotary", "longrope"])
def test_phi3_gguf_with_a_rope_a_folder_would_be_refused_for_is_refused(phi_and_twin, tmp_path, kind):
    """transformers' GGUF config reads neither `phi3.rope.dimension_count` (Phi-4-mini's partial rotary) nor
    longrope's `rope_factors_long/short` tensors (Phi-3.5, Phi-4-mini): such a GGUF loaded with full, plain rope
    and converted without an error, where the same model's folder is refused by name."""
    from converter.errors import ConversionError

    _, phi, _ = phi_and_twin
    if kind == "partial_rotary":
        gguf = write_gguf(phi, tmp_path / "tiny-phi4-mini.F32.gguf", rope_dims=16)
        match = r"partial rotary embeddings are not supported \(rope.dimension_count=16 of head_dim 32\)"
    else:
        gguf = write_gguf(phi, tmp_path / "tiny-phi3.5.F32.gguf", longrope=True)
        match = r"rope scaling 'longrope' \(rope_factors_long.weight and rope_factors_short.weight, GGUF\)"
    with pytest.raises(ConversionError, match=match):
        load_source(gguf)
