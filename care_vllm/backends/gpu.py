"""GPU (CUDA/ROCm) latent-attention backend for widths the stock MLA backends do not take.

* `CareTritonMLABackend`: vLLM's TRITON_MLA (its decode kernel handles any `r + d_r`: it tiles
  the row as next_pow2(r) + next_pow2(d_r) masked to the width, once triton_decode_widths.py has fixed the
  launcher's tiles for widths 576 and 288 with another split and for ropes under 16) with a metadata builder that skips
  the global head-size whitelist {320, 512, 576} (see common.py). Layers of different widths get
  different KV specs, hence different attention groups and builders (one workspace each).
* the chunked-context gather: `ops.gather_and_maybe_dequant_cache` (CUDA) only instantiates
  entry widths 320, 512 and 576. `install_gather_fallback()` wraps it so other widths go through
  `ops.cp_gather_cache` (any entry size, no dequantisation) for unquantised caches, or a PyTorch
  gather + per-tensor dequantisation for fp8 caches. Widths 320/512/576 still use the original kernel.

Not yet run on a GPU (no session so far was lent one; benchmarks/gpu/README.md is the plan); it
imports on CPU builds. What is verified without a GPU: the Triton decode kernel at care widths, in
Triton's interpreter (tests/test_triton_decode_interpreted.py); `cp_gather_cache`'s CUDA source
(vLLM 0.32.0 csrc/cache_kernels.cu) copies `entry_size * element_size` bytes per token for any entry
size; `torch_gather_cache` against a reference (tests/test_vllm_plugin.py).
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.mla.triton_mla import TritonMLABackend, TritonMLAMetadataBuilder

from .common import RelaxedHeadSizeBuilderMixin

_GATHER_KERNEL_WIDTHS = (320, 512, 576)  # csrc/cache_kernels.cu instantiates exactly these


class CareTritonMLAMetadataBuilder(RelaxedHeadSizeBuilderMixin, TritonMLAMetadataBuilder):
    pass


class CareTritonMLABackend(TritonMLABackend):
    @staticmethod
    def get_builder_cls():
        from .triton_decode_widths import install as decode_tiles_for_every_width

        install_gather_fallback()
        decode_tiles_for_every_width()
        return CareTritonMLAMetadataBuilder


def torch_gather_cache(src_cache: torch.Tensor, dst: torch.Tensor, block_table: torch.Tensor,
                       cu_seq_lens: torch.Tensor, seq_starts: torch.Tensor | None,
                       num_tokens: int, scale: torch.Tensor | None = None) -> None:
    """dst[cu[i] + j] = src_cache[block_table[i, (start_i + j) // bs], (start_i + j) % bs] (dequantised)."""
    bs = src_cache.shape[1]
    batch = block_table.shape[0]
    cu = cu_seq_lens[: batch + 1].to(torch.long)
    tok = torch.arange(num_tokens, device=dst.device)
    req = torch.searchsorted(cu[1:], tok, right=True)                       # request of each token
    pos = tok - cu[req]
    if seq_starts is not None:
        pos = pos + seq_starts.to(torch.long)[req]
    blocks = block_table.to(torch.long)[req, pos // bs]
    rows = src_cache[blocks, pos % bs]
    if scale is not None and rows.dtype != dst.dtype:
        rows = rows.view(torch.float8_e4m3fn) if rows.dtype == torch.uint8 else rows
        rows = rows.float() * scale.float()
    dst[:num_tokens].copy_(rows.to(dst.dtype))


def install_gather_fallback() -> None:
    from vllm import _custom_ops as ops

    original = ops.gather_and_maybe_dequant_cache
    if getattr(original, "_care_fallback", False):
        return

    def gather_and_maybe_dequant_cache(src_cache, dst, block_table, cu_seq_lens, token_to_seq,
                                       num_tokens, kv_cache_dtype, scale, seq_starts=None):
        width = dst.shape[-1]
        if width in _GATHER_KERNEL_WIDTHS:
            return original(src_cache=src_cache, dst=dst, block_table=block_table,
                            cu_seq_lens=cu_seq_lens, token_to_seq=token_to_seq,
                            num_tokens=num_tokens, kv_cache_dtype=kv_cache_dtype, scale=scale,
                            seq_starts=seq_starts)
        if kv_cache_dtype == "auto" or src_cache.dtype == dst.dtype:
            batch = block_table.shape[0]
            ops.cp_gather_cache(src_cache=src_cache, dst=dst[:num_tokens], block_table=block_table,
                                cu_seq_lens=cu_seq_lens, batch_size=batch, seq_starts=seq_starts)
            return None
        torch_gather_cache(src_cache, dst, block_table, cu_seq_lens, seq_starts, num_tokens, scale)
        return None

    gather_and_maybe_dequant_cache._care_fallback = True  # type: ignore[attr-defined]
    ops.gather_and_maybe_dequant_cache = gather_and_maybe_dequant_cache
