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

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
from vllm.model_executor.utils import replace_parameter
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .common import RelaxedHeadSizeBuilderMixin


class CareCPUMLAMetadataBuilder(RelaxedHeadSizeBuilderMixin, MLACommonMetadataBuilder):
    pass


def paged_latent_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                        k_rank: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode, one query token per request.

    q [B, N, r + d_r] (ql_nope | rope(q_pe)), cache [num_blocks, block_size, r + d_r]
    (c | rope(k_pe)) -> [B, N, r] = softmax(scale * q . cache[:seq_len]) @ cache[:seq_len, :r].
    With `k_rank` (key/value split, see the module docstring) q is [B, N, k_rank + d_r] (ql_nope
    over c_K | rope(q_pe)): scores = q . [c_K | k_pe], values = c_V, and the output's first k_rank
    columns are zero.
    Gathers whole blocks (one index_select over the block dim: contiguous copies, half the time of
    indexing every token's (block, offset) pair) up to the longest request, then two bmm's with the
    positions past each request's length masked out.
    """
    B = q.shape[0]
    block_size, width = cache.shape[1], cache.shape[2]
    r = kv_lora_rank
    lens = seq_lens.to(torch.long)
    num_blocks = -(-int(lens.max()) // block_size) if B else 0
    blocks = block_table[:, :num_blocks].to(torch.long).reshape(-1)
    kv = cache.index_select(0, blocks).view(B, num_blocks * block_size, width).float()   # [B, T, C]
    qf = q.float()
    if k_rank is None:
        scores = torch.bmm(qf, kv.transpose(1, 2))                                        # [B, N, T]
        values = kv[..., :r]
    else:
        scores = torch.bmm(qf[..., :k_rank], kv[..., :k_rank].transpose(1, 2))
        scores.baddbmm_(qf[..., k_rank:], kv[..., r:].transpose(1, 2))
        values = kv[..., k_rank:r]
    scores.mul_(scale)
    pos = torch.arange(num_blocks * block_size, device=q.device)
    scores.masked_fill_((pos.unsqueeze(0) >= lens.unsqueeze(1)).unsqueeze(1), float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), values)
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
                                  self.scale, self.kv_lora_rank, self.k_rank)
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
