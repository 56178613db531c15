"""FP8 copies of tiny transformers folders, written as Qwen3's -FP8 releases store them (quantization_config
quant_method "fp8" with weight_block_size; every linear `*_proj.weight`, the experts' included, as
float8_e4m3fn codes with one fp32 scale per block in `*_proj.weight_scale_inv`), and the plain folder of the
weights such a copy encodes, dequantized here by the format's definition (code x its block's scale): the
reference a conversion of the fp8 copy is checked against."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

FP8_MAX = 448.0   # largest finite float8_e4m3fn


def write_fp8(src: Path, out: Path, block: tuple[int, int] = (128, 128), drop_scale: str | None = None) -> Path:
    """`src` with its linear weights quantized to fp8 in blocks of `block` (edge blocks partial).
    `drop_scale`: a weight whose scale tensor is left out (a broken file)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if not name.endswith("_proj.weight") or w.ndim != 2:
            tensors[name] = w
            continue
        codes, scale = _quantize(w.float(), block)
        tensors[name] = codes
        if name != drop_scale:
            tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    nb0, nb1 = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(nb0 * block[0], nb1 * block[1])
    padded[:rows, :cols] = w
    blocks = padded.view(nb0, block[0], nb1, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nb0 * block[0], nb1 * block[1])
    return codes[:rows, :cols].contiguous(), scale


def write_dequantized(fp8: Path, out: Path) -> Path:
    """The plain (unquantized, fp32) folder of the weights the fp8 folder `fp8` encodes."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in fp8.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((fp8 / "config.json").read_text())
    b0, b1 = cfg.pop("quantization_config")["weight_block_size"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    stored = load_file(str(fp8 / "model.safetensors"))
    plain = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = _dequantize_by_blocks(t, stored[name + "_scale_inv"], b0, b1)
        plain[name] = t.float()
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _dequantize_by_blocks(codes: torch.Tensor, scale: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Block by block: code x that block's scale (the format's definition, written as a loop over blocks)."""
    out = codes.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] *= scale[i, j]
    return out
