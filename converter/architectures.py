"""Which source architectures care-convert takes, and what config.json alone refuses: torch-free, so that
care-convert answers an unsupported or already converted source before torch and transformers are imported
(converter/source_checks.py), and converter/load.py checks the same tables once the config is loaded.
"""
from __future__ import annotations

from .errors import ConversionError

PHI3 = "Phi3ForCausalLM"        # converter/phi3.py
GRANITE = "GraniteForCausalLM"  # converter/granite.py
# architecture -> attention family (Qwen3-MoE has Qwen3's attention; its sparse MLP is copied unchanged)
# (Mistral without a sliding window is Llama's architecture under another name: same tensors and forward;
# Qwen2 is Llama's with q/k/v biases, which the Llama path converts: converter/assemble.py; Phi-3/Phi-4 is
# Llama's with fused qkv and gate_up projections, and Granite Llama's with multipliers that fold into its
# weights: both re-expressed as a Llama at load, converter/phi3.py and converter/granite.py;
# Mixtral is Llama's attention with a sparse MLP that computes Qwen3-MoE's with normalized top-k weights)
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
             PHI3: "llama", GRANITE: "llama", "MixtralForCausalLM": "llama",
             "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "phi3": PHI3, "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# architectures whose `sliding_window` (when shorter than the context) is applied on every layer
SLIDING_WINDOW_ARCHS = ("MistralForCausalLM", "MixtralForCausalLM", PHI3)
# rope types whose inverse frequencies are static (so the decoupled rope key can keep them exactly); yarn's
# attention factor (its cos/sin multiplier) goes into the converted model's softmax scale (source_rope.py)
STATIC_ROPE_TYPES = {"default", "llama3", "linear", "yarn"}


def attention_family(arch_name: str, where: str) -> str:
    """SUPPORTED[arch_name], or the refusal of an architecture care-convert does not take (of a stored config.json
    here, of a loaded config in converter/load.py)."""
    if arch_name not in SUPPORTED:
        raise ConversionError(f"{where}: unsupported architecture {arch_name!r}; care-convert supports "
                              f"{', '.join(SUPPORTED)}")
    return SUPPORTED[arch_name]


def check_stored_config(raw: dict, where: str) -> None:
    """Refuse a config.json (as stored) of a care-convert output or of an architecture not in SUPPORTED."""
    if raw.get("model_type") == "care_mla":
        raise ConversionError(f"{where}: already a care-convert output (model_type care_mla); convert its source "
                              f"instead (care_report.json's \"source\" names it)")
    archs = raw.get("architectures") or []
    attention_family(archs[0] if archs else f"model_type={raw.get('model_type')!r}", where)
    # (a zero or negative count divided by zero, or shaped nothing, in transformers or the rope map: tracebacks)
    from .cache_plan import stored_count

    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim"):
        v = raw.get(key)
        if v is not None and stored_count(v) is None:
            raise ConversionError(f"{where}: config.json's {key} must be a positive integer (got {v!r})")
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ConversionError(f"{where}: config.json's num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
