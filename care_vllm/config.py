"""Config side of the plugin: the HF config class and the vLLM arch-config convertor for care_mla."""
from __future__ import annotations

MODEL_TYPE = "care_mla"


def _fallback_config_cls():
    """A minimal CareMLAConfig, only used if model_defs (the reference package) is not importable."""
    from transformers import PretrainedConfig

    class CareMLAConfig(PretrainedConfig):
        model_type = MODEL_TYPE

        def __init__(self, k_ranks=None, v_ranks=None, tie_word_embeddings=True, **kw):
            self.k_ranks = list(k_ranks or [])
            self.v_ranks = list(v_ranks or [])
            self.tie_word_embeddings = tie_word_embeddings
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kw)

    return CareMLAConfig


def config_cls():
    try:
        from model_defs.configuration_care import CareMLAConfig
    except ImportError:
        return _fallback_config_cls()
    return CareMLAConfig


def register_config() -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        return
    cls = config_cls()
    AutoConfig.register(MODEL_TYPE, cls, exist_ok=True)


def layer_widths(cfg) -> list[int]:
    """Per-layer cache width r_K[l] + r_V[l] + d_r (values per token)."""
    d_r = int(cfg.qk_rope_head_dim)
    return [int(k) + int(v) + d_r for k, v in zip(cfg.k_ranks, cfg.v_ranks)]


def refuse_gqa_overrides(cfg) -> None:
    """Stop `vllm serve --hf-overrides '{"rope_scaling": ...}'` (Qwen3's documented way to turn on yarn for long
    contexts) on a converted checkpoint: the model never reads those keys (its rope frequencies and logit
    scale were fixed by care-convert), so it would serve the unscaled rope under the name of the scaled one.
    A care_mla config never carries one of the GQA keys itself, so one on the config vLLM built means
    `--hf-overrides` (or the like) put it there."""
    from model_defs.configuration_care import GQA_KEYS

    given = [k for k in GQA_KEYS if k in vars(cfg)]
    if given:
        raise ValueError(
            f"care_mla checkpoints do not take {', '.join(given)} overrides: their rope frequencies and "
            f"softmax scale were fixed at conversion. To serve with rope scaling (e.g. yarn), convert with it: "
            f"care-convert SRC OUT --hf-overrides '<the same JSON>' (or set it in the source's config.json)")


def register_convertor() -> None:
    from vllm.transformers_utils import model_arch_config_convertor as mac

    if MODEL_TYPE in mac.MODEL_ARCH_CONFIG_CONVERTORS:
        return

    class CareMLAArchConfigConvertor(mac.ModelArchConfigConvertorBase):
        """care_mla is MLA: one latent KV head; the global head size is the widest layer's cache
        width (kv_lora_rank = max_l r[l], plus d_r). Each layer's own width comes from the layer."""

        def __init__(self, hf_config, hf_text_config, *args, **kwargs):
            super().__init__(hf_config, hf_text_config, *args, **kwargs)
            refuse_gqa_overrides(hf_text_config)

        def is_deepseek_mla(self) -> bool:
            return getattr(self.hf_text_config, "kv_lora_rank", None) is not None

        def get_head_size(self) -> int:
            c = self.hf_text_config
            return int(c.kv_lora_rank) + int(c.qk_rope_head_dim)

        def get_total_num_kv_heads(self) -> int:
            return 1

    mac.MODEL_ARCH_CONFIG_CONVERTORS[MODEL_TYPE] = CareMLAArchConfigConvertor
