"""Model shapes for the benchmarks: Llama-3.1-8B, Llama-3.1-70B, Qwen3-4B and Qwen3-30B-A3B (MoE)
attention/MLP shapes, random weights.

Why config-only: vLLM's `--load-format dummy` fills random weights itself, so a perf run needs only
config.json (+ a tokenizer); the conversion-speed benchmark builds the same shapes in memory.
The vocabulary is 16384 (as in ../shared/gpu/mk_models.py, whose anchors we compare against): it
changes only the embedding/LM-head cost, which is the same for the GQA original and the converted
model.

`care_config()` writes the care_mla config the converter would write for given per-layer ranks
(docs/FORMAT.md), so the plugin serves it exactly as it serves a real conversion.
"""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

VOCAB = 16384
# the Qwen3-MoE keys a converted config carries over (converter/pipeline.py MOE_CONFIG_KEYS; not imported:
# the GPU runbook imports this file on a machine that may not have the converter's dependencies)
MOE_CONFIG_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "decoder_sparse_step", "mlp_only_layers")

# config.json's auto_map and the files it names (model_defs/configuration_care.py AUTO_MAP and
# REMOTE_CODE_FILES; not imported, for the same reason), copied from this repository's model_defs/
AUTO_MAP = {"AutoConfig": "configuration_care.CareMLAConfig", "AutoModel": "modeling_care.CareMLAModel",
            "AutoModelForCausalLM": "modeling_care.CareMLAForCausalLM"}
REMOTE_CODE_FILES = ("configuration_care.py", "modeling_care.py")
MODEL_DEFS = Path(__file__).resolve().parents[1] / "model_defs"

SHAPES = {
    # Llama-3.1-8B: 32 layers, 32 query / 8 KV heads of 128, llama3 rope scaling
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
                      hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                      max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      torch_dtype="bfloat16"),
    # Qwen3-4B: 36 layers, 32 query / 8 KV heads of 128, q_norm/k_norm, tied embeddings
    "qwen3-4b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=VOCAB,
                     hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                     max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     rope_theta=1000000.0, attention_bias=False, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, torch_dtype="bfloat16"),
}
# Qwen3-30B-A3B: 48 layers, 32 query / 4 KV heads of 128, 128 experts (top 8) of 768 in every layer
SHAPES["qwen3-30b-a3b"] = dict(SHAPES["qwen3-4b"], architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                               hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                               num_key_value_heads=4, tie_word_embeddings=False, num_experts=128,
                               num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                               decoder_sparse_step=1, mlp_only_layers=[])
# Llama-3.1-70B: 80 layers, 64 query / 8 KV heads of 128, the 8B's rope (the converter's host-memory benchmark)
SHAPES["llama3-70b"] = dict(SHAPES["llama3-8b"], hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64)


def source_config(shape: str, layers: int | None = None, hidden: int | None = None) -> dict:
    """The GQA original's config.json dict (optionally fewer layers / narrower, for CPU dry runs)."""
    cfg = json.loads(json.dumps(SHAPES[shape]))
    if layers:
        cfg["num_hidden_layers"] = layers
    if hidden:
        scale = hidden / cfg["hidden_size"]
        cfg["hidden_size"] = hidden
        cfg["intermediate_size"] = int(cfg["intermediate_size"] * scale) // 64 * 64
    return cfg


def hf_config(cfg: dict):
    """transformers config object for a source config dict."""
    from transformers import AutoConfig

    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    c = AutoConfig.for_model(cfg["model_type"], **kw)
    c.architectures = cfg["architectures"]
    return c


def inv_freq(cfg: dict):
    """The source's exact rotary inverse frequencies (llama3 scaling applied), as transformers computes them."""
    from transformers import AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(dict(cfg, num_hidden_layers=1)))
    with torch.device("cpu"):
        rot = type(model.model.rotary_emb)(config=model.config)
    return rot.inv_freq.float()


def _installed_care_vllm() -> str | None:
    """config.json's care_vllm_version, as care-convert records it (converter/versions.py; not imported, for the
    reason above): None where care-vllm is not installed (the GPU runbook may run from the tree)."""
    try:
        return metadata.version("care-vllm")
    except metadata.PackageNotFoundError:
        return None


def care_config(cfg: dict, k_ranks: list[int], v_ranks: list[int], rope_dim: int = 64) -> dict:
    """care_mla config.json for a source shape and per-layer ranks (rope on the rope_dim/2 fastest pairs)."""
    d_h = cfg["head_dim"]
    freqs = inv_freq(cfg)[: rope_dim // 2]
    n = cfg["num_hidden_layers"]
    assert len(k_ranks) == len(v_ranks) == n
    total = sum(k_ranks) + sum(v_ranks) + n * rope_dim
    parity = n * 2 * cfg["num_key_value_heads"] * d_h
    assert total <= parity, (total, parity)
    arch = {"llama": "CareLlamaForCausalLM", "qwen3": "CareQwen3ForCausalLM",
            "qwen3_moe": "CareQwen3MoeForCausalLM"}[cfg["model_type"]]
    return {
        "model_type": "care_mla", "architectures": [arch], "auto_map": dict(AUTO_MAP),
        **{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")},
        "initializer_range": 0.02, "dtype": "bfloat16",
        "original_num_key_value_heads": cfg["num_key_value_heads"], "original_head_dim": d_h,
        "qk_nope_head_dim": d_h, "qk_rope_head_dim": rope_dim, "v_head_dim": d_h,
        "k_ranks": list(k_ranks), "v_ranks": list(v_ranks),
        "kv_lora_rank": max(k + v for k, v in zip(k_ranks, v_ranks)), "q_lora_rank": None,
        "use_qk_norm": cfg["model_type"] in ("qwen3", "qwen3_moe"),
        "attention_bias": bool(cfg.get("attention_bias", False)),
        "rope_inv_freq": [float(x) for x in freqs.tolist()],
        "softmax_scale": d_h ** -0.5,
        "source_rope_parameters": dict(cfg.get("rope_scaling") or {"rope_type": "default"},
                                       rope_theta=cfg["rope_theta"]),
        "source_model": f"random {cfg['model_type']} shape", "source_revision": None,
        "source_architecture": cfg["architectures"][0],
        "care_vllm_version": _installed_care_vllm(),
        **{k: cfg[k] for k in MOE_CONFIG_KEYS if "num_experts" in cfg},
        "care": {"method": "care", "objective": "kv", "rank_policy": "given", "o_proj_refit": False,
                 "o_proj_refit_ridge": None, "kv_ratio": round(total / parity, 6),
                 "rope_dim": rope_dim},
    }


def uniform_ranks(cfg: dict, width: int, rope_dim: int = 64) -> tuple[list[int], list[int]]:
    """Per-layer latent split for a uniform cache width: K and V get half of width - rope_dim each."""
    r = width - rope_dim
    return [r // 2] * cfg["num_hidden_layers"], [r - r // 2] * cfg["num_hidden_layers"]


def write_model_dir(out: Path, config: dict, tokenizer_dir: Path | None) -> Path:
    """A config-only checkpoint folder (for --load-format dummy) with the tokenizer files copied in, and for
    a care_mla config the modeling code its auto_map names (as care-convert writes it)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if "auto_map" in config:
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(MODEL_DEFS / name, out / name)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
                shutil.copy(f, out / f.name)
    return out
