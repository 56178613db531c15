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
    Reads the cache through block_table with advanced indexing (any strides).
    """
    B = q.shape[0]
    block_size = cache.shape[1]
    lens = seq_lens.to(torch.long)
    max_len = int(lens.max().item()) if B else 0
    pos = torch.arange(max_len, device=q.device)
    blocks = block_table[:, pos // block_size].to(torch.long)               # [B, T]
    kv = cache[blocks, (pos % block_size).unsqueeze(0).expand(B, -1)]       # [B, T, C]
    kv = kv.float()
    scores = torch.einsum("bnc,btc->bnt", q.float(), kv) * scale
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)                            # [B, T]
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bnt,btr->bnr", probs, kv[..., :kv_lora_rank])


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
