"""Tiny ORIGINAL (GQA) checkpoints built inside the tests: random Llama-3 (with llama3 rope
scaling) and Qwen3 (with q_norm/k_norm) models, saved as a normal transformers folder with the
tokenizer of ../shared/models/llama3-small. They are the independent reference that converted
checkpoints are checked against, and small enough that `vllm serve` on them takes seconds.

The random weights are scaled so that attention is far from uniform (otherwise an exactness test
could pass with a broken rope), and the per-head norm weights are non-trivial.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("CARE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TOKENIZER_SRC = SHARED / "models" / "llama3-small"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
}

# Qwen3's documented long-context setting (factor 4 over its pretraining context), at the tiny models' scale:
# 256 * 4 = the tiny models' default max_position_embeddings. Its attention factor is 0.1 ln 4 + 1.
QWEN3_YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 256}


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files (sharded or not), by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def require_shared(path: Path) -> Path:
    """Skip (with the missing path named) where ../shared is absent; CI always has it."""
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"CI needs {path} (../shared beside the checkout)")
        pytest.skip(f"missing {path} (../shared is not beside this checkout)")
    return path


def _common(num_layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
            max_positions: int = 1024) -> dict:
    return dict(
        vocab_size=16384, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        attention_bias=False,
    )


def _randomize(model: torch.nn.Module, seed: int, embed_std: float = 0.3, qk_gain: float = 2.5) -> None:
    """Random weights with LM-like statistics. The defaults (logits and attention scores of O(1..10))
    make exactness tests sensitive. `embed_std`/`qk_gain` calm a wide model down for bf16 tests: with
    hidden 1024 the defaults give logits of std ~10 and near one-hot attention, whose bf16 rounding
    alone moves prompt logprobs by ~1.5 nats (2.5 at 9K tokens), far above a real LM's ~0.05."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):   # Qwen2's q/k/v biases (and a biased Llama's): large enough to matter
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # norm weights: around 1 but not 1
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=g))  # logits of O(1..10), like a real LM
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)  # fan-in (3-D: MoE experts)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_gain)  # sharp attention: scores of O(1..10)
            elif name.endswith("qkv_proj.weight"):   # Phi-3's fused [q; k; v]: the q and k rows
                cfg = model.config
                p[: (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim].mul_(qk_gain)


def make_tiny_original(out: Path, arch: str = "llama", *, num_layers: int = 3, hidden: int = 64,
                       heads: int = 4, kv_heads: int = 2, head_dim: int = 16, seed: int = 0,
                       max_positions: int = 1024, embed_std: float = 0.3, qk_gain: float = 2.5,
                       mlp_only_layers: list[int] | None = None, rope: dict | None = None,
                       attention_bias: bool = False) -> Path:
    """Write a random tiny Llama-3 (`arch="llama"`), Mistral (`arch="mistral"`), Phi-3/Phi-4 (`arch="phi3"`), Granite
    (`arch="granite"`), Mixtral (`arch="mixtral"`: 4 experts of width `hidden`, top-2, saved in the Hub's block_sparse_moe names), Qwen3 (`arch="qwen3"`) or Qwen3-MoE
    (`arch="qwen3_moe"`: 4 experts, top-2, normalized; dense layers `mlp_only_layers`, by default the last
    one when there are 2+) checkpoint to `out`. `rope`: rope_parameters instead of the architecture's
    (Llama: LLAMA3_ROPE; Qwen3: plain rope, theta 1e6). `arch="qwen2"`: Qwen2 (Llama with q/k/v biases);
    `attention_bias`: a Llama (or Granite) with q/k/v/o biases."""
    from transformers import (GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config,
                              Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    require_shared(TOKENIZER_SRC)
    kw = _common(num_layers, hidden, heads, kv_heads, head_dim, max_positions)
    if arch == "llama":
        cfg = LlamaConfig(**{**kw, "attention_bias": attention_bias}, rope_parameters=dict(rope or LLAMA3_ROPE))
        model = LlamaForCausalLM(cfg)
    elif arch == "mistral":   # as Mistral-7B-v0.3 / Nemo: no sliding window, plain rope
        cfg = MistralConfig(**kw, rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e6}),
                            sliding_window=None)
        model = MistralForCausalLM(cfg)
    elif arch == "phi3":   # as Phi-4: fused qkv_proj and gate_up_proj, plain rope on every dim, no window
        kw.pop("attention_bias")
        cfg = Phi3Config(**kw, rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 250000.0}),
                         sliding_window=None)
        model = Phi3ForCausalLM(cfg)
    elif arch == "granite":   # as Granite 3.1: its four multipliers, none of them 1 (values of granite-3.1-8b's kind)
        # (rms_norm_eps 1e-2, not Granite's 1e-5: large enough that the eps / m_e^2 fold is visible in the logits)
        cfg = GraniteConfig(**{**kw, "attention_bias": attention_bias, "rms_norm_eps": 1e-2},
                            rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e7}),
                            attention_multiplier=1.0 / head_dim, embedding_multiplier=12.0, residual_multiplier=0.22,
                            logits_scaling=8.0)
        model = GraniteForCausalLM(cfg)
    elif arch == "mixtral":   # as Mixtral-8x7B: every layer sparse (4 experts of intermediate_size, top-2), no window
        kw.pop("attention_bias")
        cfg = MixtralConfig(**{**kw, "intermediate_size": hidden},   # experts as wide as qwen3_moe's
                            rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e6}),
                            num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
        model = MixtralForCausalLM(cfg)
    elif arch == "qwen2":   # as Qwen2.5: q/k/v biases, plain rope, no sliding window
        kw.pop("attention_bias")
        cfg = Qwen2Config(**kw, rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e6}),
                          use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = Qwen3Config(**kw, rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e6}))
        model = Qwen3ForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**kw, rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 1e6}),
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden,
                             norm_topk_prob=True, decoder_sparse_step=1,
                             mlp_only_layers=mlp_only_layers if mlp_only_layers is not None
                             else [num_layers - 1] if num_layers > 1 else [])
        model = Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(arch)
    _randomize(model, seed, embed_std, qk_gain)
    out = Path(out)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SRC / f, out / f)
    return out


def damaged_copy(folder: Path, dest: Path, how: str) -> Path:
    """A copy of checkpoint `folder` whose model.safetensors lacks layer 1's k_proj ("missing_tensor"), holds it
    with one row too many ("wrong_shape"), or is cut short ("truncated")."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    weights = dest / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return dest
    tensors = load_file(weights)
    name = next(k for k in tensors if k.startswith("model.layers.1.") and "self_attn" in k and "k" in k.split(".")[-2])
    if how == "missing_tensor":
        del tensors[name]
    else:
        tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, weights, metadata={"format": "pt"})
    return dest
