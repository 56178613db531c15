"""What a source's rope scaling means for the converted config, beyond its frequencies (which the rope map
takes from the source's own inv_freq).

Why a module: a converted checkpoint has no `rope_parameters` (docs/FORMAT.md: vLLM and transformers would
interpret them), so two things the scaling implies for the original must be written out as plain fields:
the logit scale yarn's attention factor adds, and the context length vLLM derives from a linear scaling.
"""
from __future__ import annotations

import math

from .errors import ConversionError

# rope types for which vLLM 0.32 multiplies max_position_embeddings by `factor` to get the default
# max_model_len (vllm/config/model.py, _get_and_verify_max_len: every type that has a factor except
# llama3, yarn and longrope variants, whose max_position_embeddings is already the extended length).
# Of the types care-convert accepts (load.STATIC_ROPE_TYPES), that is linear.
CONTEXT_SCALING_ROPE_TYPES = ("linear",)


def softmax_scale(rotary_emb, head_dim: int) -> float:
    """The converted attention's logit scale: the original's 1/sqrt(d_h) times the square of the rope's
    attention factor (yarn's mscale; 1 for the other rope types).

    Why the square, on every dim: the source multiplies cos and sin by that factor for queries and keys
    alike, so each of its logits, over all d_h rotated dims, is factor^2 times the unscaled product. The
    converted keys' NoPE part is not rotated, so it would miss the factor; folding it into the scale
    instead keeps the whole logit exact, and the rope key runs with plain cos/sin at yarn's frequencies."""
    factor = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if not (math.isfinite(factor) and factor > 0):
        raise ConversionError(f"the source's rope attention factor must be a positive number (got {factor})")
    return head_dim ** -0.5 * factor ** 2


def served_max_positions(cfg) -> int:
    """max_position_embeddings for the converted config: the context vLLM serves the source with by default.

    Why not the source's value: for a linear rope scaling vLLM serves the source at max_position_embeddings
    x factor, but reads the converted config (no rope scaling) as is, so `vllm serve` would default the
    converted model to a context `factor` times shorter and refuse a `--max-model-len` the original takes."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    positions = int(cfg.max_position_embeddings)
    if rope.get("rope_type") in CONTEXT_SCALING_ROPE_TYPES and rope.get("factor"):
        positions = int(positions * float(rope["factor"]))
    return positions
