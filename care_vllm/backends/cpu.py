"""CPU latent-attention backend for any cache width.

vLLM 0.32's CPU_MLA backend decodes with `torch.ops._C.mla_decode_kvcache`, compiled only for
width 576 (kv_lora_rank 512 + rope 64) and block size 16. This subclass keeps everything else of
CPU_MLA (SDPA prefill through the CPU MLA prefill backend, torch cache writes, the shared
MLACommon scaffolding that does the W_UK/W_UV absorption) and replaces:

* `forward_mqa` (decode): a paged MQA in PyTorch over the layer's own `[blocks, block, r + d_r]`
  cache, any width, any block size, fp32 softmax; the gather indices and causal mask are built
  once per step and shared by the layers (`LatentDecodePlan` on the decode metadata);
* `do_kv_cache_update`: one `index_copy_` of the [c | k_pe] rows (CPU_MLA writes the two parts
  with two advanced-index assignments: three times slower per decode step);
* the head-size gates: `get_supported_head_sizes()` is empty (= any) and the metadata builder
  produces `CareMLAMetadata` (no global {320,512,576} check).
* multi-token decode (`query_len_support = VARLEN`): with speculative decoding a request verifies
  1 + k tokens per step. CPU_MLA decodes one token per request, so vLLM would send those requests
  through the prefill-over-cached-context path, which gathers the whole context and up-projects
  it with kv_b_proj (n_h x 2 d_h values per cached token) at every step; here they stay in the
  absorbed decode (causal within the request's new tokens), like a plain decode step.

Key/value split of the latent. A care_mla layer's latent is [c_K (r_K) | c_V (r_V)], and as
converted its kv_b_proj is block-diagonal: keys read only c_K, values only c_V. vLLM's absorbed
decode treats the latent as one joint vector, so its scores run over all r_K + r_V + d_r columns
(the c_V part against zeros in the absorbed query) and its output over all r_K + r_V (the c_K part
multiplied by zero rows of W_UV). `use_key_value_split` checks the layer's absorbed weights after
loading; when the blocks are exactly zero it narrows W_UK to c_K and W_UV to c_V, and the decode
reads [c_K | k_pe] for the scores and c_V for the values and returns only the c_V part of the
output (0.55-0.75x the attention FLOPs on SmolLM2 at KV 0.5). A healed checkpoint whose zero
blocks were trained keeps the joint path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.model_executor.layers.attention.mla_attention import (MLACommonDecodeMetadata, MLACommonMetadataBuilder,
                                                                QueryLenSupport)
from vllm.model_executor.utils import replace_parameter
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .common import RelaxedHeadSizeBuilderMixin


@dataclass
class LatentDecodePlan:
    """What every layer of a KV-cache group shares in one decode step: computed once per step (per
    block size) instead of once per layer, since the per-layer kernel is small enough on CPU that its
    index arithmetic showed up next to the bmm's."""
    blocks: torch.Tensor            # [B * num_blocks] long: the cache blocks to gather, request-major
    bias: torch.Tensor              # [B, Q, 1, T] fp32: 0 where new token j may look, -inf past it
    token_req: torch.Tensor | None  # Q > 1: each new token's request and row in the padded [B, Q] query
    token_j: torch.Tensor | None


def plan_latent_decode(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                       query_start_loc: torch.Tensor | None = None) -> LatentDecodePlan:
    """One token per request, or with `query_start_loc` [B + 1] request b's new tokens
    qsl[b]:qsl[b+1], the last ones of its seq_lens[b]: new token j sees the cache up to its own
    position (causal), i.e. seq_lens[b] - n_b + j + 1 rows."""
    B, dev = seq_lens.shape[0], seq_lens.device
    lens = seq_lens.to(torch.long)
    q_lens = None if query_start_loc is None else (
        (query_start_loc[1: B + 1] - query_start_loc[:B]).to(device=dev, dtype=torch.long))
    Q = int(q_lens.max()) if q_lens is not None and B else 1
    if Q == 1:                                    # plain decode: tokens are requests
        token_req = token_j = None
        visible = lens.view(B, 1)                 # [B, Q]: rows each new token sees
    else:                                         # pad each request's new tokens to Q rows
        token_req = torch.repeat_interleave(torch.arange(B, device=dev), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_j = torch.arange(token_req.shape[0], device=dev) - starts[token_req]
        visible = (lens - q_lens).unsqueeze(1) + torch.arange(1, Q + 1, device=dev)
    num_blocks = -(-int(lens.max()) // block_size) if B else 0
    T = num_blocks * block_size
    hidden = torch.arange(T, device=dev).view(1, 1, 1, T) >= visible.view(B, Q, 1, 1)
    bias = torch.zeros(B, Q, 1, T, device=dev).masked_fill_(hidden, float("-inf"))
    blocks = block_table[:, :num_blocks].to(torch.long).reshape(-1)
    return LatentDecodePlan(blocks=blocks, bias=bias, token_req=token_req, token_j=token_j)


def latent_decode(q: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cache: torch.Tensor,
                  plan: LatentDecodePlan, scale: float, kv_lora_rank: int,
                  k_rank: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode of the tokens `plan` describes.

    q [tokens, N, r + d_r] (ql_nope | rope(q_pe)), or the pair (ql_nope, rope(q_pe)) as vLLM's MLA
    layer hands it over; cache [num_blocks, block_size, r + d_r] (c | rope(k_pe)) ->
    [tokens, N, r] = softmax(scale * q . cache[:visible]) @ cache[:visible, :r].
    With `k_rank` (key/value split, see the module docstring) ql_nope is over c_K only
    ([tokens, N, k_rank]): scores = q . [c_K | k_pe], values = c_V, and the output is
    [tokens, N, r - k_rank], the c_V part (the c_K part would be zero: W_UV's rows there are).
    Gathers whole blocks (one index_select over the block dim: contiguous copies, half the time of
    indexing every token's (block, offset) pair) up to the longest request, then two bmm's per
    request over all its new tokens and heads at once; the scale and the causal mask (an additive
    -inf bias) are applied by the score bmm itself (baddbmm).
    """
    r = kv_lora_rank
    B, Q, _, T = plan.bias.shape
    if isinstance(q, tuple) and k_rank is None:
        q = torch.cat(q, dim=-1)
    parts = q if isinstance(q, tuple) else ((q[..., :k_rank], q[..., k_rank:]) if k_rank else (q,))
    N = parts[0].shape[1]
    if plan.token_req is not None:                # [tokens, N, C] -> [B, Q, N, C], zero rows for padding
        padded = []
        for x in parts:
            xb = x.new_zeros(B, Q, N, x.shape[-1])
            xb[plan.token_req, plan.token_j] = x
            padded.append(xb)
        parts = padded
    parts = [x.float().reshape(B, Q * N, x.shape[-1]) for x in parts]
    kv = cache.index_select(0, plan.blocks).view(B, T, cache.shape[2]).float()           # [B, T, C]
    bias = plan.bias.view(B, 1, T) if Q == 1 else plan.bias.expand(B, Q, N, T).reshape(B, Q * N, T)
    if k_rank is None:
        scores = torch.baddbmm(bias, parts[0], kv.transpose(1, 2), alpha=scale)           # [B, Q*N, T]
        values = kv[..., :r]
    else:
        scores = torch.baddbmm(bias, parts[0], kv[..., :k_rank].transpose(1, 2), alpha=scale)
        scores.baddbmm_(parts[1], kv[..., r:].transpose(1, 2), alpha=scale)
        values = kv[..., k_rank:r]
    out = torch.bmm(torch.softmax(scores, dim=-1), values).view(B, Q, N, -1)
    return out.view(B, N, -1) if plan.token_req is None else out[plan.token_req, plan.token_j]


def paged_latent_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                        k_rank: int | None = None, query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
    """`latent_decode` with its plan built here (one layer on its own; see plan_latent_decode)."""
    plan = plan_latent_decode(block_table, seq_lens, cache.shape[1], query_start_loc)
    return latent_decode(q, cache, plan, scale, kv_lora_rank, k_rank)


@dataclass
class CareCPUDecodeMetadata(MLACommonDecodeMetadata):
    query_start_loc: torch.Tensor | None = None   # [num_decodes + 1] when a request has several new tokens
    plans: dict = field(default_factory=dict)      # block size -> LatentDecodePlan, built by the first layer

    def plan(self, block_size: int) -> LatentDecodePlan:
        if block_size not in self.plans:
            self.plans[block_size] = plan_latent_decode(self.block_table, self.seq_lens, block_size,
                                                        self.query_start_loc)
        return self.plans[block_size]


class CareCPUMLAMetadataBuilder(RelaxedHeadSizeBuilderMixin, MLACommonMetadataBuilder):
    # decode requests may carry several new tokens each (speculative decoding's drafts, short
    # prefill chunks): vLLM then raises the decode threshold to 1 + num_speculative_tokens
    query_len_support = QueryLenSupport.VARLEN

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.reorder_batch_threshold > 1:
            from vllm.logger import init_logger

            init_logger("vllm.care_vllm").info_once(
                "care_vllm: CPU latent decode takes up to %d new tokens per request (speculative decoding)",
                self.reorder_batch_threshold)

    def _build_decode(self, *, query_start_loc_cpu, num_decode_tokens, **kw) -> CareCPUDecodeMetadata:
        base = super()._build_decode(query_start_loc_cpu=query_start_loc_cpu,
                                     num_decode_tokens=num_decode_tokens, **kw)
        several = num_decode_tokens > query_start_loc_cpu.shape[0] - 1   # some request has > 1 new token
        return CareCPUDecodeMetadata(block_table=base.block_table, seq_lens=base.seq_lens,
                                     dcp_tot_seq_lens=base.dcp_tot_seq_lens,
                                     query_start_loc=query_start_loc_cpu if several else None)


def use_key_value_split(layer, k_rank: int) -> bool:
    """After `layer` (an MLAAttention on this backend) absorbed kv_b_proj into W_UK_T [N, P, r] and
    W_UV [N, r, V]: if keys read only the first `k_rank` latent columns and values only the rest
    (exact zeros elsewhere), narrow W_UK_T to [N, P, k_rank] and W_UV to [N, r - k_rank, V] and
    switch the decode to the split form (its output is the c_V part only; the layer's _v_up_proj
    reads the width from W_UV). Returns whether it did."""
    impl = layer.impl
    w_uk_t, w_uv = getattr(layer, "W_UK_T", None), getattr(layer, "W_UV", None)
    if not isinstance(impl, CareCPUMLAImpl) or w_uk_t is None or w_uv is None:
        return False
    r = w_uk_t.shape[-1]
    if not 0 < k_rank < r or w_uk_t[..., k_rank:].any() or w_uv[:, :k_rank].any():
        return False
    replace_parameter(layer, "W_UK_T", w_uk_t[..., :k_rank].contiguous())
    replace_parameter(layer, "W_UV", w_uv[:, k_rank:].contiguous())
    impl.k_rank = k_rank
    return True


class CareCPUMLAImpl(CPUMLAImpl):
    k_rank: int | None = None  # set by use_key_value_split: decode over [c_K | k_pe] and c_V

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "Pad" the decode query to exactly num_heads heads: no padding, but it makes vLLM's MLA layer
        # absorb W_UK into a contiguous (N, B, L) buffer (then viewed as (B, N, L)). Without it the
        # layer's bmm writes through a transposed (B, N, L) `out=`, which PyTorch's CPU bmm does 4x
        # slower than the contiguous bmm plus a copy (measured: 69 vs 15 us at SmolLM2 shapes).
        if self.q_pad_num_heads is None:
            self.q_pad_num_heads = self.num_heads

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        plan = attn_metadata.decode.plan(kv_c_and_k_pe_cache.shape[1])
        out = latent_decode(q, kv_c_and_k_pe_cache, plan, self.scale, self.kv_lora_rank, self.k_rank)
        return out.to(kv_c_and_k_pe_cache.dtype), None

    def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale):
        """Write rows [c | k_pe] at `slot_mapping` (padding slots are -1 and skipped)."""
        if kv_cache.numel() == 0:
            return
        flat = kv_cache.view(-1, kv_cache.shape[-1])
        slots = slot_mapping.flatten().to(torch.long)
        rows = torch.cat([kv_c_normed, k_pe.reshape(k_pe.shape[0], -1)], dim=-1)
        valid = slots >= 0
        if not bool(valid.all()):
            slots, rows = slots[valid], rows[valid]
        flat.index_copy_(0, slots, rows.to(flat.dtype))


class CareCPUMLABackend(CPUMLABackend):
    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any width

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return True

    @staticmethod
    def get_impl_cls():
        return CareCPUMLAImpl

    @staticmethod
    def get_builder_cls():
        return CareCPUMLAMetadataBuilder
