"""The converted cache's shape from the source's attention shape and the options: the per-token budget over all
layers and the rope key width, with the refusals of a budget above parity, a rope key wider than the original
keys, and rope keys that leave the latents no room.

Torch-free, so that care-convert can answer these from the source's config.json (or GGUF metadata) before torch
and transformers are imported and the model is loaded (converter/source_checks.py). The pipeline applies the
same checks to the loaded model's config (converter/pipeline.py cache_shape), which also covers sources whose
shape cannot be read up front (a repo id not in the local Hugging Face cache).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError
from .options import Options

# model types whose config class, given no head_dim, derives it as hidden_size / num_attention_heads (Qwen3's
# defaults to 128 instead; tests/test_source_checks.py compares each with transformers)
DERIVED_HEAD_DIM = ("llama", "mistral", "mixtral", "qwen2", "phi3", "granite", "qwen3_moe")


def stored_count(value) -> int | None:
    """A count (layers, heads, widths) as config.json stores it, or None where it is absent, null or not a positive
    int (then the config class's default, or nothing, stands for it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def head_dim_of(cfg) -> int:
    """A transformers config's head dimension (configs without `head_dim` imply hidden / heads)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@dataclass(frozen=True)
class AttentionShape:
    """What the cache budget depends on: layers, KV heads and their width."""
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def parity(self) -> int:
        """The original's cache values per token per layer (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def of_config(cls, cfg) -> AttentionShape:
        """Of a transformers config (configs without `head_dim` imply hidden / heads)."""
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim_of(cfg))

    @classmethod
    def of_json(cls, raw: dict) -> AttentionShape | None:
        """Of a config.json as stored, or None where it leaves a field to the config class's default (which
        differ between architectures: then only the loaded config says)."""
        def number(key: str) -> int | None:
            return stored_count(raw.get(key))

        layers, kv_heads, d_h = number("num_hidden_layers"), number("num_key_value_heads"), number("head_dim")
        heads = number("num_attention_heads")
        if (d_h is None and raw.get("head_dim") is None and raw.get("model_type") in DERIVED_HEAD_DIM and heads
                and number("hidden_size")):
            d_h = raw["hidden_size"] // heads
        if layers is None or kv_heads is None or d_h is None:
            return None
        return cls(layers, kv_heads, d_h)

    @classmethod
    def of_folder(cls, folder: str | Path) -> AttentionShape:
        """Of a GQA checkpoint folder: of_json where its config.json stores every field, else of_config of
        transformers' config class (which fills the defaults it leaves out; imported only then)."""
        shape = cls.of_json(json.loads((Path(folder) / "config.json").read_text()))
        if shape is None:
            from transformers import AutoConfig

            shape = cls.of_config(AutoConfig.from_pretrained(folder))
        return shape


def cache_budget(opts: Options, num_layers: int, original_per_layer: int) -> int:
    """Total per-token cache values over all layers; refuses anything above parity."""
    parity = num_layers * original_per_layer
    if opts.kv_width is not None:
        if opts.kv_width > original_per_layer:
            raise ConversionError(f"--kv-width {opts.kv_width} is above parity: the original caches "
                                  f"{original_per_layer} values per token per layer")
        if opts.kv_width <= 0:
            raise ConversionError(f"--kv-width must be positive (got {opts.kv_width})")
        return opts.kv_width * num_layers
    ratio = 1.0 if opts.kv_ratio is None else opts.kv_ratio
    return min(parity, math.floor(ratio * parity + 1e-9))


def default_rope_dim(head_dim: int, per_layer_budget: int) -> int:
    """min(64, head_dim), shrunk (even) to at most half the per-layer budget so latents keep room."""
    d_r = min(64, head_dim)
    if per_layer_budget - d_r < d_r:
        d_r = max(2, (per_layer_budget // 2) // 2 * 2)
    return d_r


def check_rope_dim(rope_dim: int, num_kv_heads: int, head_dim: int) -> None:
    if rope_dim <= 0 or rope_dim % 2:
        raise ConversionError(f"--rope-dim must be a positive even number (got {rope_dim})")
    if rope_dim > num_kv_heads * head_dim:
        raise ConversionError(f"--rope-dim {rope_dim} exceeds the original key width "
                              f"{num_kv_heads} x {head_dim} = {num_kv_heads * head_dim}")


def check_latent_room(cache_budget: int, num_layers: int, rope_dim: int, multiple: int = 1) -> None:
    """Refuse a budget whose rope keys leave less than one latent value (one unit of `multiple` values) per
    layer, and a rope key that is not a whole number of units (the latent projections' widths would not be)."""
    latent = cache_budget - num_layers * rope_dim
    if latent < num_layers * multiple:
        unit = "" if multiple == 1 else f" (--rank-multiple {multiple}: at least {multiple} per layer)"
        raise ConversionError(f"KV budget of {cache_budget} values/token leaves {latent} for the latents of "
                              f"{num_layers} layers after the rope keys ({rope_dim} each){unit}; raise the budget "
                              f"or lower --rope-dim")
    if rope_dim % multiple:
        raise ConversionError(f"--rank-multiple {multiple} needs a rope key width that is a multiple of it (got "
                              f"{rope_dim}): set --rope-dim, or a multiple that divides {rope_dim}")


def check_joint_room(budget: int, num_layers: int, rope_dim: int, shape: AttentionShape, hidden_size: int) -> None:
    """Refuse a joint latent (--latent joint) wider than it can be. Where the latent is a map of the layer input
    alone (every source but Qwen3's, whose latent also reads the normed keys), its rank is at most the hidden size D
    (and the outputs' width 2 g d_h - d_r), so a layer caches at most D + d_r values: below parity wherever the
    source has as many KV heads as query heads (MHA: Phi-3-mini), where such a budget was refused only after the
    calibration and factorization, as 'budget ... exceeds the lossless width'."""
    most = min(hidden_size, shape.parity - rope_dim)
    if budget - num_layers * rope_dim > num_layers * most:
        width = most + rope_dim
        raise ConversionError(f"a joint latent (--latent joint) of this model holds at most {most} values per layer "
                              f"(its hidden size {hidden_size}: the latent is a map of the layer input), {width} with "
                              f"the rope key, and the budget asks {budget / num_layers:g} per layer; use --kv-width "
                              f"{width} (--kv-ratio {math.floor(width / shape.parity * 1000) / 1000:g}) or less, or "
                              f"--latent separate")


def cache_shape(opts: Options, shape: AttentionShape) -> tuple[int, int]:
    """(cache values per token over all layers, rope key width) of converting a model of `shape` with `opts`,
    or the refusal of a budget or rope key it cannot have."""
    budget = cache_budget(opts, shape.num_layers, shape.parity)
    d_r = opts.rope_dim if opts.rope_dim is not None else default_rope_dim(shape.head_dim, budget // shape.num_layers)
    check_rope_dim(d_r, shape.num_kv_heads, shape.head_dim)
    check_latent_room(budget, shape.num_layers, d_r, opts.rank_multiple)
    return budget, d_r
