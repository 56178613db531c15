"""Attention backends for care_mla layers (each layer caches its own width r_K + r_V + d_r).

`choose_backend` is called once per layer by the model; it returns the backend class to pass to
`MLAAttention(attn_backend=...)`, or None to let vLLM select a stock backend. Because an explicit
backend bypasses vLLM's selector, the KV-cache dtype check the selector would make is made here:
CPU_MLA (which ours extends) stores only the model dtype, and an fp8 cache would otherwise be
accepted and decoded as garbage.
"""
from __future__ import annotations

# Widths (kv_lora_rank + rope) that the stock GPU MLA backends and the CUDA context-gather kernel
# handle, keyed by rope dim: FlashAttn-MLA / FlashMLA expect DeepSeek's 512 + 64 (and 256 + 64).
_STOCK_GPU_WIDTHS = {64: (320, 576)}


def choose_backend(widths: list[int], rope_dim: int, kv_cache_dtype: str | None = "auto"):
    """Backend for a model whose layers cache `widths` values per token in `kv_cache_dtype`
    (vLLM's --kv-cache-dtype)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from .cpu import CareCPUMLABackend

        return _check_cache_dtype(CareCPUMLABackend, kv_cache_dtype)
    if current_platform.is_cuda_alike():
        distinct = set(widths)
        if len(distinct) == 1 and next(iter(distinct)) in _STOCK_GPU_WIDTHS.get(rope_dim, ()):
            return None  # homogeneous DeepSeek-like width: vLLM's own selection (FA-MLA, FlashMLA, ...)
        from .gpu import CareTritonMLABackend

        return _check_cache_dtype(CareTritonMLABackend, kv_cache_dtype)
    raise NotImplementedError(
        f"care_vllm: no latent-attention backend for platform {current_platform.device_name!r} "
        "(supported: CPU, CUDA/ROCm)")


def use_key_value_split(layer, k_rank: int) -> bool:
    """Called by each care_mla attention layer after loading: let its backend decode the key and
    value parts of the latent separately when kv_b_proj is block-diagonal (CPU backend only;
    backends/cpu.py). Returns whether it does."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from .cpu import use_key_value_split as split

    return split(layer, k_rank)


def _check_cache_dtype(backend, kv_cache_dtype: str | None):
    if not backend.supports_kv_cache_dtype(kv_cache_dtype):
        raise ValueError(
            f"care_vllm: --kv-cache-dtype {kv_cache_dtype} is not supported by the {backend.get_name()} "
            f"latent-attention backend of this platform (supported: "
            f"{', '.join(backend.supported_kv_cache_dtypes)})")
    return backend
