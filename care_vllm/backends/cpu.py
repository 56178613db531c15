"""CPU latent-attention backend for any cache width.

vLLM 0.32's CPU_MLA backend decodes with `torch.ops._C.mla_decode_kvcache`, compiled only for
width 576 (kv_lora_rank 512 + rope 64) and block size 16. This subclass keeps everything else of
CPU_MLA (SDPA prefill through the CPU MLA prefill backend, torch cache writes, the shared
MLACommon scaffolding that does the W_UK/W_UV absorption) and replaces:

* `forward_mqa` (decode): a paged MQA in PyTorch over the layer's own `[blocks, block, r + d_r]`
  cache, any width, any block size, fp32 softmax;
* the head-size gates: `get_supported_head_sizes()` is empty (= any) and the metadata builder
  produces `CareMLAMetadata` (no global {320,512,576} check).
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadataBuilder
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend, CPUMLAImpl

from .common import RelaxedHeadSizeBuilderMixin


class CareCPUMLAMetadataBuilder(RelaxedHeadSizeBuilderMixin, MLACommonMetadataBuilder):
    pass


def paged_latent_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA decode, one query token per request.

    q [B, N, r + d_r] (ql_nope | rope(q_pe)), cache [num_blocks, block_size, r + d_r]
    (c | rope(k_pe)) -> [B, N, r] = softmax(scale * q . cache[:seq_len]) @ cache[:seq_len, :r].
    Gathers whole blocks (one index_select over the block dim: contiguous copies, half the time of
    indexing every token's (block, offset) pair) up to the longest request, then two bmm's with the
    positions past each request's length masked out.
    """
    B = q.shape[0]
    block_size, width = cache.shape[1], cache.shape[2]
    lens = seq_lens.to(torch.long)
    num_blocks = -(-int(lens.max()) // block_size) if B else 0
    blocks = block_table[:, :num_blocks].to(torch.long).reshape(-1)
    kv = cache.index_select(0, blocks).view(B, num_blocks * block_size, width).float()   # [B, T, C]
    scores = torch.bmm(q.float(), kv.transpose(1, 2)).mul_(scale)                           # [B, N, T]
    pos = torch.arange(num_blocks * block_size, device=q.device)
    scores.masked_fill_((pos.unsqueeze(0) >= lens.unsqueeze(1)).unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, kv[..., :kv_lora_rank])


class CareCPUMLAImpl(CPUMLAImpl):
    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        assert attn_metadata.decode is not None
        if isinstance(q, tuple):
            q = torch.cat(q, dim=-1)
        decode = attn_metadata.decode
        out = paged_latent_decode(q, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens,
                                  self.scale, self.kv_lora_rank)
        return out.to(q.dtype), None


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
