"""Qwen3-MoE and Mixtral experts read from the source's safetensors one decoder layer at a time.

Why: the experts are ~95 % of a Qwen3-MoE (Qwen3-30B-A3B: 29 of 30.5 B parameters), and transformers
fuses a checkpoint's per-expert tensors (mlp.experts.{e}.gate_proj/up_proj/down_proj.weight, what the
Hub stores) into 3-D tensors while loading: new memory, not the memory-mapped file, so the whole
model sits in RAM (measured: 12.1 GiB anonymous for 8 of Qwen3-30B-A3B's 48 layers). The conversion
only touches a layer's experts twice: calibration propagates the hidden states through the layer, and
the writer copies them unchanged. So the converter loads the source without them (meta tensors,
`load_without_experts`) and an `ExpertStore` reads one layer's experts from the memory-mapped files
when it is needed: `attached()` for the calibration forward, `tensors()` for the writer.

The fused layout is transformers' own (conversion_mapping "qwen2_moe": stack over experts, gate rows
then up rows): gate_up_proj [E, 2I, D] = [gate_e; up_e] per expert, down_proj [E, D, I]. A checkpoint
that already stores the fused tensors is read as it is.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from . import fp8_source

# fused tensor -> the per-expert tensors stacked into it, one under the other (rows), in this order
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.")
# Mixtral's Hub names (block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1/w3/w2) -> transformers', as its
# conversion_mapping "mixtral" renames them: the router is mlp.gate, w1 the gate, w3 the up, w2 the down projection
_MIXTRAL_BLOCK = ".block_sparse_moe."
_MIXTRAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.\d+\.)(w[123])(\..+)$")
_MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def transformers_name(key: str) -> str:
    """The name transformers gives the tensor stored under `key` (Mixtral's Hub names renamed; others as stored)."""
    if _MIXTRAL_BLOCK not in key:
        return key
    key = key.replace(_MIXTRAL_BLOCK, ".mlp.")
    m = _MIXTRAL_EXPERT.match(key)
    return f"{m[1]}{_MIXTRAL_PARTS[m[2]]}{m[3]}" if m else key


_MIXTRAL_HUB_PARTS = {v: k for k, v in _MIXTRAL_PARTS.items()}
_TRANSFORMERS_EXPERT = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)(\..+)$")


def mixtral_hub_name(name: str) -> str:
    """transformers_name's inverse for Mixtral: the key a Hub checkpoint stores `name` under (to name a tensor
    such a checkpoint lacks in its own terms)."""
    if ".mlp.gate." in name:
        return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    m = _TRANSFORMERS_EXPERT.match(name)
    return f"{m[1]}.block_sparse_moe.experts.{m[2]}.{_MIXTRAL_HUB_PARTS[m[3]]}{m[4]}" if m else name


class SourceFiles(dict):
    """Tensor name, as transformers names the parameter -> the safetensors file that holds it; `stored`: the
    key in that file where it differs from the name (Mixtral's Hub names: transformers_name)."""

    def __init__(self, files: dict[str, Path], stored: dict[str, str] | None = None):
        super().__init__(files)
        self.stored = dict(stored or {})

    def key(self, name: str) -> str:
        return self.stored.get(name, name)


def is_expert_key(name: str) -> bool:
    """A tensor of some layer's experts, in the per-expert or the fused form."""
    return _EXPERT_KEY.match(name) is not None


def read_mapped(files: SourceFiles, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors {name: tensor}, memory-mapped from their files (safetensors >= 0.4 maps rather
    than copies: clean file pages, not RAM the process owns), each file opened once, each read under its
    stored key."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    got = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for k in keys:
                got[k] = fh.get_tensor(files.key(k))
    return got


def read_source(files: SourceFiles, names: list[str], fp8_block: tuple[int, int] | None,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """read_mapped, with an fp8 source's weights dequantized into `dtype` (the others as mapped)."""
    return fp8_source.dequantized(read_mapped(files, names), lambda more: read_mapped(files, more), fp8_block, dtype)


class ExpertStore:
    """Where each sparse layer's experts live in the source files, and how to assemble them."""

    def __init__(self, files: SourceFiles, num_experts: int, dtype: torch.dtype,
                 fp8_block: tuple[int, int] | None = None):
        """`files`: every tensor name of the source -> the safetensors file that holds it. `fp8_block`: the
        source's fp8 weight block (converter/fp8_source.py), None when it is not quantized."""
        self.files = files
        self.num_experts = num_experts
        self.dtype = dtype
        self.fp8_block = fp8_block
        self.layers = sorted({int(m.group(1)) for m in map(_EXPERT_KEY.match, files) if m})

    def _read(self, names: list[str], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        got = read_source(self.files, names, self.fp8_block, dtype)
        return [got[n] for n in names]

    def tensors(self, layer: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                ) -> dict[str, torch.Tensor]:
        """Layer `layer`'s fused experts {name: tensor} as transformers holds them, in `dtype` (default: the
        model's) on `device`, built there directly from the mapped files; {} for a dense layer."""
        if layer not in self.layers:
            return {}
        dtype = dtype or self.dtype
        prefix = f"model.layers.{layer}.mlp.experts"
        out = {}
        for fused, parts in PARTS.items():
            name = f"{prefix}.{fused}"
            if name in self.files:          # stored fused already
                (t,) = self._read([name], dtype)
                out[name] = t.to(device=device, dtype=dtype)
            else:
                out[name] = self._stacked(prefix, parts, dtype, device)
        return out

    def _stacked(self, prefix: str, parts: tuple[str, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """[E, sum of the parts' rows, cols]: expert e's `parts` one under the other, copied from the mapped
        files straight into one tensor of `dtype` on `device` (no stack/cat/cast intermediates)."""
        names = [f"{prefix}.{e}.{part}.weight" for e in range(self.num_experts) for part in parts]
        mapped = self._read(names, dtype)
        rows = sum(t.shape[0] for t in mapped[:len(parts)])
        out = torch.empty(self.num_experts, rows, mapped[0].shape[1], dtype=dtype, device=device)
        for e in range(self.num_experts):
            row = 0
            for t in mapped[e * len(parts):(e + 1) * len(parts)]:
                out[e, row:row + t.shape[0]].copy_(t)
                row += t.shape[0]
        return out

    def attach_all(self, model: torch.nn.Module) -> None:
        """Every sparse layer's experts into `model` for good (a source that must run whole, such as the
        healing teacher, read through this store because it is fp8)."""
        for layer in self.layers:
            _install(model.model.layers[layer].mlp.experts, self.tensors(layer))

    @contextlib.contextmanager
    def attached(self, layer: int, module: torch.nn.Module, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        """Decoder layer `layer` (`module`) with its experts in place for a forward pass, in `dtype` on
        `device` (where calibration runs the layer: no second copy for its working copy); meta again
        after, so only one layer's experts are ever in memory. A dense layer is left as it is."""
        tensors = self.tensors(layer, dtype, device)
        if not tensors:
            yield module
            return
        experts = module.mlp.experts
        saved = {n: getattr(experts, n) for n in PARTS}
        _install(experts, tensors)
        del tensors
        try:
            yield module
        finally:
            for n, p in saved.items():
                setattr(experts, n, p)


def _install(experts: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set a layer's fused expert tensors {full name: tensor} (ExpertStore.tensors) as its experts' parameters."""
    for name, t in tensors.items():
        setattr(experts, name.rsplit(".", 1)[1], torch.nn.Parameter(t, requires_grad=False))


def load_without_experts(cfg, files: SourceFiles, dtype: torch.dtype,
                         fp8_block: tuple[int, int] | None = None) -> torch.nn.Module:
    """The *ForCausalLM of `cfg` with every parameter but the experts read from the (memory-mapped) files
    (an fp8 source's dequantized) and cast to `dtype`; the experts stay on the meta device (read them with an
    ExpertStore), and so do the computed, never stored, rotary buffers (load._fp32_rotary builds them).
    The files were checked against the architecture before (load._check_tensors)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    wanted = [n for n in model.state_dict() if not is_expert_key(n) and n in files]
    # cast as transformers' loading does; no copy when stored in `dtype`
    state = {k: t.to(dtype) for k, t in read_source(files, wanted, fp8_block, dtype).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in model.named_parameters() if t.is_meta and not is_expert_key(n)]
    if left:  # a parameter the architecture has but the files do not provide
        raise RuntimeError(f"not loaded: {', '.join(left[:5])}")
    return model.eval()
