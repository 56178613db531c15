"""`CareMLAConfig`: the config of a converted care_mla checkpoint (docs/FORMAT.md, "config.json").

This module imports nothing from the modeling code (and nothing heavy beyond transformers'
config machinery) because the vLLM plugin imports it in every worker process just to parse
config.json.

Why the field names look the way they do: vLLM and transformers give special meaning to
top-level `head_dim`, `num_key_value_heads`, `rope_parameters`/`rope_scaling` (cache sizing,
rope construction, GQA). An MLA layer has none of those in the GQA sense, so the format keeps the
original values under `original_*` / `source_rope_parameters` names that nothing interprets.
"""
from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ATTENTION_PATHS = ("plain", "absorbed")

# A converted folder carries copies of this file and modeling_care.py (care-convert writes them), and
# config.json's `auto_map` names their classes: `AutoModelForCausalLM.from_pretrained(path,
# trust_remote_code=True)` then runs the checkpoint in plain transformers, without care-vllm installed
# (where model_defs is imported, its registration takes precedence over the copies).
REMOTE_CODE_FILES = ("configuration_care.py", "modeling_care.py")
AUTO_MAP = {"AutoConfig": "configuration_care.CareMLAConfig", "AutoModel": "modeling_care.CareMLAModel",
            "AutoModelForCausalLM": "modeling_care.CareMLAForCausalLM"}

# Keys that must never appear on this config: transformers/vLLM would interpret them as GQA facts (the
# plugin also refuses them as `vllm serve --hf-overrides`: care_vllm/config.py).
GQA_KEYS = ("head_dim", "num_key_value_heads", "rope_parameters", "rope_scaling", "rope_theta")


def variant_architecture(use_qk_norm: bool, sparse: bool) -> str:
    """The class name of a care_mla model (config.json's `architectures`, what vLLM dispatches on): Qwen3's
    front-end (q_norm/k_norm kept) or Llama's, with sparse (MoE) layers or without."""
    if use_qk_norm:
        return "CareQwen3MoeForCausalLM" if sparse else "CareQwen3ForCausalLM"
    return "CareMixtralForCausalLM" if sparse else "CareLlamaForCausalLM"


def default_inv_freq(d_r: int, theta: float = 10000.0) -> list[float]:
    """Plain RoPE frequencies over d_r dims; only used for default/random configs (converted ones
    always carry the exact source frequencies)."""
    import torch

    return (1.0 / theta ** (torch.arange(0, d_r, 2, dtype=torch.float32) / d_r)).tolist()


class CareMLAConfig(PretrainedConfig):
    """Config of a GQA model converted to multi-head latent attention (see docs/FORMAT.md).

    Per-layer latent ranks `k_ranks[l]` (may be 0) and `v_ranks[l]` (>= 1) are what makes the
    conversion budget-adaptive; `kv_lora_rank` is their per-layer maximum sum, kept only because
    vLLM's generic MLA code wants one scalar. `joint_latent` (care-convert --latent joint): one latent per layer
    that keys and values both read, written as v_ranks with k_ranks all 0; for Qwen3's layout it also says that
    k_latent_proj's latent rows add to v_latent_proj's instead of preceding them (`key_latent_rows`).
    `care_attention_path` picks the reference model's
    attention computation ("plain": decompress keys/values; "absorbed": vLLM's decode form); it
    does not change the numbers, only how they are computed.
    """

    model_type = "care_mla"
    _auto_class = "AutoConfig"   # save_pretrained writes this file and its auto_map entry (see modeling_care.py)
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 2
    num_attention_heads: int = 9
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    original_num_key_value_heads: int = 3
    original_head_dim: int = 64
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int | None = None
    k_ranks: list[int] | None = None
    v_ranks: list[int] | None = None
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    use_qk_norm: bool = False
    joint_latent: bool = False     # one latent for keys and values (k_ranks all 0; Qwen3: c = key part + value part)
    attention_bias: bool = False   # q_proj, kv_a_proj_with_mqa and o_proj have biases (Qwen2 / biased Llama sources)
    rope_inv_freq: list[float] | None = None
    softmax_scale: float | None = None
    source_rope_parameters: dict | None = None
    source_hf_overrides: dict | None = None   # care-convert --hf-overrides (the rope the source was converted with)
    source_model: str | None = None
    source_revision: str | None = None
    source_architecture: str | None = None
    care: dict | None = None
    care_attention_path: str = "plain"

    # Mixture-of-experts MLP (Qwen3-MoE sources; copied unchanged, same meaning as Qwen3MoeConfig).
    # num_experts = 0: every layer has the dense MLP of size intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for key in GQA_KEYS:
            kwargs.pop(key, None)  # never let GQA keys leak in (they would be saved and misread)
        d_h, L = self.original_head_dim, self.num_hidden_layers
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = d_h
        if self.v_head_dim is None:
            self.v_head_dim = d_h
        if self.k_ranks is None:
            self.k_ranks = [d_h] * L
        if self.v_ranks is None:
            self.v_ranks = [d_h] * L
        self.k_ranks = [int(r) for r in self.k_ranks]
        self.v_ranks = [int(r) for r in self.v_ranks]
        if self.rope_inv_freq is None:
            self.rope_inv_freq = default_inv_freq(self.qk_rope_head_dim)
        self.rope_inv_freq = [float(f) for f in self.rope_inv_freq]
        if self.softmax_scale is None:
            self.softmax_scale = d_h ** -0.5
        computed = max((k + v for k, v in zip(self.k_ranks, self.v_ranks)), default=0)
        if self.kv_lora_rank is None:
            self.kv_lora_rank = computed
        super().__post_init__(**kwargs)
        if self.architectures == ["CareMLAForCausalLM"]:
            # re-saved by code that did not swap in the variant class (a checkpoint loaded with
            # trust_remote_code before that swap worked there, then saved by a quantizer or a trainer): vLLM
            # dispatches on the variant's name
            self.architectures = [self.variant_architecture()]
        self.validate_care()

    def variant_architecture(self) -> str:
        """The class name a checkpoint of this config is served and saved under (vLLM dispatches on it)."""
        return variant_architecture(bool(self.use_qk_norm), bool(self.num_experts))

    def validate(self) -> None:
        """transformers' checks, which save_pretrained runs, and validate_care: a value set after __init__
        (from_pretrained's keyword overrides) is refused before it is written."""
        super().validate()
        self.validate_care()

    def validate_care(self) -> None:
        """Reject configs the model code cannot run correctly (fail at load, not deep in a matmul)."""
        L, d_r = self.num_hidden_layers, self.qk_rope_head_dim
        if len(self.k_ranks) != L or len(self.v_ranks) != L:
            raise ValueError(f"k_ranks/v_ranks need {L} entries (num_hidden_layers), "
                             f"got {len(self.k_ranks)}/{len(self.v_ranks)}")
        if any(r < 0 for r in self.k_ranks):
            raise ValueError(f"k_ranks must be >= 0, got {self.k_ranks}")
        if any(r < 1 for r in self.v_ranks):
            raise ValueError(f"v_ranks must be >= 1, got {self.v_ranks}")
        if self.joint_latent and any(self.k_ranks):
            raise ValueError(f"a joint latent is written as v_ranks with k_ranks all 0, got k_ranks {self.k_ranks}")
        if d_r <= 0 or d_r % 2:
            raise ValueError(f"qk_rope_head_dim (d_r) must be even and > 0, got {d_r}")
        if len(self.rope_inv_freq) != d_r // 2:
            raise ValueError(f"rope_inv_freq needs d_r/2 = {d_r // 2} entries, got {len(self.rope_inv_freq)}")
        expected = max(k + v for k, v in zip(self.k_ranks, self.v_ranks)) if L else 0
        if self.kv_lora_rank != expected:
            raise ValueError(f"kv_lora_rank must be max(k_ranks + v_ranks) = {expected}, got {self.kv_lora_rank}")
        if self.qk_nope_head_dim != self.original_head_dim or self.v_head_dim != self.original_head_dim:
            raise ValueError("qk_nope_head_dim and v_head_dim must equal original_head_dim "
                             f"({self.original_head_dim}), got {self.qk_nope_head_dim}/{self.v_head_dim}")
        if self.q_lora_rank is not None:
            raise ValueError("q_lora_rank is not supported (queries are not compressed): must be null")
        if self.attention_bias and self.use_qk_norm:
            raise ValueError("attention_bias is only defined for the Llama-path layout (use_qk_norm false)")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError("moe_intermediate_size and decoder_sparse_step must be >= 1 for an MoE config")
        if self.care_attention_path not in ATTENTION_PATHS:
            raise ValueError(f"care_attention_path must be one of {ATTENTION_PATHS}, got {self.care_attention_path!r}")
        for key in GQA_KEYS:
            if key in self.__dict__:
                raise ValueError(f"care_mla configs must not carry a top-level {key!r}")

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether layer `layer` has the mixture-of-experts MLP (Qwen3-MoE's rule)."""
        return (self.num_experts > 0 and layer not in (self.mlp_only_layers or [])
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_rank(self, layer: int) -> tuple[int, int]:
        """(r_K, r_V) of layer `layer`."""
        return self.k_ranks[layer], self.v_ranks[layer]

    def key_latent_rows(self, layer: int) -> int:
        """Latent rows of Qwen3's k_latent_proj in layer `layer` (before its d_r rope rows): r_K, the c_K that
        precedes c_V; with a joint latent the whole latent r_V, which the value part v_latent_proj(x) adds to."""
        return self.v_ranks[layer] if self.joint_latent else self.k_ranks[layer]

    def cache_values_per_token(self) -> int:
        """Latent-cache values one token costs over all layers: sum_l (r_K + r_V + d_r)."""
        return sum(k + v + self.qk_rope_head_dim for k, v in zip(self.k_ranks, self.v_ranks))


__all__ = ["CareMLAConfig", "ATTENTION_PATHS", "default_inv_freq"]
