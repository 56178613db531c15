"""What a source's rope scaling means for the converted config, beyond its frequencies (which the rope map
takes from the source's own inv_freq).

Why a module: a converted checkpoint has no `rope_parameters` (docs/FORMAT.md: vLLM and transformers would
interpret them), so two things the scaling implies for the original must be written out as plain fields:
the logit scale yarn's attention factor adds, and the context length vLLM derives from a linear scaling.
And since a conversion fixes the rope (the plugin refuses `vllm serve --hf-overrides` of it), the rope
overrides a user would give vLLM for the original are given to care-convert instead (`--hf-overrides`):
`apply_overrides` sets them on the source config before the model is built, as vLLM would.
"""
from __future__ import annotations

import json
import math

from .errors import ConversionError

# what `--hf-overrides` may change on a source config: how its positions are encoded, nothing that shapes a
# tensor (the same JSON that `vllm serve SRC --hf-overrides` takes for these keys)
OVERRIDE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "max_position_embeddings")

# rope types for which vLLM 0.32 multiplies max_position_embeddings by `factor` to get the default
# max_model_len (vllm/config/model.py, _get_and_verify_max_len: every type that has a factor except
# llama3, yarn and longrope variants, whose max_position_embeddings is already the extended length).
# Of the types care-convert accepts (architectures.STATIC_ROPE_TYPES), that is linear.
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


def parse_overrides(text: str) -> dict:
    """`--hf-overrides` JSON -> dict, with only OVERRIDE_KEYS (and dict-valued rope_scaling/rope_parameters)."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"--hf-overrides is not valid JSON ({e.msg})") from None
    check_overrides(overrides)
    return overrides


def check_overrides(overrides) -> None:
    if not isinstance(overrides, dict):
        raise ConversionError("--hf-overrides must be a JSON object, e.g. '{\"rope_scaling\": {\"rope_type\": "
                              "\"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}}'")
    other = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if other:
        raise ConversionError(f"--hf-overrides can set {', '.join(OVERRIDE_KEYS)} (the rope and the context "
                              f"length); not {', '.join(other)}")
    for key in ("rope_scaling", "rope_parameters"):
        if key in overrides and not isinstance(overrides[key], dict):
            raise ConversionError(f"--hf-overrides: {key} must be a JSON object")
    _check_values(overrides)
    for key in ("rope_scaling", "rope_parameters"):
        _check_values(overrides.get(key) or {}, f"{key}.")


# values a rope field must have: a positive number, a positive integer, or any finite number. Why checked here:
# transformers takes a string or a negative base as given, so a typo surfaced as a traceback (int("x")), or
# after the calibration as a failed eigendecomposition of the rope map (rope_theta -1).
POSITIVE = ("rope_theta", "factor")
POSITIVE_INT = ("max_position_embeddings", "original_max_position_embeddings")
FINITE = ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
          "mscale_all_dim")


def _check_values(values: dict, prefix: str = "") -> None:
    for key, value in values.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if key in ("rope_type", "type") and not isinstance(value, str):
            raise ConversionError(f"--hf-overrides: {prefix}{key} must be a string, got {value!r}")
        if key in POSITIVE and not (number and value > 0):
            raise ConversionError(f"--hf-overrides: {prefix}{key} must be a positive number, got {value!r}")
        if key in POSITIVE_INT and not (number and value > 0 and value == int(value)):
            raise ConversionError(f"--hf-overrides: {prefix}{key} must be a positive integer, got {value!r}")
        if key in FINITE and not number:
            raise ConversionError(f"--hf-overrides: {prefix}{key} must be a number, got {value!r}")


def apply_overrides(cfg, overrides: dict | None) -> None:
    """Set `--hf-overrides` on a source config before its model is built. As vLLM's --hf-overrides: a dict
    value is merged into the config's (so rope_scaling {rope_type, factor, ...} keeps the source's
    rope_theta), a plain value replaces it; legacy `type` is read as `rope_type`."""
    if not overrides:
        return
    check_overrides(overrides)
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    for key in ("rope_parameters", "rope_scaling"):
        given = dict(overrides.get(key) or {})
        if "type" in given:
            given.setdefault("rope_type", given.pop("type"))
        rope.update(given)
    if "rope_theta" in overrides:
        rope["rope_theta"] = float(overrides["rope_theta"])
    cfg.rope_parameters = rope
    if "max_position_embeddings" in overrides:
        cfg.max_position_embeddings = int(overrides["max_position_embeddings"])
