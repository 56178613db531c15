"""Is the model named as a converted checkpoint's original the model it was converted from? care-heal's --teacher,
care-eval compare's and care-bench's ORIGINAL must be: care-heal distills the checkpoint towards it, the other two
measure the checkpoint against it. So must care-convert-lora's --source, when given by hand.

Why more than the vocabulary (all these tools checked before): a model family shares one. Llama-3.2-1B, 3B and
Llama-3.1-8B all have 128256 tokens, Qwen3's sizes 151936, so the 3B named as the teacher of a 1B conversion
healed it towards the wrong model, and care-eval and care-bench reported against it, without a word. A converted
config.json records its source's shape (docs/FORMAT.md: the layers, hidden size, query heads and vocabulary are
kept; `original_num_key_value_heads` and `original_head_dim` are the source's KV heads). That is compared with the
original's: from its config.json or GGUF metadata before anything loads (converter/source_checks.py, torch-free),
and from the loaded config afterwards (a repo id not in the local cache is only known then). Shapes cannot tell
a base model from its instruct variant; they do tell every other mix-up within a family. Across families the
attention is compared too (converter/architectures.py SUPPORTED: Llama-like against Qwen3's k_norm'd keys), where
both sides name their architecture: a Qwen3 of a Llama conversion's shape passed as its original was accepted
(care-eval compare reported KL 5.9 against it, exit 0). Mistral against Llama passes: one attention (llama.cpp
stores Mistral as "llama").
"""
from __future__ import annotations

from pathlib import Path

from .architectures import MODEL_TYPES, SUPPORTED
from .cache_plan import AttentionShape, stored_count
from .source_checks import source_config

FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# the fields a converted config.json records under another name (the converted model's own differ)
RECORDED_AS = {"num_key_value_heads": "original_num_key_value_heads", "head_dim": "original_head_dim"}


def recorded_source(converted: dict) -> dict[str, int | None] | None:
    """The source's shape as a converted (care_mla) config.json records it; None for any other checkpoint."""
    if converted.get("model_type") != "care_mla":
        return None
    return {**{field: stored_count(converted.get(RECORDED_AS.get(field, field))) for field in FIELDS},
            "architecture": converted.get("source_architecture")}


def shape_of_json(raw: dict) -> dict[str, int | None]:
    """An original's shape from its config.json as stored (or converter/source_checks.gguf_config's fields):
    None for what it leaves to the config class's defaults (cache_plan.AttentionShape.of_json)."""
    attention = AttentionShape.of_json(raw)
    return {**{field: stored_count(raw.get(field)) for field in FIELDS},
            "architecture": (raw.get("architectures") or [MODEL_TYPES.get(raw.get("model_type"))])[0],
            "num_key_value_heads": attention.num_kv_heads if attention else None,
            "head_dim": attention.head_dim if attention else None}


def shape_of_config(cfg) -> dict[str, int | None]:
    """A loaded original's shape (a transformers config)."""
    attention = AttentionShape.of_config(cfg)
    return {"architecture": (getattr(cfg, "architectures", None) or [None])[0],
            "num_hidden_layers": attention.num_layers, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": attention.num_kv_heads,
            "head_dim": attention.head_dim, "vocab_size": cfg.vocab_size}


def mismatch(converted: dict, original: dict[str, int | None], *, role: str, original_name: str,
             converted_name: str) -> str | None:
    """The message refusing `original` as the original of `converted` (a config.json as a dict), naming every field
    known on both sides that differs; None when none does or `converted` is not a care_mla checkpoint."""
    source = recorded_source(converted)
    if source is None:
        return None
    diffs = [f"{field} {original[field]} where the source's was {source[field]}" for field in FIELDS
             if original.get(field) is not None and source[field] is not None and original[field] != source[field]]
    arch, source_arch = original.get("architecture"), source["architecture"]
    family, source_family = SUPPORTED.get(arch), SUPPORTED.get(source_arch)
    if family and source_family and family != source_family:
        diffs.append(f"architecture {arch} ({family} attention) where the source's was {source_arch} "
                     f"({source_family} attention)")
    if not diffs:
        return None
    return f"{role} {original_name} is not the model {converted_name} was converted from: {'; '.join(diffs)}"


def stored_mismatch(converted: dict, original_spec: str | Path, revision: str | None = None, *, role: str,
                    converted_name: str, original_name: str | None = None) -> str | None:
    """mismatch() with the original's shape read from its files, without loading it (torch-free); None also where
    they cannot be read up front (the loaded config is checked then). Also refuses a care_mla original of a
    checkpoint that is not one (the two swapped). `original_name`: how the user named it (default: `original_spec`)."""
    found = source_config(original_spec, revision)
    if found is None:
        return None
    name = original_name or str(original_spec)
    if found[1].get("model_type") == "care_mla" and converted.get("model_type") != "care_mla":
        return (f"{role} {name} is a converted care_mla checkpoint and {converted_name} is not: the GQA original "
                f"comes first")   # (the two given the other way round; two conversions may be compared)
    return mismatch(converted, shape_of_json(found[1]), role=role, original_name=name, converted_name=converted_name)
