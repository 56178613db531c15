"""Write the converted checkpoint atomically.

Everything goes to a hidden temporary folder beside OUT and is renamed to OUT only when complete, so
an error or Ctrl-C never leaves a partial OUT behind (the temporary folder is removed too).
Weights are written with huggingface_hub's sharding (like transformers does for big models).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ConversionError


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing OUT unless --overwrite (checked before any work is done)."""
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise ConversionError(f"parent folder of the output does not exist: {out.parent}")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temp folder; on success replace OUT by it, on any exception delete it."""
    prepare_out(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise ConversionError(f"output {out} appeared during conversion")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an existing `out` (renames, same filesystem)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def save_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: str = "2GB") -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
