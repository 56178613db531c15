"""Dequantize a `.gguf` source once into a transformers folder, and read that folder afterwards.

Why: transformers reads a GGUF file's metadata again for the config, the model and the tokenizer (each a
full parse of the vocabulary strings) and dequantizes every tensor at every load: ~25 s for the embedded
SmolLM2-135M on 2 CPU cores, paid by each of `care-convert`, `care-eval` and `care-heal --teacher`. The
folder (fp32 safetensors, config, tokenizer, generation config, and the GGUF's licence in
`care_gguf.json`) loads in about a second, memory-mapped, and holds exactly the tensors, config and
tokenizer the direct load gives (`load_direct`: transformers, plus the head_dim and rope scaling it does not read,
converter/gguf_meta.py): it is written from that load with `save_pretrained`.

Where: `$CARE_VLLM_CACHE/gguf/<file stem>-<key>/` (default `$XDG_CACHE_HOME/care-vllm`, else
`~/.cache/care-vllm`). The key covers the GGUF's resolved path, size and modification time and the
transformers and gguf versions, so an edited file or another dequantizer gets a new folder.
`CARE_VLLM_CACHE=off` turns caching off (every load reads the GGUF). The folder is written to a temporary
name beside it and renamed when complete, so an interrupted build leaves nothing that would be read.
When the cache cannot be written (read-only, or less free space than the fp32 weights plus 1 GiB) the
model is loaded from the GGUF as before, with a note on stderr. Building an entry removes those of earlier
versions of the same file (its marker records the size and mtime it was built from); nothing else is
evicted.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import ConversionError
from .file_modes import modes_from_umask

MARKER = "care_gguf.json"   # written last: a folder without it is incomplete and is rebuilt
FORMAT = 2                  # bump when what the folder holds changes
SPARE_BYTES = 1 << 30       # free space to leave beside the cached weights

if TYPE_CHECKING:   # (torch is imported where a model is loaded: where the cache folder is only looked up, not)
    import torch


def cache_root() -> Path | None:
    """The cache's root folder, or None when `CARE_VLLM_CACHE=off`."""
    env = os.environ.get("CARE_VLLM_CACHE", "").strip()
    if env.lower() in ("off", "0", "false", "none"):
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "care-vllm"


def folder_for(gguf: Path, root: Path) -> Path:
    """Where the dequantized folder of `gguf` lives under `root` (whether or not it exists yet)."""
    import gguf as gguf_pkg   # (numpy only: converter/source_checks.py asks this before torch is imported)

    gguf = gguf.resolve()
    st = gguf.stat()
    ident = json.dumps([FORMAT, str(gguf), st.st_size, st.st_mtime_ns, importlib.metadata.version("transformers"),
                        getattr(gguf_pkg, "__version__", "?")])
    return root / "gguf" / f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


class Direct(NamedTuple):
    """A GGUF read directly: the model dequantized to fp32 on the CPU, with what transformers leaves out."""
    config: object
    model: torch.nn.Module
    tokenizer: object
    license: str | None


def load_direct(gguf: Path, check=None) -> Direct:
    """Read the GGUF file with transformers, plus the head_dim and rope scaling it does not read
    (converter/gguf_meta.py).
    A parameter the file does not provide is refused (transformers would initialize it at random).
    `check(config)`, when given, runs before the model is dequantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from . import gguf_meta

    kw = dict(gguf_file=gguf.name)
    try:
        cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
        meta = gguf_meta.read(gguf)
    except Exception as e:
        raise ConversionError(f"{gguf}: cannot read GGUF ({e})") from None
    gguf_meta.apply(cfg, meta, str(gguf))
    if check is not None:
        check(cfg)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            gguf.parent, config=cfg, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
            output_loading_info=True, **kw)
    except Exception as e:   # a tensor of the wrong shape, a truncated file
        raise ConversionError(f"{gguf}: cannot load the GGUF's tensors ({e})") from None
    _refuse_incomplete(gguf, info)
    # transformers' GGUF config has no `architectures`; save_pretrained would add this one: both paths agree
    model.config.architectures = model.config.architectures or [type(model).__name__]
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    return Direct(model.config, model.eval(), tok, meta.license)


def _refuse_incomplete(gguf: Path, info: dict) -> None:
    """transformers fills a parameter the GGUF does not provide with random values and only logs it (a
    missing tensor, or one stored under a name it does not map): converting that would silently give a
    random model. Refuse it, naming the parameters."""
    from .checked_load import listed, missing_parameters

    missing = missing_parameters(info)
    if missing:
        raise ConversionError(f"{gguf}: no tensor in the file for {listed(missing)} "
                              f"(a GGUF missing them, or storing them under names transformers does not map)")


def save_tokenizer(tok, folder: Path) -> None:
    """`tok.save_pretrained(folder)`, such that the folder loads back as the same tokenizer.

    Why not save_pretrained alone: a tokenizer read from a GGUF gets a model-specific class (Qwen3's:
    Qwen2Tokenizer), and in transformers 5 such a class, loaded from a folder, rebuilds parts of its
    pipeline from its own defaults instead of tokenizer.json (Qwen2Tokenizer replaces the pre-tokenizer
    regex: a GGUF storing llama-bpe's split `\\p{N}{1,3}` came back splitting digits one by one). When the
    reloaded pipeline differs, the folder names the generic TokenizersBackend, which takes tokenizer.json
    as written."""
    tok.save_pretrained(folder)
    if _reloads_same(tok, folder):
        return
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if not _reloads_same(tok, folder):
        raise ConversionError(f"the tokenizer ({type(tok).__name__}) does not load back from {folder} as saved")


def _reloads_same(tok, folder: Path) -> bool:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    pipeline = getattr(tok, "backend_tokenizer", None)
    if pipeline is None:   # a slow tokenizer: nothing rebuilt from defaults to compare
        return True
    return (getattr(saved, "backend_tokenizer", None) is not None
            and saved.backend_tokenizer.to_str() == pipeline.to_str()
            and saved.special_tokens_map == tok.special_tokens_map and saved.chat_template == tok.chat_template)


def cached_license(folder: Path) -> str | None:
    """The licence recorded when `folder` was built from its GGUF."""
    return json.loads((folder / MARKER).read_text()).get("license")


class Opened(NamedTuple):
    """What `open_gguf` gives: the cached folder to load, or (folder None) the model already loaded."""
    folder: Path | None
    direct: Direct | None   # when the GGUF was read directly


def open_gguf(gguf: Path, check=None) -> Opened:
    """The transformers folder holding `gguf` dequantized (built now on first use), or, when caching is off
    or the folder cannot be written, the model read directly from the GGUF. `check(config)`, when given, runs
    on the GGUF's config before anything is dequantized or written (an unsupported model is refused
    without leaving a cache folder behind)."""
    root = cache_root()
    if root is None:
        return Opened(None, load_direct(gguf, check))
    folder = folder_for(gguf, root)
    if (folder / MARKER).is_file():
        return Opened(folder, None)
    loaded = load_direct(gguf, check)
    model, tok = loaded.model, loaded.tokenizer
    need = 4 * sum(p.numel() for p in model.parameters()) + SPARE_BYTES
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder.parent).free
        if free < need:
            _note(f"not caching the dequantized {gguf.name}: {free / 2**30:.1f} GiB free in {folder.parent}, "
                  f"{need / 2**30:.1f} GiB needed; it is dequantized again at every load")
            return Opened(None, loaded)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as e:
        _note(f"cannot write the GGUF cache in {root} ({e.strerror or e}); {gguf.name} is dequantized again "
              f"at every load (CARE_VLLM_CACHE=DIR puts the cache elsewhere)")
        return Opened(None, loaded)
    try:
        model.save_pretrained(tmp)
        save_tokenizer(tok, tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        st = gguf.stat()
        (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf.resolve()), "size": st.st_size,
                                              "mtime_ns": st.st_mtime_ns, "license": loaded.license},
                                             indent=2) + "\n")
        if not (folder / MARKER).is_file():   # (else another process finished first: use its folder)
            if folder.exists():   # incomplete (its marker removed by hand): replaced
                shutil.rmtree(folder)
            modes_from_umask(tmp)   # (readable by others as any new folder: a CARE_VLLM_CACHE shared by users)
            os.rename(tmp, folder)
    except (OSError, ConversionError) as e:
        _note(f"cannot write the GGUF cache folder {folder} ({getattr(e, 'strerror', None) or e}); {gguf.name} "
              f"is dequantized again at every load")
        return Opened(None, loaded)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _note(f"dequantized {gguf.name} once into {folder} ({need - SPARE_BYTES:,} bytes); later loads read it "
          f"from there (CARE_VLLM_CACHE=off: do not cache)")
    _remove_superseded(folder, gguf)
    return Opened(folder, None)


def _remove_superseded(folder: Path, gguf: Path) -> None:
    """Delete the entries built from earlier contents of the same GGUF file (same path, another size or
    modification time): their key can never match again, and each holds the model's fp32 weights. Entries of
    the same contents under other transformers/gguf versions stay (another environment may use them)."""
    st, path = gguf.stat(), str(gguf.resolve())
    for other in folder.parent.iterdir():
        if other == folder or not (other / MARKER).is_file():
            continue
        try:
            marker = json.loads((other / MARKER).read_text())
        except (OSError, ValueError):
            continue
        if marker.get("gguf") == path and "size" in marker and \
                (marker["size"], marker.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
            shutil.rmtree(other, ignore_errors=True)
            _note(f"removed {other}: built from an earlier version of {gguf.name}")


def _note(msg: str) -> None:
    print(f"care-vllm: {msg}", file=sys.stderr)
