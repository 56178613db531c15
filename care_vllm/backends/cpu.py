"""CPU latent-attention backend for any cache width.

vLLM 0.32's CPU_MLA backend decodes with `torch.ops._C.mla_decode_kvcache`, compiled only for
width 576 (kv_lora_rank 512 + rope 64) and block size 16. This subclass keeps everything else of
CPU_MLA (SDPA prefill through the CPU MLA prefill backend, torch cache writes, the shared
MLACommon scaffolding that does the W_UK/W_UV absorption) and replaces:

* `forward_mqa` (decode): a paged MQA in PyTorch over the layer's own `[blocks, block, r + d_r]`
  cache, any width, any block size, fp32 softmax;
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
loading; when the blocks are exactly zero it narrows W_UK to c_K and the decode reads
[c_K | k_pe] for the scores and c_V for the values (0.55-0.75x the attention FLOPs on SmolLM2 at
KV 0.5; the output's c_K part is zero, as W_UV's rows there are). A healed checkpoint whose zero
blocks were trained keeps the joint path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention.mla_attention import (MLACommonDecodeMetadata, MLACommonMetadataBuilder,
                                                                QueryLenSupport)
from vllm.model_executor.utils import replace_parameter
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .common import RelaxedHeadSizeBuilderMixin


@dataclass
class CareCPUDecodeMetadata(MLACommonDecodeMetadata):
    query_start_loc: torch.Tensor | None = None   # [num_decodes + 1]: each decode request's new tokens


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

    def _build_decode(self, *, query_start_loc_cpu, **kw) -> CareCPUDecodeMetadata:
        base = super()._build_decode(query_start_loc_cpu=query_start_loc_cpu, **kw)
        return CareCPUDecodeMetadata(block_table=base.block_table, seq_lens=base.seq_lens,
                                     dcp_tot_seq_lens=base.dcp_tot_seq_lens, query_start_loc=query_start_loc_cpu)


def paged_latent_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                        k_rank: int | None = None, query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode.

    q [tokens, N, r + d_r] (ql_nope | rope(q_pe)), cache [num_blocks, block_size, r + d_r]
    (c | rope(k_pe)) -> [tokens, N, r] = softmax(scale * q . cache[:visible]) @ cache[:visible, :r].
    One token per request, or with `query_start_loc` [B + 1] request b's new tokens
    q[qsl[b]:qsl[b+1]], the last ones of its seq_lens[b]: new token j sees the cache up to its own
    position (causal), i.e. seq_lens[b] - n_b + j + 1 rows.
    With `k_rank` (key/value split, see the module docstring) q is [tokens, N, k_rank + d_r]
    (ql_nope over c_K | rope(q_pe)): scores = q . [c_K | k_pe], values = c_V, and the output's first
    k_rank columns are zero.
    Gathers whole blocks (one index_select over the block dim: contiguous copies, half the time of
    indexing every token's (block, offset) pair) up to the longest request, then two bmm's per
    request over all its new tokens and heads at once, positions past each token's limit masked out
    by an additive bias fused into the score bmm.
    """
    B, N = seq_lens.shape[0], q.shape[1]
    block_size, width = cache.shape[1], cache.shape[2]
    r = kv_lora_rank
    lens = seq_lens.to(torch.long)
    if query_start_loc is None:                   # plain decode: tokens are requests
        Q, token_req, token_j, qb = 1, None, None, q
        visible = lens.view(B, 1)                 # [B, Q]: rows each new token sees
    else:                                         # pad each request's new tokens to Q rows
        q_lens = (query_start_loc[1: B + 1] - query_start_loc[:B]).to(device=q.device, dtype=torch.long)
        Q = int(q_lens.max()) if B else 1
        token_req = torch.repeat_interleave(torch.arange(B, device=q.device), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_j = torch.arange(q.shape[0], device=q.device) - starts[token_req]
        qb = q.new_zeros(B, Q, N, q.shape[-1])
        qb[token_req, token_j] = q
        visible = (lens - q_lens).unsqueeze(1) + torch.arange(1, Q + 1, device=q.device)
    qf = qb.float().reshape(B, Q * N, q.shape[-1])
    num_blocks = -(-int(lens.max()) // block_size) if B else 0
    blocks = block_table[:, :num_blocks].to(torch.long).reshape(-1)
    kv = cache.index_select(0, blocks).view(B, num_blocks * block_size, width).float()   # [B, T, C]
    # positions past each new token's own are masked by an additive -inf bias that the score bmm
    # adds as it writes (baddbmm: bias + scale * q.k), not by separate scale and mask passes
    T = num_blocks * block_size
    hidden = torch.arange(T, device=q.device).view(1, 1, 1, T) >= visible.view(B, Q, 1, 1)      # [B, Q, 1, T]
    bias = torch.zeros(B, Q, 1, T, device=q.device).masked_fill_(hidden, float("-inf"))
    bias = bias.view(B, 1, T) if Q == 1 else bias.expand(B, Q, N, T).reshape(B, Q * N, T)
    if k_rank is None:
        scores = torch.baddbmm(bias, qf, kv.transpose(1, 2), alpha=scale)                     # [B, Q*N, T]
        values = kv[..., :r]
    else:
        scores = torch.baddbmm(bias, qf[..., :k_rank], kv[..., :k_rank].transpose(1, 2), alpha=scale)
        scores.baddbmm_(qf[..., k_rank:], kv[..., r:].transpose(1, 2), alpha=scale)
        values = kv[..., k_rank:r]
    out = torch.bmm(torch.softmax(scores, dim=-1), values).view(B, Q, N, -1)
    out = out.view(B, N, -1) if token_req is None else out[token_req, token_j]
    return out if k_rank is None else F.pad(out, (k_rank, 0))


def use_key_value_split(layer, k_rank: int) -> bool:
    """After `layer` (an MLAAttention on this backend) absorbed kv_b_proj into W_UK_T [N, P, r] and
    W_UV [N, r, V]: if keys read only the first `k_rank` latent columns and values only the rest
    (exact zeros elsewhere), narrow W_UK_T to [N, P, k_rank] and switch the decode to the split
    form. Returns whether it did."""
    impl = layer.impl
    w_uk_t, w_uv = getattr(layer, "W_UK_T", None), getattr(layer, "W_UV", None)
    if not isinstance(impl, CareCPUMLAImpl) or w_uk_t is None or w_uv is None:
        return False
    r = w_uk_t.shape[-1]
    if not 0 < k_rank < r or w_uk_t[..., k_rank:].any() or w_uv[:, :k_rank].any():
        return False
    replace_parameter(layer, "W_UK_T", w_uk_t[..., :k_rank].contiguous())
    impl.k_rank = k_rank
    return True


class CareCPUMLAImpl(CPUMLAImpl):
    k_rank: int | None = None  # set by use_key_value_split: decode over [c_K | k_pe] and c_V

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode = attn_metadata.decode
        out = paged_latent_decode(q, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens,
                                  self.scale, self.kv_lora_rank, self.k_rank, decode.query_start_loc)
        return out.to(q.dtype), None

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
