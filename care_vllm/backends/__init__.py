"""Attention backends for care_mla layers (each layer caches its own width r_K + r_V + d_r).

`choose_backend` is called once per layer by the model; it returns the backend class to pass to
`MLAAttention(attn_backend=...)`, or None to let vLLM select a stock backend. Because an explicit
backend bypasses vLLM's selector, the KV-cache dtype check the selector would make is made here:
CPU_MLA (which ours extends) stores only the model dtype, and an fp8 cache would otherwise be
accepted and decoded as garbage. `choose_prefill_backend` picks the prefill backend the same way
(once per layer).
"""
from __future__ import annotations

from vllm.logger import init_logger

logger = init_logger("vllm.care_vllm")

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


def choose_prefill_backend(vllm_config, num_heads: int, scale: float):
    """The MLA prefill backend class for a care_mla layer with `num_heads` heads (on this TP rank).

    vLLM's own choice when one of its backends takes these (qk_nope, rope, v) head dims; on CPU its
    dense CPU_SDPA_MLA is replaced by the tiled subclass (cpu_prefill.py). On GPU, where vLLM's
    whitelists are narrow, FlashAttention at any head dims it can run (gpu_prefill.py) once it has
    passed the start-up check against CPU_SDPA_MLA (prefill_check.py), else the dense PyTorch
    prefill with a warning. A backend the user named (--attention-config.mla_prefill_backend) that
    cannot take the dims stays vLLM's error."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend
    from vllm.v1.attention.backends.mla.prefill.selector import get_mla_prefill_backend

    try:
        chosen = get_mla_prefill_backend(vllm_config)
    except ValueError:
        if current_platform.is_cpu() or vllm_config.attention_config.mla_prefill_backend is not None:
            raise
        return _checked_flash_attn_prefill(vllm_config, num_heads, scale) or CPUSDPAMLAPrefillBackend
    if current_platform.is_cpu() and chosen is CPUSDPAMLAPrefillBackend:
        from .cpu_prefill import CareCPUPrefillBackend

        return CareCPUPrefillBackend
    return chosen


def _checked_flash_attn_prefill(vllm_config, num_heads: int, scale: float):
    """CareFlashAttnPrefillBackend if it takes the model's head dims on this GPU, else None (warned,
    with the reason). Checked once per process and dims: every layer has the same ones."""
    from vllm.model_executor.layers.attention.mla_attention import get_mla_dims

    dims = get_mla_dims(vllm_config.model_config)
    key = (dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim, num_heads, scale,
           vllm_config.model_config.dtype)
    if key not in _PREFILL_CHECKS:
        _PREFILL_CHECKS[key] = problem = _flash_attn_prefill_problem(vllm_config, dims, num_heads, scale)
        dims_text = f"(qk_nope {dims.qk_nope_head_dim}, rope {dims.qk_rope_head_dim}, v {dims.v_head_dim})"
        if problem is None:
            logger.info("care_vllm: MLA prefill through FlashAttention at head dims %s, v padded to the "
                        "query/key head dim; checked against CPU_SDPA_MLA at start-up.", dims_text)
        else:
            logger.warning("care_vllm: no fast MLA prefill at head dims %s: %s. Using the dense PyTorch "
                           "prefill (CPU_SDPA_MLA: O(S^2) memory per request).", dims_text, problem)
    if _PREFILL_CHECKS[key] is not None:
        return None
    from .gpu_prefill import CareFlashAttnPrefillBackend

    return CareFlashAttnPrefillBackend


_PREFILL_CHECKS: dict[tuple, str | None] = {}   # dims, heads, scale, dtype -> None (passed) or why not


def _flash_attn_prefill_problem(vllm_config, dims, num_heads: int, scale: float) -> str | None:
    import torch
    from vllm.v1.attention.backends.mla.prefill.base import MLADimensions

    try:
        from .gpu_prefill import CareFlashAttnPrefillBackend
    except Exception as e:  # noqa: BLE001  (whatever stops it, the dense prefill still works)
        return f"FlashAttention prefill does not import ({type(e).__name__}: {e})"
    if not CareFlashAttnPrefillBackend.is_available():
        return "flash_attn_varlen_func is not available"
    if not CareFlashAttnPrefillBackend.supports_mla_dimensions(MLADimensions(
            qk_nope_head_dim=dims.qk_nope_head_dim, qk_rope_head_dim=dims.qk_rope_head_dim,
            v_head_dim=dims.v_head_dim)):
        return "the query/key head dim is above 256 or not a multiple of 8"
    from .prefill_check import check_prefill_backend

    try:
        backend = CareFlashAttnPrefillBackend(
            num_heads=num_heads, scale=scale, kv_lora_rank=dims.kv_lora_rank,
            qk_nope_head_dim=dims.qk_nope_head_dim, qk_rope_head_dim=dims.qk_rope_head_dim,
            v_head_dim=dims.v_head_dim, vllm_config=vllm_config)
    except Exception as e:  # noqa: BLE001
        return f"FlashAttention prefill cannot be built ({type(e).__name__}: {e})"
    return check_prefill_backend(backend, vllm_config.model_config.dtype,
                                 torch.device("cuda", torch.cuda.current_device()))


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
