"""FP8 sources with block scales, read as the weights they stand for; any other quantized source refused.

What: `quantization_config: {"quant_method": "fp8", "weight_block_size": [b0, b1]}` is how Qwen3's -FP8
releases (and DeepSeek-V3) store their linear weights: float8_e4m3fn tensors `<name>.weight` with one fp32
scale per [b0, b1] block in `<name>.weight_scale_inv` (the weight is fp8 x scale; edge blocks may be partial).
The conversion needs real-valued weights (calibration forward, fp64 factorization), so such a source is
dequantized as it is read, by the converter's own reader (converter/experts.py: the one that streams a
Qwen3-MoE's experts), dense models included. Why not transformers' fp8 loader: it dequantizes only on a
machine without a GPU (with one it keeps fp8 modules whose `.weight` the converter cannot use), and it
rejects partial edge blocks with an error it logs while leaving those weights randomly initialized.
Before this module, a Qwen3-MoE source's streamed tensors were fp8 codes cast without their scales,
silently. The converted checkpoint is unquantized (the source's config dtype, e.g. bf16).

Why refuse the other methods: GPTQ/AWQ/compressed-tensors checkpoints store packed integers or other
layouts under other names; transformers needs extra packages (and often a GPU) to read them, and what
fails then is an error far from the cause.
"""
from __future__ import annotations

import math

import torch

from .errors import ConversionError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)
_STORED_FP8 = ("F8_E4M3",)   # safetensors' dtype name of float8_e4m3fn


def block_size(raw_config: dict, where: str) -> tuple[int, int] | None:
    """The source's fp8 weight block [rows, cols], None when it is not quantized; refuses anything else."""
    q = raw_config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    block = q.get("weight_block_size")
    if method == "fp8" and q.get("fmt", "e4m3") == "e4m3" and isinstance(block, list) and len(block) == 2 \
            and all(isinstance(b, int) and b > 0 for b in block):
        return int(block[0]), int(block[1])
    what = f"quant_method {method!r}" + (f", weight_block_size {block!r}" if method == "fp8" else "")
    raise ConversionError(f"{where}: quantized checkpoint ({what}) is not supported; care-convert reads "
                          f"unquantized weights, or fp8 (e4m3) with block scales (quant_method 'fp8' with a "
                          f"weight_block_size, as Qwen3's -FP8 releases): convert from the bf16/fp16 checkpoint")


def check_unquantized(entries: dict[str, tuple], where: str) -> None:
    """A source whose config.json declares no quantization holds no fp8 or 8-bit integer weights. Why: a checkpoint
    quantized by a tool that describes it elsewhere (ModelOpt's hf_quant_config.json) loads in transformers with
    its codes read as the weights and their scales ignored (a tiny Llama's logits off by up to 21)."""
    for name, (_, _, stored) in entries.items():
        if stored.startswith(("F8", "F6", "F4")) or (stored in ("I8", "U8") and name.endswith(".weight")):
            raise ConversionError(f"{where}: tensor {name} is stored as {stored}, but config.json declares no "
                                  f"quantization (quantization_config); a checkpoint quantized by another tool "
                                  f"(e.g. ModelOpt's hf_quant_config.json) is not supported: convert from the "
                                  f"bf16/fp16 checkpoint")


def check_scales(entries: dict[str, tuple], block: tuple[int, int], where: str) -> None:
    """Every fp8 tensor of the files has its block scales, shaped [ceil(rows/b0), ceil(cols/b1)]."""
    for name, (_, shape, stored) in entries.items():
        if stored not in _STORED_FP8:
            continue
        scale = entries.get(name + SCALE_SUFFIX)
        if scale is None:
            raise ConversionError(f"{where}: fp8 tensor {name} has no {name + SCALE_SUFFIX} (its block scales)")
        want = tuple(math.ceil(n / b) for n, b in zip(shape, block)) if len(shape) == 2 else None
        if want is None or tuple(scale[1]) != want:
            raise ConversionError(f"{where}: {name + SCALE_SUFFIX} has shape {list(scale[1])}, expected "
                                  f"{list(want) if want else '[ceil(rows/b0), ceil(cols/b1)]'} for {name} "
                                  f"{list(shape)} in blocks of {list(block)}")


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 codes [rows, cols] x their block scales -> the fp32 weight they encode."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def dequantized(tensors: dict[str, torch.Tensor], read, block: tuple[int, int] | None,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`tensors` with each fp8 one replaced by the weight it encodes, in `dtype` (default fp32), one tensor at
    a time (no fp32 copy of them all); `read(names)` -> {name: tensor} fetches the scales. Unchanged when
    the source is not fp8."""
    fp8 = [n for n, t in tensors.items() if t.dtype in FP8_DTYPES] if block is not None else []
    if not fp8:
        return tensors
    scales = read([n + SCALE_SUFFIX for n in fp8])
    out = dict(tensors)
    for n in fp8:
        out[n] = dequantize(tensors[n], scales[n + SCALE_SUFFIX], block).to(dtype or torch.float32)
    return out
