"""Phi-3 / Phi-4 sources (`Phi3ForCausalLM`, e.g. microsoft/phi-4: 40 query / 10 KV heads, head_dim 128).

Why a view rather than a code path: a Phi-3 decoder layer is a Llama layer with two projections fused,
`qkv_proj = [q_proj; k_proj; v_proj]` and `mlp.gate_up_proj = [gate_proj; up_proj]` (rows, in that order;
transformers' Phi3Attention and Phi3MLP split them so), the same RMSNorms, residuals, SiLU MLP, softmax scale
head_dim^-0.5 and NeoX rope. So once loaded, the model is re-expressed as a `LlamaForCausalLM` whose q/k/v and
gate/up weights are row slices (views, no copy) of the fused ones, and everything downstream (calibration,
factorization, the rope map, the writer, serving as CareLlamaForCausalLM) is the Llama path, unchanged.

What Llama cannot express is refused before anything loads: partial rotary (`partial_rotary_factor` < 1,
Phi-4-mini; Llama rotates every dim: `check_config`); a hidden_act other than SiLU as for every source, `longrope`
(Phi-3.5/Phi-4-mini: its factors switch with the sequence length) like any non-static rope, and a sliding
window shorter than the context (Phi-3-mini/medium-4k: 2047) as for Mistral (converter/load.py). Dropouts do
nothing in eval.
"""
from __future__ import annotations

import torch

from . import architectures, llama_view
from .errors import ConversionError

ARCHITECTURE = architectures.PHI3


def check_config(cfg, where: str) -> None:
    """Refuse a Phi-3 config whose forward a Llama layer would not reproduce."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    partial = float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise ConversionError(f"{where}: partial rotary embeddings are not supported "
                              f"(partial_rotary_factor={partial}; only every head dim rotated, as Phi-4's)")


def as_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a `LlamaForCausalLM` on the same storage: the fused q/k/v and gate/up weights are
    split into row views, every other tensor is the source's own (converter/llama_view.py)."""
    cfg = llama_view.llama_config(model.config, attention_bias=False)
    n_h, n_kv, d_h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
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
    return llama_view.build(model, cfg, state)
