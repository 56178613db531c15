"""Keep chunked prefill and prefix caching on for care_mla models on CPUs without AMX.

vLLM 0.32's `CpuPlatform.check_and_update_config` switches both off for every MLA model unless the
CPU has AMX (then vLLM's AMX_MLA backend is chosen and both stay on). The reason is the stock
CPU_MLA path, not the scheduler: prefill over cached context needs the MLA "chunked context" path
(gather the cached latent rows, up-project them with kv_b_proj, attend, merge with the new tokens'
attention by log-sum-exp), which on CPU is plain PyTorch in vLLM 0.32 and works for any cache
width (`ops.gather_mla_context_cache_cpu`, the CPU SDPA prefill backend's
`run_prefill_context_chunk`, the torch `merge_attn_states`). care_mla layers always use the
plugin's own CPU backend (any width, any block size), whatever the CPU, so the AMX distinction
does not apply to them: without this hook the same checkpoint would serve with prefix caching on
an AMX Xeon and without it elsewhere.

`install()` wraps the platform hook: for a care_mla model it puts back the three settings the
hook overrides (`enable_chunked_prefill`, `enable_prefix_caching`, `max_num_batched_tokens`) to
what the engine arguments had resolved them to before it, so vLLM's defaults (both on) and the
user's flags (`--no-enable-prefix-caching`, `--max-num-batched-tokens`, ...) apply as for any
other model. Everything else the hook does (block size 16, memory, threads) is kept.
Checked end to end by tests/test_vllm_serve.py (greedy output and logprobs equal to
model_defs with cache hits and prefills split into chunks).
"""
from __future__ import annotations

from .config import MODEL_TYPE

_KEPT = (("scheduler_config", "enable_chunked_prefill"),
         ("cache_config", "enable_prefix_caching"),
         ("scheduler_config", "max_num_batched_tokens"))


def is_care_model(vllm_config) -> bool:
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_config", None)
    return getattr(hf_config, "model_type", None) == MODEL_TYPE


def install() -> None:
    """Wrap the CPU platform's config hook (idempotent; a no-op on other platforms)."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    logger = init_logger("vllm.care_vllm")   # (under "vllm": vLLM's handlers and level; a logger of its own has none)

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if getattr(original, "_care_keeps_scheduling", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        if not is_care_model(vllm_config):
            return original.__func__(cls, vllm_config)
        before = [getattr(getattr(vllm_config, part), name) for part, name in _KEPT]
        original.__func__(cls, vllm_config)
        for (part, name), value in zip(_KEPT, before):
            setattr(getattr(vllm_config, part), name, value)
        logger.info("care_vllm: care_mla's CPU latent backend prefills over cached context: chunked "
                    "prefill %s, prefix caching %s, max_num_batched_tokens %d (as without MLA)",
                    *("on" if v else "off" for v in before[:2]), before[2])

    check_and_update_config._care_keeps_scheduling = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)
