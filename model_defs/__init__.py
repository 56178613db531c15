"""care_mla reference model for transformers.

`import model_defs` registers the config with AutoConfig and the models with AutoModel /
AutoModelForCausalLM, so converted folders load with plain
`AutoModelForCausalLM.from_pretrained(path)` (no trust_remote_code). Registration is idempotent.

Why the model registration is lazy: Python runs this file for `import model_defs.configuration_care`
too, and the vLLM plugin does exactly that in every worker process just to parse config.json.
Importing the modeling code pulls in transformers.modeling_utils/generation (seconds and ~150 MB
per process), which vLLM itself never needs. So the Auto registries first get small stand-ins
whose from_pretrained/from_config import `model_defs.modeling_care`; importing that module
replaces the stand-ins with the real classes.
"""
from __future__ import annotations

from .configuration_care import ATTENTION_PATHS, CareMLAConfig

_MODELING_NAMES = ("CareMLAPreTrainedModel", "CareMLAModel", "CareMLAForCausalLM",
                   "CareLlamaForCausalLM", "CareQwen3ForCausalLM", "CareQwen3MoeForCausalLM", "CareMixtralForCausalLM",
                   "CareMLAAttention")


def _modeling():
    from . import modeling_care

    return modeling_care


class _LazyModel:
    """Auto-registry stand-in for a modeling class that is not imported yet."""

    config_class = CareMLAConfig
    _target = ""

    @classmethod
    def _real(cls):
        return getattr(_modeling(), cls._target)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)

    @classmethod
    def from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)


class _LazyCareMLAModel(_LazyModel):
    _target = "CareMLAModel"


class _LazyCareMLAForCausalLM(_LazyModel):
    _target = "CareMLAForCausalLM"


def register(model_cls=None, causal_lm_cls=None) -> None:
    """Register care_mla with the transformers Auto classes (idempotent; later calls with the real
    classes replace the lazy stand-ins)."""
    import sys

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    loaded = sys.modules.get(f"{__name__}.modeling_care")
    if loaded is not None and hasattr(loaded, "CareMLAForCausalLM"):  # never downgrade to stand-ins
        model_cls = model_cls or loaded.CareMLAModel
        causal_lm_cls = causal_lm_cls or loaded.CareMLAForCausalLM
    AutoConfig.register(CareMLAConfig.model_type, CareMLAConfig, exist_ok=True)
    AutoModel.register(CareMLAConfig, model_cls or _LazyCareMLAModel, exist_ok=True)
    AutoModelForCausalLM.register(CareMLAConfig, causal_lm_cls or _LazyCareMLAForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name in _MODELING_NAMES:
        return getattr(_modeling(), name)
    raise AttributeError(f"module 'model_defs' has no attribute {name!r}")


register()

__all__ = ["CareMLAConfig", "ATTENTION_PATHS", "register", *_MODELING_NAMES]
