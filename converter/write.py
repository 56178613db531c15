"""Write the converted checkpoint atomically.

Everything goes to a hidden temporary folder beside OUT and is renamed to OUT only when complete, so
an error or Ctrl-C never leaves a partial OUT behind (the temporary folder is removed too).
Weights are streamed out in shards as the pipeline assembles them (`ShardWriter`), in the layout
transformers and vLLM load: `model.safetensors`, or `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cli_checks import prepare_out
from .errors import ConversionError
from .file_modes import modes_from_umask
from .interrupts import interrupts_held
from .options import parse_shard_size


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temp folder; on success replace OUT by it, on any exception delete it."""
    prepare_out(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:   # (what prepare_out cannot see: a full or read-only filesystem that access() allows)
        raise ConversionError(f"cannot write in the output's folder {out.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise ConversionError(f"output {out} appeared during conversion")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an existing `out` (renames, same filesystem).

    A replacement is two renames, `out` aside and `tmp` in, and between them neither is at `out`. Ctrl-C, SIGTERM
    and SIGHUP are held across them (interrupts_held): one landing between them left the old folder hidden at
    .OUT.old-PID and the new one at `tmp`, which every caller deletes on an interruption. For care-heal's
    checkpoint that lost both checkpoints: OUT.partial/ without a checkpoint is deleted, with the hidden one in
    it. A second rename that fails puts the old folder back. A signal held past the move (a single rename when
    there is no `out`) is raised with `swapped_in` = `out` set on it: the tool's last line then says OUT was
    written, as it was."""
    modes_from_umask(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    swapped = False
    try:
        with interrupts_held():
            if old is not None:
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                if old is not None:
                    os.rename(old, out)
                raise
            swapped = True
    except KeyboardInterrupt as e:   # (Ctrl-C, SIGTERM, SIGHUP: held until here)
        if swapped:
            e.swapped_in = out
        raise
    finally:
        if swapped and old is not None:
            shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Write tensors as they are produced, in shards of at most `max_shard_size` bytes (a tensor larger
    than that gets a shard of its own), each written and released as soon as it is full.

    Why not huggingface_hub's save_torch_state_dict: it needs the whole state dict at once, i.e. every
    converted layer in memory until the end: ~2.4 GB of new attention tensors for Llama-3-8B shapes,
    ~20 GB for 70B, and with `--dtype float32` from a bf16 source also an fp32 copy of every MLP weight
    (21.5 GiB for 8B). Streaming bounds the converter's output memory by one shard. The sharding
    rule, names and index file are those of huggingface_hub's (tensors in the order added); safetensors
    writes each shard.
    """

    def __init__(self, folder: Path, max_shard_size: int | str = "2GB"):
        self.folder = Path(folder)
        self.max_bytes = parse_shard_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []     # tensor names of each written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self._part(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _part(self, i: int) -> Path:
        return self.folder / f".shard-{i:05d}.safetensors"

    def close(self) -> list[str]:
        """Write what is left, give the shards their final names (and the index); returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.rename(self._part(0), self.folder / "model.safetensors")
            return ["model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.rename(self._part(i), self.folder / name)
        weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
        save_json({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                  self.folder / "model.safetensors.index.json")
        return names


def save_model_code(folder: Path) -> None:
    """Copy model_defs' config and modeling files beside the weights, the ones config.json's `auto_map`
    names: transformers users then load the checkpoint with `trust_remote_code=True` alone (a folder
    pushed to the Hub runs for people who do not install care-vllm)."""
    import model_defs
    from model_defs.configuration_care import REMOTE_CODE_FILES

    code_dir = Path(model_defs.__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(code_dir / name, folder / name)


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
