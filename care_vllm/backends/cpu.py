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

Short prefills. Requests with at most `CARE_VLLM_CPU_LATENT_PREFILL_TOKENS` (default 128) new tokens
in a step are handed to the decode path too (the builder's `reorder_batch_threshold`): short prompts,
a chat's next turn over its cached history, the last chunk of a chunked prefill. vLLM's MLA prefill
would up-project every new token and, with a cached prefix, gather and up-project every cached token
of it through kv_b_proj (n_h x (d_nope + d_v) values per token, at every such step and layer) and
merge two attentions by log-sum-exp; the latent form reads the cached rows as they are. A step's
requests are planned in groups, so that a decode is not padded to a prompt's length nor a short
context to a long one's (plan_latent_decode), and a group's score matrix is computed in row slices
of at most SCORES_BUDGET_BYTES. 1 restores vLLM's split (single-token decodes only). Measured:
benchmarks/results/cpu_short_prefill.md.

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

import os
from dataclasses import dataclass, field

import torch
from vllm.model_executor.layers.attention.mla_attention import (MLACommonDecodeMetadata, MLACommonMetadataBuilder,
                                                                QueryLenSupport)
from vllm.model_executor.utils import replace_parameter
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .common import RelaxedHeadSizeBuilderMixin


LATENT_PREFILL_ENV = "CARE_VLLM_CPU_LATENT_PREFILL_TOKENS"
DEFAULT_LATENT_PREFILL_TOKENS = 128
SCORES_BUDGET_BYTES = 64 << 20   # a group's fp32 score matrix is computed in row slices of at most this size
# a decode group's fixed cost (a block gather and a few bmm's per layer: ~40-50 us on one of this
# machine's cores) in what one new token's scores and values over one cached row cost (~0.15-0.2 us):
# plan_latent_decode pads a request into a group when that costs fewer (new token x cached row) products,
# else groups it apart. Per torch thread: the per-row cost divides among threads, the fixed one does not.
GROUP_COST_ROWS = 256


def latent_prefill_tokens() -> int:
    """Requests with at most this many new tokens in a step attend in the latent (absorbed) form, as
    decodes do, instead of vLLM's MLA prefill (module docstring: "Short prefills").
    `CARE_VLLM_CPU_LATENT_PREFILL_TOKENS` (1: decodes only, as vLLM's own MLA backends)."""
    raw = os.environ.get(LATENT_PREFILL_ENV)
    if raw is None:
        return DEFAULT_LATENT_PREFILL_TOKENS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{LATENT_PREFILL_ENV}={raw!r}: expected a whole number >= 1 (1 = only single-token "
                         f"decodes take the latent path; default {DEFAULT_LATENT_PREFILL_TOKENS})")
    return value


@dataclass
class LatentDecodeGroup:
    """Requests decoded together in one pair of bmm's: each one's new tokens padded to Q rows, its
    context to the group's T cached rows."""
    tokens: torch.Tensor | None     # the group's rows of the step's decode tokens (None: all, in order)
    blocks: torch.Tensor            # [B * num_blocks] long: the cache blocks to gather, request-major
    bias: torch.Tensor              # [B, Q, 1, T] fp32: 0 where new token j may look, -inf past it
    token_req: torch.Tensor | None  # Q > 1: each new token's request and row in the padded [B, Q] query
    token_j: torch.Tensor | None


@dataclass
class LatentDecodePlan:
    """What every layer of a KV-cache group shares in one decode step: computed once per step (per
    block size) instead of once per layer, since the per-layer kernel is small enough on CPU that its
    index arithmetic showed up next to the bmm's. Requests whose padding to a common shape would cost
    more than a group (a decode beside a prompt, a short context beside a long one) are in different
    groups (plan_latent_decode)."""
    groups: list[LatentDecodeGroup]


def _plan_group(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                q_lens: torch.Tensor | None, tokens: torch.Tensor | None) -> LatentDecodeGroup:
    B, dev = seq_lens.shape[0], seq_lens.device
    lens = seq_lens.to(torch.long)
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
    return LatentDecodeGroup(tokens=tokens, blocks=blocks, bias=bias, token_req=token_req, token_j=token_j)


def _padding_groups(q_lens: list[int], lens: list[int], group_cost: int) -> list[list[int]]:
    """The requests (new tokens `q_lens`, contexts `lens`) split into groups, each padded to its longest
    context and most new tokens. Greedy over the requests by context, longest first: a request joins
    the group where padding it costs least, if that is less than a group costs (`group_cost`), else
    starts a group. Padding is counted in (new token x cached row) products: joining a group of n
    requests padded to [Q, T] costs (n + 1) max(Q, q) T - n Q T - q t. Each group lists its requests in
    their batch order."""
    groups: list[list] = []   # [members, Q, T]
    for b in sorted(range(len(lens)), key=lambda b: (-lens[b], -q_lens[b])):
        best, best_cost = None, group_cost
        for g in groups:
            n, q, t = len(g[0]), g[1], g[2]
            cost = (n + 1) * max(q, q_lens[b]) * t - n * q * t - q_lens[b] * lens[b]
            if cost < best_cost:
                best, best_cost = g, cost
        if best is None:
            groups.append([[b], q_lens[b], lens[b]])
        else:
            best[0].append(b)
            best[1] = max(best[1], q_lens[b])
    return [sorted(g[0]) for g in groups]


def plan_latent_decode(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                       query_start_loc: torch.Tensor | None = None) -> LatentDecodePlan:
    """One token per request, or with `query_start_loc` [B + 1] request b's new tokens
    qsl[b]:qsl[b+1], the last ones of its seq_lens[b]: new token j sees the cache up to its own
    position (causal), i.e. seq_lens[b] - n_b + j + 1 rows.

    Requests are grouped so that padding them to a common context and number of new tokens costs
    less than a separate group would (_padding_groups): a decode over 100 cached tokens beside one over
    4000 would otherwise attend over 4000 masked rows, and a decode beside a 100-token prompt over 100
    query rows."""
    B, dev = seq_lens.shape[0], seq_lens.device
    q_lens = None if query_start_loc is None else \
        (query_start_loc[1: B + 1] - query_start_loc[:B]).to(device=dev, dtype=torch.long)
    members = _padding_groups([1] * B if q_lens is None else q_lens.tolist(), seq_lens.tolist(),
                              GROUP_COST_ROWS * torch.get_num_threads())
    if len(members) <= 1:
        return LatentDecodePlan([_plan_group(block_table, seq_lens, block_size, q_lens, None)])
    token_req = torch.arange(B, device=dev) if q_lens is None else \
        torch.repeat_interleave(torch.arange(B, device=dev), q_lens)
    groups = []
    for reqs in members:
        mask = torch.zeros(B, dtype=torch.bool, device=dev)
        mask[reqs] = True
        idx = torch.tensor(reqs, device=dev)
        groups.append(_plan_group(block_table[idx], seq_lens[idx], block_size,
                                  None if q_lens is None else q_lens[idx], mask[token_req].nonzero().flatten()))
    return LatentDecodePlan(groups)


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
    """
    if isinstance(q, tuple) and k_rank is None:
        q = torch.cat(q, dim=-1)
    parts = q if isinstance(q, tuple) else ((q[..., :k_rank], q[..., k_rank:]) if k_rank else (q,))
    if len(plan.groups) == 1 and plan.groups[0].tokens is None:
        return _latent_decode_group(parts, cache, plan.groups[0], scale, kv_lora_rank, k_rank)
    out = None
    for group in plan.groups:
        group_out = _latent_decode_group([x.index_select(0, group.tokens) for x in parts], cache, group,
                                         scale, kv_lora_rank, k_rank)
        if out is None:
            out = group_out.new_empty(parts[0].shape[0], *group_out.shape[1:])
        out.index_copy_(0, group.tokens, group_out)
    return out


def _latent_decode_group(parts, cache: torch.Tensor, group: LatentDecodeGroup, scale: float, r: int,
                         k_rank: int | None) -> torch.Tensor:
    """One group's tokens: gathers whole blocks (one index_select over the block dim: contiguous copies,
    half the time of indexing every token's (block, offset) pair) up to the group's longest request,
    then two bmm's per request over all its new tokens and heads at once; the scale and the causal
    mask (an additive -inf bias) are applied by the score bmm itself (baddbmm)."""
    B, Q, _, T = group.bias.shape
    N = parts[0].shape[1]
    if group.token_req is not None:               # [tokens, N, C] -> [B, Q, N, C], zero rows for padding
        padded = []
        for x in parts:
            xb = x.new_zeros(B, Q, N, x.shape[-1])
            xb[group.token_req, group.token_j] = x
            padded.append(xb)
        parts = padded
    parts = [x.float().reshape(B, Q * N, x.shape[-1]) for x in parts]
    kv = cache.index_select(0, group.blocks).view(B, T, cache.shape[2]).float()           # [B, T, C]
    if k_rank is None:
        keys, values = (kv.transpose(1, 2),), kv[..., :r]
    else:
        keys, values = (kv[..., :k_rank].transpose(1, 2), kv[..., r:].transpose(1, 2)), kv[..., k_rank:r]
    token_bias = group.bias.view(B, Q, T)
    rows = Q * N                                   # query row q * N + n: new token q, head n

    def attend(lo: int, hi: int) -> torch.Tensor:  # query rows [lo, hi) -> [B, hi - lo, V]
        # Q == 1: one bias row, broadcast by baddbmm; else each row's token's, for these rows only
        bias = token_bias if Q == 1 else token_bias.index_select(
            1, torch.arange(lo, hi, device=token_bias.device) // N)
        scores = torch.baddbmm(bias, parts[0][:, lo:hi], keys[0], alpha=scale)
        if len(keys) == 2:
            scores.baddbmm_(parts[1][:, lo:hi], keys[1], alpha=scale)
        return torch.bmm(torch.softmax(scores, dim=-1), values)

    step = max(1, SCORES_BUDGET_BYTES // (4 * B * T))   # query rows per pass: [B, rows, T] fp32 scores and bias
    if step >= rows:
        out = attend(0, rows)
    else:
        out = parts[0].new_empty(B, rows, values.shape[-1])
        for lo in range(0, rows, step):
            out[:, lo:lo + step] = attend(lo, min(lo + step, rows))
    out = out.view(B, Q, N, -1)
    return out.view(B, N, -1) if group.token_req is None else out[group.token_req, group.token_j]


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
    # "decode" requests may carry several new tokens each: short prompts and prompt chunks (up to
    # latent_prefill_tokens()) and speculative decoding's drafts
    query_len_support = QueryLenSupport.VARLEN

    def __init__(self, *args, **kwargs):
        # read by MLACommonMetadataBuilder.__init__ (which raises it further for speculative decoding)
        self.reorder_batch_threshold = latent_prefill_tokens()
        super().__init__(*args, **kwargs)
        if self.reorder_batch_threshold > 1:
            from vllm.logger import init_logger

            init_logger("vllm.care_vllm").info_once(
                "care_vllm: requests with up to %d new tokens attend in the latent (absorbed) form on CPU "
                "(%s; speculative decoding raises it to 1 + its draft tokens)",
                self.reorder_batch_threshold, LATENT_PREFILL_ENV)

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
    reads the width from W_UV). Returns whether it did. Called again after each weight reload, which re-absorbs
    the full-width W_UK_T and W_UV: the decode form is decided afresh (a trained kv_b_proj need not keep the zero
    blocks; the decode split at the first load's k_rank then crashed the engine on the next request)."""
    impl = layer.impl
    w_uk_t, w_uv = getattr(layer, "W_UK_T", None), getattr(layer, "W_UV", None)
    if not isinstance(impl, CareCPUMLAImpl) or w_uk_t is None or w_uv is None:
        return False
    impl.k_rank = None   # (the full latent, as W_UK_T and W_UV now are)
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
