"""FP8 sources (converter/fp8_source.py): Qwen3's -FP8 release format (fp8 codes, one scale per weight block)
converts as the weights it encodes, and any other quantized source is refused by name.

Reference: the plain folder of those weights, dequantized by the tests' own loop over blocks
(tests/fp8_files.py) and run in transformers. Blocks of [48, 40] leave partial edge blocks in every
tensor of the tiny models (and in a Phi-3's fused qkv_proj and gate_up_proj, blocks that straddle the q/k/v and
gate/up boundaries: the weights are dequantized before converter/phi3.py splits them). The Qwen3-MoE copy goes through the converter's own reader (experts streamed a
layer at a time, and the rest of the model read from the files: converter/experts.py), the dense one and
the healing teacher through transformers' loader."""
from __future__ import annotations

import json

import pytest
import torch

from converter.load import load_source
from converter.pipeline import convert
from tests.fp8_files import write_dequantized, write_fp8
from tests.test_converter_errors import assert_refused, run_convert
from tests.tiny_models import make_tiny_original

BLOCK = (48, 40)
IDS = torch.tensor([[5, 900, 33, 1200, 77, 4000, 12, 8, 15000, 256, 9, 3000, 41, 42, 43, 600, 7000, 2, 31, 88]])


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "phi3"])
def fp8_pair(request, tmp_path_factory):
    """(arch, fp8 folder, the plain folder of the weights it encodes)."""
    root = tmp_path_factory.mktemp(f"fp8_{request.param}")
    src = make_tiny_original(root / "orig", request.param, num_layers=2, hidden=128, heads=4, kv_heads=2,
                             head_dim=32)
    fp8 = write_fp8(src, root / "fp8", BLOCK)
    return request.param, fp8, write_dequantized(fp8, root / "plain")


def _logits(path, dtype=torch.float64) -> torch.Tensor:
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    with torch.no_grad():
        return model.eval()(IDS).logits[0]


def test_fp8_source_converts_as_the_weights_it_encodes(fp8_pair, tmp_path, calib_file):
    """Full ranks, RoPE on every key dim: the conversion of the fp8 folder reproduces the dequantized original's
    logits, and is unquantized (no fp8 tensor, no scale, no quantization_config)."""
    from safetensors import safe_open

    arch, fp8, plain = fp8_pair
    out = tmp_path / "mla"
    convert(fp8, out, calib_files=[calib_file], kv_ratio=1.0, rope_dim=2 * 32, calib_samples=8, calib_seqlen=64,
            ranks="uniform")
    ref = _logits(plain)
    err = (_logits(out) - ref).abs().max().item()
    assert err < 1e-4, f"{arch}: max |logit diff| {err} (logits up to {ref.abs().max().item():.1f})"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        names = list(fh.keys())
        dtypes = {fh.get_tensor(k).dtype for k in names}
    assert dtypes == {torch.float32} and not [n for n in names if n.endswith("_scale_inv")]


def test_fp8_source_loads_dequantized_whole_and_streamed(fp8_pair):
    """What the converter (experts streamed) and the healing teacher (loaded whole) compute is the
    dequantized model's forward (fp32: the loaded MoE runs transformers' grouped experts, which have no fp64)."""
    arch, fp8, plain = fp8_pair
    ref = _logits(plain, torch.float32)
    for stream in (True, False):
        source = load_source(fp8, stream_experts=stream)
        with torch.no_grad():
            got = _forward(source)
        err = (got - ref).abs().max().item()
        assert err < 1e-4, f"{arch}, stream_experts={stream}: max |logit diff| {err}"


def _forward(source) -> torch.Tensor:
    """The source model's logits for IDS, with streamed experts attached one layer at a time."""
    model = source.model
    if source.experts is None:
        return model(IDS).logits[0]
    inner = model.model
    h = inner.embed_tokens(IDS)
    pos = torch.arange(IDS.shape[1])[None]
    rope = inner.rotary_emb(h, pos)
    for l, layer in enumerate(inner.layers):
        with source.layer_in_memory(l):
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(h))[0]


@pytest.mark.parametrize("qconfig,needle", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quant_method 'gptq'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "quant_method 'compressed-tensors'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method 'fp8', weight_block_size None"),
])
def test_other_quantized_sources_are_refused_by_name(tmp_path, calib_file, qconfig, needle):
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib_file), out, needle, "not supported",
                   "convert from the bf16/fp16 checkpoint")


def test_fp8_weight_without_its_scales_is_refused(tmp_path, calib_file):
    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32)
    name = "model.layers.1.self_attn.k_proj.weight"
    fp8 = write_fp8(src, tmp_path / "fp8", BLOCK, drop_scale=name)
    out = tmp_path / "out"
    assert_refused(run_convert(fp8, out, "--calib", calib_file), out, f"fp8 tensor {name} has no {name}_scale_inv")


def test_fp8_weights_config_json_does_not_declare_are_refused(tmp_path, calib_file):
    """fp8 codes with per-tensor scales described only outside config.json (ModelOpt's hf_quant_config.json):
    transformers loads the codes as the weights and ignores the scales, and the conversion ran on that model
    (exit 0, logits off by up to 21). Refused by the tensor's stored dtype."""
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    fp8 = write_fp8(src, tmp_path / "fp8", BLOCK)
    cfg = json.loads((fp8 / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8 / "config.json").write_text(json.dumps(cfg))
    (fp8 / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    out = tmp_path / "out"
    assert_refused(run_convert(fp8, out, "--calib", calib_file), out, "is stored as F8_E4M3, but config.json declares "
                   "no quantization", "convert from the bf16/fp16 checkpoint")
