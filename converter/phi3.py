"""Phi-3 / Phi-4 sources (`Phi3ForCausalLM`, e.g. microsoft/phi-4: 40 query / 10 KV heads, head_dim 128).

Why a view rather than a code path: a Phi-3 decoder layer is a Llama layer with two projections fused,
`qkv_proj = [q_proj; k_proj; v_proj]` and `mlp.gate_up_proj = [gate_proj; up_proj]` (rows, in that order;
transformers' Phi3Attention and Phi3MLP split them so), the same RMSNorms, residuals, SiLU MLP, softmax scale
head_dim^-0.5 and NeoX rope. So once loaded, the model is re-expressed as a `LlamaForCausalLM` whose q/k/v and
gate/up weights are row slices (views, no copy) of the fused ones, and everything downstream (calibration,
factorization, the rope map, the writer, serving as CareLlamaForCausalLM) is the Llama path, unchanged.

What Llama cannot express is refused before anything loads: partial rotary (`partial_rotary_factor` < 1,
Phi-4-mini; Llama rotates every dim) and a hidden_act other than SiLU (`check_config`); `longrope`
(Phi-3.5/Phi-4-mini: its factors switch with the sequence length) like any non-static rope, and a sliding
window shorter than the context (Phi-3-mini/medium-4k: 2047) as for Mistral (converter/load.py). Dropouts do
nothing in eval.
"""
from __future__ import annotations

import torch

from .errors import ConversionError

ARCHITECTURE = "Phi3ForCausalLM"


def check_config(cfg, where: str) -> None:
    """Refuse a Phi-3 config whose forward a Llama layer would not reproduce."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    partial = float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise ConversionError(f"{where}: partial rotary embeddings are not supported "
                              f"(partial_rotary_factor={partial}; only every head dim rotated, as Phi-4's)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported (only silu)")


def as_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a `LlamaForCausalLM` on the same storage: the fused q/k/v and gate/up weights are
    split into row views, everything else is the same tensor. Its config is a LlamaConfig carrying the Phi-3
    config's shapes, norms, rope and token ids; `architectures` stays the source's (recorded in the converted
    config as `source_architecture`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = model.config
    n_h, n_kv = src.num_attention_heads, src.num_key_value_heads
    d_h = getattr(src, "head_dim", None) or src.hidden_size // n_h
    cfg = LlamaConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=n_h, num_key_value_heads=n_kv,
        head_dim=d_h, hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps, rope_parameters=dict(src.rope_parameters),
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    cfg.architectures = list(src.architectures or [ARCHITECTURE])
    cfg.dtype = getattr(src, "dtype", None)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            q, k, v = t.split([n_h * d_h, n_kv * d_h, n_kv * d_h])
            base = name[: -len("qkv_proj.weight")]
            state.update({f"{base}q_proj.weight": q, f"{base}k_proj.weight": k, f"{base}v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2)
            base = name[: -len("gate_up_proj.weight")]
            state.update({f"{base}gate_proj.weight": gate, f"{base}up_proj.weight": up})
        else:
            state[name] = t
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    llama.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        llama.tie_weights()
    missing = [n for n, p in llama.named_parameters() if p.is_meta]
    if missing:   # (a tied model's only non-strict key is lm_head, which tie_weights sets)
        raise ConversionError(f"Phi-3 source: no weight for {', '.join(missing[:5])}")
    if getattr(model, "generation_config", None) is not None:
        llama.generation_config = model.generation_config
    return llama.eval()
