"""care-convert reads a Qwen3-MoE source's experts one layer at a time (converter/experts.py) instead of
letting transformers fuse all of them into RAM at load. The independent reference is transformers
itself: the experts it fuses in from_pretrained, and a conversion of the source it loaded whole.

Both on-disk forms are checked (per-expert tensors, what the Hub stores and save_pretrained writes;
fused 3-D tensors), in fp32 and bf16.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converter import calib_data, load
from converter.pipeline import convert, convert_source, Options
from tests.tiny_models import checkpoint_tensors, make_tiny_original


def _source(root, form: str, dtype: torch.dtype):
    """A tiny Qwen3-MoE folder stored in `dtype`, its experts per expert or fused."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_original(root / "fp32", "qwen3_moe", num_layers=3)
    if form == "per_expert" and dtype == torch.float32:
        return src
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    out = root / f"{form}-{dtype}".replace("torch.", "")
    model.save_pretrained(out)   # per-expert tensors (transformers reverts its fusing on save)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    if form == "fused":          # the state dict as transformers holds it: experts 3-D
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("form", ["per_expert", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_source_holds_no_experts_and_reads_them_as_transformers_fuses(tmp_path, form, dtype):
    from transformers import AutoModelForCausalLM

    src = _source(tmp_path, form, dtype)
    with safe_open(str(next(src.glob("*.safetensors"))), "pt") as fh:
        fused_on_disk = any(k.endswith("experts.gate_up_proj") for k in fh.keys())
    assert fused_on_disk == (form == "fused")

    reference = AutoModelForCausalLM.from_pretrained(src, dtype="auto").state_dict()
    source = load.load_source(src, stream_experts=True)
    held = source.model.state_dict()
    expert_names = [k for k in reference if ".mlp.experts." in k]
    assert len(expert_names) == 4   # 2 sparse layers (the last one is dense), gate_up + down each
    assert all(held[k].is_meta for k in expert_names)
    for k, t in reference.items():
        if k not in expert_names:
            assert held[k].dtype == dtype and torch.equal(held[k], t), k
    assert source.experts.layers == [0, 1]
    streamed = dict(kv for l in range(3) for kv in source.streamed_tensors(l))
    assert sorted(streamed) == sorted(expert_names)
    for k, t in streamed.items():
        assert t.dtype == dtype and torch.equal(t, reference[k]), k
    # inside layer_in_memory the layer's forward has its experts, and they are gone after
    with source.layer_in_memory(0) as layer:
        assert torch.equal(layer.mlp.experts.down_proj, reference["model.layers.0.mlp.experts.down_proj"])
    assert source.model.model.layers[0].mlp.experts.down_proj.is_meta


@pytest.mark.parametrize("k_share", [None, "auto"])
def test_conversion_with_streamed_experts_equals_converting_the_whole_model(tmp_path, calib_file, k_share):
    """care-convert (streams) writes exactly what converting transformers' fully loaded model writes; with
    --k-share auto its candidates' scores, run through the streamed experts, are the whole model's too."""
    src = _source(tmp_path, "per_expert", torch.bfloat16)
    kw = dict(kv_ratio=0.5, calib_samples=8, calib_seqlen=64, ranks="adjusted", k_share=k_share)
    streamed = convert(src, tmp_path / "streamed", calib_files=[calib_file], **kw)

    whole = load.load_source(src)
    assert whole.experts is None and not any(t.is_meta for t in whole.model.state_dict().values())
    windows = calib_data.token_windows(whole.tokenizer, calib_data.read_texts([calib_file]), 8, 64, 0)
    reference = convert_source(whole, windows, tmp_path / "whole", Options(**kw))

    assert streamed["cache_values_per_token"] == reference["cache_values_per_token"]
    assert streamed["layers"] == reference["layers"]
    assert streamed.get("k_share_auto") == reference.get("k_share_auto")
    if k_share == "auto":
        assert len(streamed["k_share_auto"]["candidates"]) > 1 and streamed["k_share_auto"]["candidates"][0]["kl"] > 0
    got, want = checkpoint_tensors(tmp_path / "streamed"), checkpoint_tensors(tmp_path / "whole")
    assert sorted(got) == sorted(want)
    assert any(".mlp.experts.gate_up_proj" in k for k in got)
    for k in want:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]), k
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert cfg["num_experts"] == 4 and cfg["dtype"] == "bfloat16"


def test_calibration_reads_experts_in_the_working_dtype_without_a_second_copy(tmp_path):
    """A bf16 source calibrated in fp32: the layer's experts are read in fp32 and the working copy shares
    them (no bf16 read plus fp32 copy); the statistics equal calibrating transformers' whole model."""
    from converter import calibrate

    src = _source(tmp_path, "per_expert", torch.bfloat16)
    streamed, whole = load.load_source(src, stream_experts=True), load.load_source(src)
    with streamed.layer_in_memory(0, torch.float32) as layer:
        experts = layer.mlp.experts.gate_up_proj
        assert experts.dtype == torch.float32 and layer.self_attn.q_proj.weight.dtype == torch.bfloat16
        copy = calibrate.working_copy(layer, "cpu", torch.float32)
        assert copy.mlp.experts.gate_up_proj is experts
        assert copy.self_attn.q_proj.weight.dtype == torch.float32
    windows = torch.randint(0, 16384, (4, 32), generator=torch.Generator().manual_seed(0))
    got = calibrate.collect_stats(streamed.model, windows, "qwen3", layer_in_memory=streamed.layer_in_memory)
    want = calibrate.collect_stats(whole.model, windows, "qwen3")
    for a, b in zip(got.layers, want.layers):
        for name in ("ck", "cv", "qc", "ax"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
