"""A tiny GGUF file written from a tiny transformers folder, so the GGUF loading paths (care-eval,
care-convert, converter/gguf_cache.py) run on a file whose correct tensors and outputs are known: the
folder's. Written as llama.cpp's convert_hf_to_gguf.py writes these architectures: Llama's q/k rows
permuted (llama.cpp's rotary pairs adjacent dimensions), llama3 rope scaling not as metadata but
as a `rope_freqs.weight` tensor of per-frequency divisors, yarn as `rope.scaling.*` metadata, and a Qwen3-MoE layer's experts stacked into
one 3-D tensor per projection."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def write_gguf(src: Path, path: Path, license: str | None = None, drop: tuple[str, ...] = (),
               sliding_window: int | None = None, expert_count: int | None = None, rope_dims: int | None = None,
               longrope: bool = False) -> Path:
    """An F32 GGUF of a tiny Qwen3, Qwen3-MoE (every layer sparse: GGUF has no dense layers in a MoE) or
    Llama folder (llama.cpp's tensor names via the gguf package; the llama3 BPE tokenizer stored as
    "gpt2"/"llama-bpe"). `drop`: transformers tensor names to leave out (a broken file). `sliding_window`: written
    as `<arch>.attention.sliding_window`, as llama.cpp's converter does for Phi-3-4k. `expert_count`: written as
    `<arch>.expert_count` (metadata only: how a Mixtral GGUF, arch "llama", announces its experts). `rope_dims`:
    `<arch>.rope.dimension_count` instead of the head dimension (what llama.cpp writes for Phi-4-mini's partial
    rotary, head_dim x partial_rotary_factor). `longrope`: Phi-3.5's longrope as llama.cpp writes it, the
    `rope_factors_long/short.weight` tensors and `rope.scaling.attn_factor` / `original_context_length`."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    tj = json.loads((src / "tokenizer.json").read_text())
    V = cfg["vocab_size"]
    tokens, types = [f"<unused{i}>" for i in range(V)], [5] * V
    for t, i in tj["model"]["vocab"].items():
        if i < V:
            tokens[i], types[i] = t, 1
    for a in tj.get("added_tokens", []):
        if a["id"] < V:
            tokens[a["id"]], types[a["id"]] = a["content"], 3
    arch = cfg["model_type"]
    gguf_arch = gguf.MODEL_ARCH[arch.upper().replace("_", "")]   # qwen3_moe: llama.cpp's QWEN3MOE, "qwen3moe"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(cfg["head_dim"])     # (llama.cpp writes them when the config has a head_dim)
    w.add_value_length(cfg["head_dim"])
    if arch in ("llama", "phi3") or rope_dims is not None:
        w.add_rope_dimension_count(rope_dims or cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    if license is not None:
        w.add_license(license)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    if expert_count is not None and arch != "qwen3_moe":
        w.add_expert_count(expert_count)
    tensors = load_file(str(src / "model.safetensors"))
    if arch == "qwen3_moe":
        if cfg.get("mlp_only_layers"):
            raise ValueError("a Qwen3-MoE GGUF has no dense layers")
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        tensors = _stack_experts(tensors, cfg["num_local_experts"])
    names = gguf.get_tensor_name_map(gguf_arch, cfg["num_hidden_layers"])
    for k, v in tensors.items():
        if k in drop:
            continue
        v = v.float().numpy()
        if arch == "llama" and k.endswith(("q_proj.weight", "k_proj.weight")):
            v = _permute(v, heads if k.endswith("q_proj.weight") else kv_heads)
        w.add_tensor(names.get_name(k, try_suffixes=(".weight", ".bias")), v)
    rope = cfg["rope_parameters"]
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, cfg["head_dim"]))
    if rope.get("rope_type") == "yarn":   # as metadata, with the keys llama.cpp's converter writes for it
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if longrope:
        half = cfg["head_dim"] // 2
        w.add_tensor("rope_factors_long.weight", np.linspace(1.0, 8.0, half, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.linspace(1.0, 2.0, half, dtype=np.float32))
        w.add_rope_scaling_attn_factors(1.19)
        w.add_rope_scaling_orig_ctx_len(cfg["max_position_embeddings"] // 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _stack_experts(tensors: dict, n_experts: int) -> dict:
    """Per-expert `mlp.experts.<e>.<proj>.weight` tensors -> one `mlp.experts.<proj>.weight` [E, out, in]
    per layer, as llama.cpp's converter stores them."""
    import re

    import torch

    out, stacks = {}, {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", k)
        if m is None:
            out[k] = v
        else:
            stacks.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = v
    for k, per_expert in stacks.items():
        out[k] = torch.stack([per_expert[e] for e in range(n_experts)])
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The `rope_freqs.weight` llama.cpp's converter writes for rope_type llama3 (one divisor of each
    inverse frequency: 1 for high frequencies, `factor` for low ones, interpolated between)."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old_ctx = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
