"""transformers reference implementation of care_mla checkpoints (docs/FORMAT.md).

This is the model that healing trains and that tests compare vLLM against, so it favours being
obviously equal to the spec over speed. Two attention computations are available and must give
the same numbers:

* "plain": decompress per-head k_nope and v from the latent with kv_b_proj and run ordinary
  causal attention (what training wants: one big matmul, autograd-friendly).
* "absorbed": fold W_UK into the query and W_UV into the output and attend directly over the
  cached latent, exactly like vLLM's MLA decode; having it here lets tests pin down the
  absorption algebra independently of vLLM.

Either way the KV cache holds only the latent: per layer, transformers' DynamicCache stores the
latent c as the "key" ([B, 1, T, r_K + r_V]) and rope(k_pe) as the "value" ([B, 1, T, d_r]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeExperts, Qwen3MoeSparseMoeBlock,
                                                              Qwen3MoeTopKRouter)
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_care import ATTENTION_PATHS, CareMLAConfig


class CareRMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in fp32, result cast back before the weight multiply (same
    rounding as the source models, so full-rank conversions stay bit-close in bf16). fp64 inputs
    stay fp64 (Llama would round them to fp32), so fp64 runs can serve as exact references."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float64 if dtype == torch.float64 else torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class CareRope(nn.Module):
    """Rotary angles from the checkpoint's exact per-pair frequencies (config.rope_inv_freq).

    The frequencies are NOT recomputed from a theta/scaling recipe: the converter may keep an
    arbitrary subset of the source's (llama3-scaled) frequencies, so the list is the truth.
    Kept as a non-persistent fp32 buffer (never saved); re-created from the config if something
    (model.to(bf16), meta-device loading) degraded it, because rope angles at long positions are
    very sensitive to frequency rounding.
    """

    def __init__(self, config: CareMLAConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.tensor(self.config.rope_inv_freq, dtype=torch.float32, device=device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, d_r/2]. The angle is pos.float() * inv_freq.float() in fp32
        (the spec: every implementation rounds the angle identically); cos/sin are then taken in
        fp64, which costs nothing at this size and keeps fp64 runs of the model exact."""
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.compute_inv_freq(self.inv_freq.device)
        ang = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)[None, None, :]
        ang = ang.double()
        return ang.cos(), ang.sin()


class WeightMap(nn.Module):
    """A linear map y = x W^T whose weight serving reads directly, so post-training quantization must leave it
    alone: kv_b_proj (vLLM absorbs it into the queries and the outputs when it loads; the decode never runs it as
    a layer) and Qwen3's q_rope_proj (applied per query head). Deliberately not an nn.Linear: quantizers select
    nn.Linear modules (llm-compressor's `targets=["Linear"]`), so a stock recipe keeps these two in float, which
    is what care_vllm serves (it refuses a checkpoint that quantized them). State-dict layout as nn.Linear's
    (`weight` [out, in], no bias)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half over the last dim: pair p = (p, p + d_r/2). x: [B, H, T, d_r], cos/sin:
    [B, T, d_r/2]. Computed in fp32 (fp64 for fp64 models) and cast back, so bf16 models rotate
    as exactly as possible."""
    half = x.shape[-1] // 2
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos[:, None].to(work), sin[:, None].to(work)
    xf = x.to(work)
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).to(x.dtype)


class CareMLP(nn.Module):
    def __init__(self, config: CareMLAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def moe_block(config: CareMLAConfig) -> nn.Module:
    """Qwen3-MoE's sparse MLP (router + experts; a Mixtral source's is the same computation), transformers' own
    module: the conversion copies it unchanged, so the reference reuses the original's implementation (same parameter names:
    mlp.gate.weight [E, D], mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj [E, D, I])."""
    return Qwen3MoeSparseMoeBlock(config)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scale: float, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softmax(q k^T * scale + mask) v, the softmax when `eager`, else None). `eager` (attn_implementation
    "eager") spells the product out, so that output_attentions has the weights to return, as transformers' eager
    attention does; otherwise SDPA. MLA's values are narrower than its queries and keys (d_h vs
    d_h + d_r; r vs r + d_r absorbed), and PyTorch's CPU SDPA then falls back to its unfused math path:
    on CPU the values are zero-padded to the key width for the fused kernel and the padding sliced off
    again (the same result to fp32 rounding; 1.5x faster with a boolean causal mask at d_h = d_r = 64,
    9 heads, 8 x 256 tokens, 2 cores). CUDA's fused kernels take the narrower values as they are."""
    if eager:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
                else scores + mask
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value), weights
    d_v, d_k = value.shape[-1], key.shape[-1]
    if query.device.type != "cpu" or d_v >= d_k:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale), None
    out = F.scaled_dot_product_attention(query, key, F.pad(value, (0, d_k - d_v)), attn_mask=mask, scale=scale)
    return out[..., :d_v], None


def mask_unwritten_rows(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """`mask` [B, 1, T, keys] widened to `rows` keys, the added ones masked. Why: a StaticCache
    (generate(cache_implementation="static"), the route to torch.compile) returns all of its preallocated rows,
    the unwritten ones zero, where the mask covers the past and new tokens only."""
    if mask is None or mask.shape[-1] >= rows:
        return mask
    fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return F.pad(mask, (0, rows - mask.shape[-1]), value=fill)


class CareMLAAttention(nn.Module):
    """One MLA layer with its own latent ranks (r_K, r_V); Llama (all linear) or Qwen3 (exact
    q_norm/k_norm kept, hence the extra projections) front-ends, shared latent back-end."""

    def __init__(self, config: CareMLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_h = config.num_attention_heads
        self.d_h = config.original_head_dim
        self.d_r = config.qk_rope_head_dim
        self.g = config.original_num_key_value_heads
        self.r_k, self.r_v = config.layer_rank(layer_idx)
        self.rank = self.r_k + self.r_v
        self.scale = config.softmax_scale
        D, n_h, d_h, d_r = config.hidden_size, self.n_h, self.d_h, self.d_r
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:
            self.q_proj = nn.Linear(D, n_h * d_h, bias=False)
            self.q_norm = CareRMSNorm(d_h, config.rms_norm_eps)
            self.q_rope_proj = WeightMap(d_h, n_h * d_r)
            self.k_proj = nn.Linear(D, self.g * d_h, bias=False)
            self.k_norm = CareRMSNorm(d_h, config.rms_norm_eps)
            self.joint = bool(config.joint_latent)
            self.k_latent_rows = config.key_latent_rows(layer_idx)
            self.k_latent_proj = nn.Linear(self.g * d_h, self.k_latent_rows + d_r, bias=False)
            self.v_latent_proj = nn.Linear(D, self.r_v, bias=False)
        else:
            bias = bool(getattr(config, "attention_bias", False))
            self.q_proj = nn.Linear(D, n_h * (d_h + d_r), bias=bias)
            self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + d_r, bias=bias)
        self.kv_b_proj = WeightMap(self.rank, n_h * 2 * d_h)
        self.o_proj = nn.Linear(n_h * d_h, D, bias=bool(getattr(config, "attention_bias", False)))

    @torch.no_grad()
    def scale_latent_(self, d: torch.Tensor) -> None:
        """Multiply latent dimension j by d[j] ([r_K + r_V], nonzero) where it is produced and divide kv_b_proj's
        column j by it: the same attention, with another split of scale between the down- and up-projection
        (healing balances it first: converter/heal.py balance_latents). The producers are kv_a_proj_with_mqa's
        latent rows (and bias), or Qwen3's k_latent_proj latent rows and v_latent_proj (with a joint latent
        both make every dimension: c = c_K + c_V)."""
        d = d.to(self.kv_b_proj.weight)
        self.kv_b_proj.weight.div_(d)
        if not self.use_qk_norm:
            self.kv_a_proj_with_mqa.weight[: self.rank].mul_(d[:, None])
            if self.kv_a_proj_with_mqa.bias is not None:
                self.kv_a_proj_with_mqa.bias[: self.rank].mul_(d)
            return
        d_k, d_v = (d, d) if self.joint else (d[: self.r_k], d[self.r_k:])
        self.k_latent_proj.weight[: self.k_latent_rows].mul_(d_k[:, None])
        self.v_latent_proj.weight.mul_(d_v[:, None])

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, n_h, T, d_h], q_pe [B, n_h, T, d_r] (pre-rope),
        c [B, T, r_K + r_V], k_pe [B, T, d_r] (pre-rope)."""
        B, T, _ = x.shape
        n_h, d_h, d_r = self.n_h, self.d_h, self.d_r
        if self.use_qk_norm:
            q_nope = self.q_norm(self.q_proj(x).view(B, T, n_h, d_h))
            w_qr = self.q_rope_proj.weight.view(n_h, d_r, d_h)
            q_pe = torch.einsum("bthd,hrd->bthr", q_nope, w_qr)
            k = self.k_norm(self.k_proj(x).view(B, T, self.g, d_h)).reshape(B, T, self.g * d_h)
            c_k, k_pe = self.k_latent_proj(k).split([self.k_latent_rows, d_r], -1)
            c_v = self.v_latent_proj(x)
            c = c_k + c_v if self.joint else torch.cat([c_k, c_v], -1)
        else:
            q = self.q_proj(x).view(B, T, n_h, d_h + d_r)
            q_nope, q_pe = q.split([d_h, d_r], -1)
            c, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, d_r], -1)
        return q_nope.transpose(1, 2), q_pe.transpose(1, 2), c, k_pe

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, the attention weights [B, n_h, T, keys] with attn_implementation "eager", else None)."""
        B, T, _ = hidden_states.shape
        cos, sin = position_embeddings
        q_nope, q_pe, c, k_pe = self.project(hidden_states)
        q_pe = apply_rope(q_pe, cos, sin)
        c = c[:, None]                                   # [B, 1, T, r]
        k_pe = apply_rope(k_pe[:, None], cos, sin)       # [B, 1, T, d_r]
        if past_key_values is not None:
            c, k_pe = past_key_values.update(c, k_pe, self.layer_idx)
            attention_mask = mask_unwritten_rows(attention_mask, c.shape[2])
        if self.config.care_attention_path == "absorbed":
            out, weights = self._absorbed(q_nope, q_pe, c, k_pe, attention_mask)
        else:
            out, weights = self._plain(q_nope, q_pe, c, k_pe, attention_mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_h * self.d_h)
        return self.o_proj(out), weights

    @property
    def _eager(self) -> bool:
        return self.config._attn_implementation == "eager"

    def _plain(self, q_nope, q_pe, c, k_pe, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decompress: k_h = [W_UK_h c | rope(k_pe)], v_h = W_UV_h c; standard attention."""
        B, _, S, _ = c.shape
        kv = self.kv_b_proj(c[:, 0]).view(B, S, self.n_h, 2 * self.d_h).transpose(1, 2)
        k_nope, v = kv.split([self.d_h, self.d_h], -1)
        key = torch.cat([k_nope, k_pe.expand(B, self.n_h, S, self.d_r)], -1)
        query = torch.cat([q_nope, q_pe], -1)
        return attention(query, key, v, mask, self.scale, self._eager)

    def _absorbed(self, q_nope, q_pe, c, k_pe, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vLLM's MLA decode form: ql_h = W_UK_h^T q_nope_h scores against the latent c itself
        (one shared "head" of width r + d_r), the output is W_UV_h (softmax @ c)."""
        B, _, S, _ = c.shape
        w = self.kv_b_proj.weight.view(self.n_h, 2 * self.d_h, self.rank)
        w_uk, w_uv = w[:, : self.d_h], w[:, self.d_h:]          # [n_h, d_h, r] each
        ql = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        query = torch.cat([ql, q_pe], -1)                         # [B, n_h, T, r + d_r]
        key = torch.cat([c, k_pe], -1).expand(B, self.n_h, S, self.rank + self.d_r)
        value = c.expand(B, self.n_h, S, self.rank)
        o_latent, weights = attention(query, key, value, mask, self.scale, self._eager)
        return torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv), weights


class CareMLADecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block as in Llama; a GradientCheckpointingLayer so healing can trade compute
    for memory (it also switches the cache off while checkpointing)."""

    def __init__(self, config: CareMLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = CareMLAAttention(config, layer_idx)
        self.mlp = moe_block(config) if config.is_sparse_layer(layer_idx) else CareMLP(config)
        self.input_layernorm = CareRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = CareRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                 attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def with_real_past(attention_mask: torch.Tensor, keys: int) -> torch.Tensor:
    """A 2-D mask [B, n] over fewer than `keys` keys widened to `keys`: it covers the newest ones, and the cached
    past before it was real (a decode step given its new tokens' mask only). Longer masks are returned as given."""
    short = keys - attention_mask.shape[-1]
    return F.pad(attention_mask, (short, 0), value=1) if short > 0 else attention_mask


def build_attention_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, T, past+T] mask (True = may attend): causal AND key not padding.

    A padding query (left padding) would have no allowed key at all and SDPA would turn its row
    into NaN, which then leaks into nothing useful but poisons max/any checks; so every query may
    always attend to itself. Real queries never see padding keys.
    """
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is None:
        return allowed
    if attention_mask.ndim == 4:  # caller-built mask: bool keeps, float is additive
        return attention_mask
    pad = with_real_past(attention_mask.to(device=device, dtype=torch.bool), kv_len)[:, -kv_len:]
    return (allowed & pad[:, None, None, :]) | (k_pos == q_pos)[None, None]


class CareMLAPreTrainedModel(PreTrainedModel):
    config: CareMLAConfig
    config_class = CareMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CareMLADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _can_record_outputs = {"hidden_states": CareMLADecoderLayer, "attentions": CareMLAAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Generic init (normal linears/embeddings, unit norms) plus the rope buffer, which
        transformers leaves uninitialised when it loads a model via the meta device."""
        super()._init_weights(module)
        if isinstance(module, CareRope):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        std = self.config.initializer_range
        if isinstance(module, Qwen3MoeExperts):      # MoE experts: 3-D parameters, not nn.Linear
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, (Qwen3MoeTopKRouter, WeightMap)):
            init.normal_(module.weight, mean=0.0, std=std)

    def set_attention_path(self, path: str) -> None:
        """Switch every layer between "plain" and "absorbed" attention (same numbers)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
        self.config.care_attention_path = path

    @property
    def attention_path(self) -> str:
        return self.config.care_attention_path


class CareMLAModel(CareMLAPreTrainedModel):
    _auto_class = "AutoModel"   # (see CareMLAForCausalLM)

    def __init__(self, config: CareMLAConfig) -> None:
        config.validate_care()   # (from_pretrained sets its keyword overrides after the config's own checks)
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([CareMLADecoderLayer(config, l) for l in range(config.num_hidden_layers)])
        self.norm = CareRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = CareRope(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        B, T, _ = inputs_embeds.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self._default_position_ids(attention_mask, B, T, past_len, inputs_embeds.device)
        elif position_ids.ndim == 1:
            position_ids = position_ids[None]
        position_ids = position_ids.expand(B, T)
        mask = build_attention_mask(attention_mask, B, T, past_len, inputs_embeds.device)
        position_embeddings = self.rotary_emb(position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, past_key_values=past_key_values,
                                  use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)

    @staticmethod
    def _default_position_ids(attention_mask, batch, q_len, past_len, device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded row is rotated exactly like the
        same row without padding (generate() passes the same thing explicitly). A mask shorter than past + new
        tokens is read as build_attention_mask reads it (with_real_past): a decode step given the new token's mask
        alone sits at position past_len, not 0."""
        if attention_mask is not None and attention_mask.ndim == 2:
            real = with_real_past(attention_mask.long(), past_len + q_len)
            pos = (real.cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            return pos.to(device)
        return (torch.arange(q_len, device=device) + past_len)[None].expand(batch, q_len)


class CareMLAForCausalLM(CareMLAPreTrainedModel, GenerationMixin):
    """Causal LM over `CareMLAModel`.

    Instantiating this class gives a `CareLlamaForCausalLM`, `CareQwen3ForCausalLM`, `CareQwen3MoeForCausalLM`
    or `CareMixtralForCausalLM` (chosen by config.use_qk_norm and config.num_experts): save_pretrained writes the class name into config.architectures and
    vLLM dispatches on that name, so a healed model must keep the variant name.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # save_pretrained copies this file and configuration_care.py beside the weights, as for a model loaded with
    # trust_remote_code: the auto_map a converted config carries names them, and a folder saved after
    # `import model_defs` (a user's own fine-tune, pushed to the Hub) would otherwise not load without care-vllm
    _auto_class = "AutoModelForCausalLM"

    def __new__(cls, *args, **kwargs):
        config = args[0] if args else kwargs.get("config")
        # by model_type, not isinstance: loaded with trust_remote_code, the config's class comes from another
        # dynamic module than this file's import of it (transformers hashes the two files apart)
        if cls is CareMLAForCausalLM and getattr(config, "model_type", None) == CareMLAConfig.model_type:
            cls = globals()[config.variant_architecture()]
        return super().__new__(cls)

    def __init__(self, config: CareMLAConfig) -> None:
        super().__init__(config)
        self.model = CareMLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class CareLlamaForCausalLM(CareMLAForCausalLM):
    """Converted from a Llama source (use_qk_norm = false)."""


class CareQwen3ForCausalLM(CareMLAForCausalLM):
    """Converted from a Qwen3 source (use_qk_norm = true, exact per-head norms kept)."""


class CareQwen3MoeForCausalLM(CareMLAForCausalLM):
    """Converted from a Qwen3-MoE source (as Qwen3, with the sparse MLP copied unchanged)."""


class CareMixtralForCausalLM(CareMLAForCausalLM):
    """Converted from a Mixtral source (Llama's attention; its sparse MLP copied unchanged, which is Qwen3-MoE's
    on every layer with normalized top-k weights)."""


__all__ = [
    "CareMLAPreTrainedModel", "CareMLAModel", "CareMLAForCausalLM",
    "CareLlamaForCausalLM", "CareQwen3ForCausalLM", "CareQwen3MoeForCausalLM", "CareMixtralForCausalLM",
    "CareMLAAttention",
    "build_attention_mask",
]


def _register_real_classes() -> None:
    """Swap the lazy Auto-registry stand-ins of model_defs/__init__ for the real classes.

    Nothing to swap when this file is the copy that care-convert writes beside the weights and
    transformers loads with `trust_remote_code=True` (its package is then transformers' dynamic
    module folder, which has no `register`: config.json's `auto_map` names the classes instead)."""
    try:
        from . import register
    except ImportError:
        return
    register(CareMLAModel, CareMLAForCausalLM)


_register_real_classes()
