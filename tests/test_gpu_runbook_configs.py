"""The model folders the GPU runbook benchmarks (benchmarks/gpu/perf.py, config-only with
`--load-format dummy`) must be real care_mla checkpoints' configs: the GPU session has no time to
find out otherwise. Checked here on CPU: same keys as a config the converter writes, accepted by
model_defs, the plugin's expected tensor shapes equal model_defs' parameters (meta device, full
8B/4B shapes), and the cache widths/budgets the runbook's targets talk about.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import perf  # noqa: E402
import shapes  # noqa: E402

SHAPES = ("llama3-8b", "qwen3-4b")


@pytest.mark.parametrize("shape", SHAPES)
def test_perf_models_have_the_widths_and_budgets_the_targets_assume(shape):
    cfgs = perf.model_configs(shape)
    src = cfgs["gqa"]
    n = src["num_hidden_layers"]
    gqa = perf.kv_values_per_token(src)
    assert gqa == n * 2 * 8 * 128
    widths = {name: [k + v + c["qk_rope_head_dim"] for k, v in zip(c["k_ranks"], c["v_ranks"])]
              for name, c in cfgs.items() if c.get("model_type") == "care_mla"}
    assert set(widths["care576"]) == {576}
    assert set(widths["parity"]) == {2048} and sum(widths["parity"]) == gqa
    assert set(widths["uniform1024"]) == {1024}
    assert sum(widths["mixed"]) == gqa // 2 and len(set(widths["mixed"])) > 4
    assert min(widths["mixed"]) >= 576 and max(widths["mixed"]) <= 1536
    for name, w in widths.items():
        c = cfgs[name]
        assert perf.kv_values_per_token(c) == sum(w)
        assert c["kv_lora_rank"] == max(w) - c["qk_rope_head_dim"]
        assert all(k <= 8 * 128 - 64 and v <= 8 * 128 for k, v in zip(c["k_ranks"], c["v_ranks"]))


def _model_defs_and_plugin_shapes(raw: dict) -> tuple[dict, dict]:
    """(model_defs' parameter shapes built on meta from care_mla config dict `raw`, the plugin's
    expected checkpoint shapes for it): a config the runbook writes must give equal ones."""
    import model_defs  # noqa: F401  (registers care_mla)
    from care_vllm.models import expected_checkpoint_shapes
    from model_defs.modeling_care import CareMLAForCausalLM
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("care_mla", **{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = CareMLAForCausalLM(cfg)
    params = {k: tuple(t.shape) for k, t in model.state_dict().items()
              if not k.endswith("inv_freq") and not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    return params, expected_checkpoint_shapes(cfg)


@pytest.mark.parametrize("shape", SHAPES)
def test_perf_configs_build_in_model_defs_and_match_the_plugin_shapes(shape):
    for name, raw in perf.model_configs(shape).items():
        if raw.get("model_type") != "care_mla":
            continue
        params, expected = _model_defs_and_plugin_shapes(raw)
        assert params == expected, f"{shape}/{name}"


@pytest.mark.parametrize("arch,shape", [("llama", "llama3-8b"), ("qwen3_moe", "qwen3-30b-a3b")])
def test_runbook_config_keys_equal_a_converted_config(tmp_path, arch, shape):
    """shapes.care_config() must write what care-convert writes (no missing or extra keys, the same
    carried-over MoE values), and a MoE shape's config must build in model_defs with the plugin's shapes."""
    from converter.pipeline import MOE_CONFIG_KEYS, convert
    from tests.tiny_models import make_tiny_original

    orig = make_tiny_original(tmp_path / "orig", arch, num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32)
    (tmp_path / "calib.txt").write_text(" ".join(f"word{i % 97} and text {i}" for i in range(3000)))
    convert(orig, tmp_path / "conv", calib_files=[tmp_path / "calib.txt"], kv_ratio=0.5, calib_samples=4,
            calib_seqlen=64, rope_dim=16)
    written = json.loads((tmp_path / "conv" / "config.json").read_text())
    src = shapes.source_config(shape, layers=2)
    made = shapes.care_config(src, *shapes.uniform_ranks(src, 576))
    assert set(made) == set(written)
    assert set(made["care"]) == set(written["care"])
    assert made["architectures"] == written["architectures"]
    assert made["use_qk_norm"] == written["use_qk_norm"]
    assert made["attention_bias"] == written["attention_bias"] is False
    assert shapes.MOE_CONFIG_KEYS == MOE_CONFIG_KEYS
    from model_defs.configuration_care import AUTO_MAP, REMOTE_CODE_FILES

    assert made["auto_map"] == written["auto_map"] == AUTO_MAP and shapes.REMOTE_CODE_FILES == REMOTE_CODE_FILES
    folder = shapes.write_model_dir(tmp_path / "shape_dir", made, None)
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_bytes() == (tmp_path / "conv" / name).read_bytes()
    params, expected = _model_defs_and_plugin_shapes(made)
    assert params == expected
    if arch == "qwen3_moe":
        assert params["model.layers.1.mlp.experts.gate_up_proj"] == (128, 2 * 768, 2048)
