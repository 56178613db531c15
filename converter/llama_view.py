"""Build the `LlamaForCausalLM` that a source of another architecture is, on that source's tensors.

Why: some GQA architectures compute exactly a Llama forward with their tensors arranged differently
(Phi-3: fused projections, converter/phi3.py) or with constant multipliers that fold into the weights
(Granite: converter/granite.py). Re-expressed once at load, they go through the converter's one tested
Llama path (calibration, factorization, the rope map, the writer) and serve as CareLlamaForCausalLM.
"""
from __future__ import annotations

import torch

from .errors import ConversionError


def llama_config(src, **changes):
    """A LlamaConfig with `src`'s shapes, norm eps, rope, token ids and dtype (then `changes`); its
    `architectures` stays the source's, which the converted config records as `source_architecture`."""
    from transformers import LlamaConfig

    n_h = src.num_attention_heads
    kw = dict(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers, num_attention_heads=n_h, num_key_value_heads=src.num_key_value_heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // n_h, hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        rope_parameters=dict(src.rope_parameters), tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        attention_bias=bool(getattr(src, "attention_bias", False)), mlp_bias=False, attention_dropout=0.0)
    cfg = LlamaConfig(**{**kw, **changes})
    cfg.architectures = list(src.architectures or [])
    cfg.dtype = getattr(src, "dtype", None)
    return cfg


def build(source_model: torch.nn.Module, cfg, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A LlamaForCausalLM of config `cfg` holding `state` (assigned, not copied; a tied model's lm_head is
    its embedding), in eval mode, with the source's generation config. The rotary buffers are left for
    load._fp32_rotary to compute."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    llama.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        llama.tie_weights()
    missing = [n for n, p in llama.named_parameters() if p.is_meta]
    if missing:   # (a tied model's only non-strict key is lm_head, which tie_weights sets)
        raise ConversionError(f"{', '.join(cfg.architectures) or 'source'}: no weight for {', '.join(missing[:5])}")
    if getattr(source_model, "generation_config", None) is not None:
        llama.generation_config = source_model.generation_config
    return llama.eval()
