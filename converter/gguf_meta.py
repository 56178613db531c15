"""What transformers' GGUF reader leaves out of a source that the conversion needs: the rope scaling, the
head dimension, a MoE's expert width, a sliding window, Mixtral's experts, partial rotary and Phi-3's longrope
(all four refused), and the licence.

Why: llama.cpp's converter does not store Llama-3.1/3.2/3.3's `rope_type: llama3` as metadata but as a
tensor, `rope_freqs.weight`, one divisor per rotary frequency; transformers (5.19) skips that tensor
silently and builds the model with plain rope, so every such GGUF would be calibrated, converted and
compared with the wrong frequencies (on a tiny Llama-3 GGUF the logits moved by up to 15). Rope scaling
stored as metadata (`<arch>.rope.scaling.type`, e.g. linear or yarn) is not read for Llama/Qwen3 either.
Here the divisors are turned back into transformers' llama3 `rope_parameters`, checked to reproduce
them, and a metadata scaling is mapped when it is a static one the converter supports (linear, yarn) and
refused otherwise. And transformers does not read a Qwen3 GGUF's head dimension
(`<arch>.attention.key_length`, which llama.cpp writes) but takes Qwen3Config's default 128: any other
head_dim would fail to load or load wrongly shaped. Nor a Qwen3-MoE GGUF's expert width
(`<arch>.expert_feed_forward_length`): the config keeps Qwen3MoeConfig's default moe_intermediate_size 768
(right for Qwen3-30B-A3B by coincidence; Qwen3-235B-A22B's is 1536) while the experts load with the file's
shapes, so the model runs but its saved config does not describe its tensors. Nor Phi-3's partial rotary
(`<arch>.rope.dimension_count` below the head dimension: Phi-4-mini) or longrope (the `rope_factors_long/short`
tensors and `rope.scaling.attn_factor`: Phi-3.5, Phi-4-mini): such a GGUF loaded with full, plain rope and converted
without an error (a tiny Phi-3's logits off by up to 18), where the same model's folder is refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .cache_plan import head_dim_of
from .errors import ConversionError

ROPE_FREQS = "rope_freqs.weight"
LONGROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")   # llama.cpp's phi3 longrope
# Llama 3.x's values: what the divisors are fitted against when they do not determine the bands themselves
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# llama.cpp's yarn keys (after `<arch>.rope.scaling.`) -> transformers' yarn rope_parameters
YARN_KEYS = {"factor": "factor", "original_context_length": "original_max_position_embeddings",
             "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


@dataclass
class GgufMeta:
    license: str | None
    rope_factors: np.ndarray | None   # llama.cpp's rope_freqs.weight, when present
    rope_scaling: dict                # <arch>.rope.scaling.* metadata, without the prefix
    key_length: int | None = None     # <arch>.attention.key_length / value_length: the head dimension
    value_length: int | None = None
    expert_ff_length: int | None = None   # <arch>.expert_feed_forward_length: a MoE's moe_intermediate_size
    sliding_window: int | None = None     # <arch>.attention.sliding_window (llama.cpp's phi3 writes Phi-3-4k's)
    expert_count: int | None = None       # <arch>.expert_count (llama.cpp stores Mixtral as "llama" with experts)
    arch: str = ""                        # general.architecture
    rope_dims: int | None = None          # <arch>.rope.dimension_count: the rotated dimensions of a head
    longrope_tensors: tuple = ()          # which of LONGROPE_FACTORS the file holds


def read(path) -> GgufMeta:
    """One parse of the GGUF for what transformers does not read."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields
    entry = fields.get("general.license")
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else ""
    prefix = f"{arch}.rope.scaling."
    scaling = {k[len(prefix):]: fields[k].contents() for k in fields if k.startswith(prefix)}
    factors = next((np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors
                    if t.name == ROPE_FREQS), None)
    longrope = tuple(t.name for t in reader.tensors if t.name in LONGROPE_FACTORS)
    rope_dims = fields.get(f"{arch}.rope.dimension_count")
    lengths = [int(fields[k].contents()) if k in fields else None
               for k in (f"{arch}.attention.key_length", f"{arch}.attention.value_length",
                         f"{arch}.expert_feed_forward_length", f"{arch}.attention.sliding_window",
                         f"{arch}.expert_count")]
    return GgufMeta(str(entry.contents()) if entry is not None else None, factors, scaling, *lengths, arch=arch,
                    rope_dims=int(rope_dims.contents()) if rope_dims is not None else None, longrope_tensors=longrope)


def apply(config, meta: GgufMeta, where: str) -> None:
    """Complete transformers' config of a GGUF source with its head dimension, expert width and rope
    scaling."""
    if meta.key_length is not None:
        if meta.value_length not in (None, meta.key_length):
            raise ConversionError(f"{where}: key and value head dimensions differ ({meta.key_length} vs "
                                  f"{meta.value_length}); care-convert needs one head_dim")
        config.head_dim = meta.key_length
    head_dim = head_dim_of(config)
    if meta.rope_dims is not None and meta.rope_dims != head_dim:   # (transformers' GGUF config drops the key)
        raise ConversionError(f"{where}: partial rotary embeddings are not supported (rope.dimension_count="
                              f"{meta.rope_dims} of head_dim {head_dim}); care-convert needs rope on the whole head")
    if meta.expert_ff_length is not None and hasattr(config, "moe_intermediate_size"):
        config.moe_intermediate_size = meta.expert_ff_length
    if meta.arch == "llama" and meta.expert_count:   # transformers reads it as a dense Llama
        raise ConversionError(f"{where}: a Mixtral GGUF (llama with {meta.expert_count} experts) is not supported; "
                              f"convert from the model's safetensors folder")
    # transformers' GGUF config does not read the window, so the model would load (and convert) without it
    if meta.sliding_window and meta.sliding_window < config.max_position_embeddings:
        raise ConversionError(f"{where}: sliding-window attention is not supported (attention.sliding_window="
                              f"{meta.sliding_window}, context length {config.max_position_embeddings})")
    apply_rope(config, meta, where)


def apply_rope(config, meta: GgufMeta, where: str) -> None:
    """Set `config.rope_parameters` to what the GGUF's rope scaling is (unchanged when it has none)."""
    rope = dict(config.rope_parameters)
    kind = str(meta.rope_scaling.get("type", "none")).lower()
    if meta.longrope_tensors or (kind == "none" and float(meta.rope_scaling.get("attn_factor", 1.0)) != 1.0):
        what = " and ".join(meta.longrope_tensors) or f"rope.scaling.attn_factor={meta.rope_scaling['attn_factor']}"
        raise ConversionError(f"{where}: rope scaling 'longrope' ({what}, GGUF) is not supported; care-convert "
                              f"needs a static rope (default, llama3, linear, yarn)")
    if kind not in ("none", "linear", "yarn"):
        raise ConversionError(f"{where}: rope scaling {kind!r} (GGUF metadata) is not supported; care-convert "
                              f"needs a static rope (default, llama3, linear, yarn)")
    if kind == "linear" and float(meta.rope_scaling.get("factor", 1.0)) != 1.0:
        rope.update(rope_type="linear", factor=float(meta.rope_scaling["factor"]))
    if kind == "yarn":
        rope = _yarn_parameters(rope, meta.rope_scaling, where)
    if meta.rope_factors is not None and not np.all(meta.rope_factors == 1.0):
        if kind == "linear" or config.model_type != "llama":
            raise ConversionError(f"{where}: {ROPE_FREQS} (per-frequency rope factors) is only understood for "
                                  f"Llama with no other rope scaling")
        rope = _llama3_parameters(config, rope, meta.rope_factors, where)
    config.rope_parameters = rope


def _yarn_parameters(rope: dict, scaling: dict, where: str) -> dict:
    """transformers' yarn rope_parameters from llama.cpp's `rope.scaling.*` keys (what its converter writes for
    a transformers config with rope_type yarn). Both compute the same frequencies (ramp between beta_fast
    and beta_slow with floored/ceiled bounds) and, unless told otherwise, the same attention factor
    0.1 ln(factor) + 1. llama.cpp's own attention-factor and extrapolation knobs have no one-to-one
    transformers meaning (its attn_factor multiplies that default, transformers' attention_factor replaces
    it), so a file that sets them is refused rather than guessed."""
    unknown = sorted(set(scaling) - set(YARN_KEYS) - {"type", "finetuned"})
    if unknown:
        raise ConversionError(f"{where}: rope scaling 'yarn' with {', '.join(unknown)} (GGUF metadata) is not "
                              f"understood; convert from the transformers checkpoint instead")
    missing = [k for k in ("factor", "original_context_length") if k not in scaling]
    if missing:
        raise ConversionError(f"{where}: rope scaling 'yarn' without {' or '.join(missing)} (GGUF metadata)")
    out = {"rope_type": "yarn", "rope_theta": rope["rope_theta"]}
    for key, name in YARN_KEYS.items():
        if key in scaling:
            value = scaling[key]
            out[name] = int(value) if name == "original_max_position_embeddings" else float(value)
    return out


def _llama3_parameters(config, rope: dict, factors: np.ndarray, where: str) -> dict:
    """The llama3 rope_parameters whose inverse frequencies (computed by transformers itself) equal the
    plain ones divided by `factors`. `factor` is the largest divisor; the band edges come from the
    interpolated divisors (smooth = (old_ctx / wavelen - low) / (high - low) is linear in 1 / wavelen;
    with Llama 3's low_freq_factor 1 that fixes high_freq_factor and old_ctx), else Llama 3's values."""
    base = _plain_inv_freq(config, rope["rope_theta"])
    if factors.shape != tuple(base.shape):
        raise ConversionError(f"{where}: {ROPE_FREQS} has {factors.size} entries, the rope has {base.numel()} "
                              f"frequencies")
    target = base / torch.from_numpy(factors)
    factor = float(factors.max())
    candidates = []
    inner = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    if inner.sum() >= 2:
        smooth = (1 / factors[inner].astype(np.float64) - 1 / factor) / (1 - 1 / factor)
        x = base.double().numpy()[inner] / (2 * math.pi)   # 1 / wavelength
        a, b = np.polyfit(x, smooth, 1)
        if b < 0:
            candidates.append({"low_freq_factor": 1.0, "high_freq_factor": float(round(1 - 1 / b, 3)),
                               "original_max_position_embeddings": int(round(-a / b))})
    candidates.append(LLAMA3_DEFAULTS)
    for bands in candidates:
        trial = {"rope_type": "llama3", "rope_theta": rope["rope_theta"], "factor": factor, **bands}
        if torch.allclose(_llama3_inv_freq(config, trial), target, rtol=1e-5, atol=0):
            return trial
    raise ConversionError(f"{where}: {ROPE_FREQS} (llama.cpp's per-frequency rope factors) matches no llama3 "
                          f"rope scaling; convert from the transformers checkpoint instead")


def _plain_inv_freq(config, theta: float) -> torch.Tensor:
    """Unscaled inverse frequencies, as transformers computes them (fp32)."""
    dim = head_dim_of(config)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(config, rope: dict) -> torch.Tensor:
    """transformers' own llama3 inverse frequencies for `config` with `rope` as its rope_parameters."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    trial = copy.deepcopy(config)
    trial.rope_parameters = rope
    return ROPE_INIT_FUNCTIONS["llama3"](trial, "cpu")[0].float()
