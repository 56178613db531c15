"""CPU MLA prefill: vLLM's own CPU attention kernel for new tokens, PyTorch's fused flash kernel where
the context merge needs the log-sum-exp.

vLLM 0.32's CPU MLA prefill backend (CPU_SDPA_MLA) computes each request's attention densely:
it materialises the [heads, S_q, S_kv] fp32 score matrix, masks it with a [S_q, S_kv] boolean
triangle, softmaxes it and takes a separate logsumexp pass when the prefill is merged with cached
context. That is O(S^2) memory per request and layer (9 heads x 8K x 8K x 4 B = 2.4 GB for one
SmolLM2-shaped 8K prefill, not chunked) and several passes over it.

`CareCPUPrefillBackend` keeps everything of CPU_SDPA_MLA (metadata, the new-token and
context-chunk entry points, the merge) and replaces only the attention kernels, both tiled (O(S)
memory) with the causal mask applied inside the tiles:

* new tokens without cached context (the usual prefill: nothing to merge, no log-sum-exp wanted)
  go through vLLM's paged CPU attention kernel, the one its GQA models use
  (`cpu_attention_with_kv_cache`, all requests in one call): each layer's keys and values are
  written into a scratch paged cache laid out once per step (`PagedPrefillPlan`).
  On the 2-core dev machine it took 6.4 ms where PyTorch's flash kernel took 10.3 ms for a
  SmolLM2-shaped 576-token request (9 heads, qk 128, v 64; ad-hoc timing), and the converted
  SmolLM2's whole 4 x 576-token prefill went from 1.36x to 1.20x the original's
  (benchmarks/results/cpu_generate.md). The gap narrows with length (2K tokens: ~60 vs ~73 ms).
* new tokens merged with cached context, and the context chunks themselves, need the
  log-sum-exp, which vLLM's kernel does not return: they run
  `aten._scaled_dot_product_flash_attention_for_cpu` per request (in every PyTorch CPU build).

Both want one head size for q, k and v: v (v_head_dim) is zero-padded to the query's head size
(qk_nope + rope; for vLLM's kernel q and k are zero-padded further up to a head size it is built for,
which leaves the scores unchanged) and the padding sliced off the output, as vLLM's zentorch
backend does. Inputs are computed in fp32 like CPU_SDPA_MLA.

Used for care_mla models on CPU when vLLM would pick CPU_SDPA_MLA (models._prefill_backend_cls);
vLLM's other CPU choices (zentorch on AMD Zen) are kept. Both kernels are checked against
CPU_SDPA_MLA's own per-request attention in tests/test_vllm_plugin.py and end to end by every
serving test.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from vllm import envs
from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

SCRATCH_BLOCK_SIZE = 128  # tokens per block of the scratch cache (vLLM's kernel takes multiples of 32)


@functools.lru_cache(maxsize=None)
def kernel_head_size(d_qk: int, d_v: int) -> int | None:
    """The smallest head size vLLM's CPU attention kernel is built for that holds q/k and v, or
    None if the kernel (or one that large) is not in this vLLM build. Cached: asked per layer and
    step, with the model's two fixed head sizes."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
        return None
    fits = [s for s in CPUAttentionBackend.get_supported_head_sizes() if s >= max(d_qk, d_v)]
    return min(fits) if fits else None


@dataclass
class PagedPrefillPlan:
    """One step's requests laid out in a paged cache for vLLM's CPU attention kernel.

    The layout (slots, block table) and the kernel's scheduler metadata are built once per step
    and shared by every layer. Each layer's call writes its keys and values into a scratch cache of
    that layout (fp32: tokens x heads x 2 x head size x 4 B, 38 MB for 4096 SmolLM2-shaped
    tokens), freed when the call returns: timed on the dev machine, allocating it per call costs
    no more than sharing one across the step's layers would, and nothing outlives the step. The
    slots past a request's last token are zeroed: the kernel reads whole blocks, and a NaN of
    uninitialised memory there would reach the output through a zero probability."""
    query_start_loc: torch.Tensor    # [R + 1] int32
    seq_lens: torch.Tensor           # [R] int32 (no cached context: = query lengths)
    block_table: torch.Tensor        # [R, max blocks] int32
    slot_mapping: torch.Tensor       # [T] int64
    pad_blocks: torch.Tensor         # [P] int64: block and offset of each slot of the last blocks
    pad_offsets: torch.Tensor        # [P] int64  that holds no token
    num_blocks: int
    block_size: int = SCRATCH_BLOCK_SIZE
    _kernel_meta: dict = field(default_factory=dict)   # (heads, head size) -> (scheduler metadata, isa)

    @classmethod
    def build(cls, query_start_loc: torch.Tensor, block_size: int = SCRATCH_BLOCK_SIZE) -> "PagedPrefillPlan":
        cu = query_start_loc.to(torch.int64).cpu()
        lens = cu[1:] - cu[:-1]
        blocks = (lens + block_size - 1) // block_size
        first_block = torch.cumsum(blocks, 0) - blocks
        num_blocks = int(blocks.sum())
        req = torch.repeat_interleave(torch.arange(len(lens)), lens)
        pos = torch.arange(int(cu[-1])) - cu[:-1][req]
        slots = first_block[req] * block_size + pos
        taken = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        taken[slots] = True
        pad = (~taken).nonzero().flatten()
        table = first_block[:, None] + torch.arange(max(int(blocks.max()), 1))[None, :]
        return cls(query_start_loc=cu.to(torch.int32), seq_lens=lens.to(torch.int32),
                   block_table=table.clamp(max=max(num_blocks - 1, 0)).to(torch.int32),
                   slot_mapping=slots, pad_blocks=pad // block_size, pad_offsets=pad % block_size,
                   num_blocks=num_blocks, block_size=block_size)

    def _kernel_meta_for(self, num_heads: int, head_size: int):
        key = (num_heads, head_size)
        if key not in self._kernel_meta:
            import vllm._custom_ops as ops
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(torch.float32, self.block_size, head_size)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(self.seq_lens), num_heads=num_heads, num_kv_heads=num_heads,
                head_dim=head_size, seq_lens=self.seq_lens, dtype=torch.float32,
                query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            self._kernel_meta[key] = (meta, isa)
        return self._kernel_meta[key]

    def _scratch_cache(self, num_heads: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value caches [blocks, heads, block size, head size], vLLM's CPU layout (the two
        interleaved per block, as its KV cache tensor is), with the pad slots zeroed."""
        cache = torch.empty(self.num_blocks, num_heads, 2 * self.block_size, head_size)
        k_cache, v_cache = cache.chunk(2, dim=2)
        for part in (k_cache, v_cache):
            part[self.pad_blocks, :, self.pad_offsets] = 0.0
        return k_cache, v_cache

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  head_size: int) -> torch.Tensor:
        """Causal attention of each request's new tokens: q, k [T, N, Dqk], v [T, N, Dv] ->
        [T, N, Dv] in v's dtype; q/k/v zero-padded to `head_size` (kernel_head_size)."""
        import vllm._custom_ops as ops

        d_v, num_heads = v.shape[-1], q.shape[1]

        def padded(x):
            x = x.float()
            return F.pad(x, (0, head_size - x.shape[-1])) if x.shape[-1] < head_size else x.contiguous()

        meta, isa = self._kernel_meta_for(num_heads, head_size)
        k_cache, v_cache = self._scratch_cache(num_heads, head_size)
        ops.cpu_attn_reshape_and_cache(padded(k), padded(v), k_cache, v_cache, self.slot_mapping, isa)
        out = torch.empty(q.shape[0], num_heads, head_size)
        ops.cpu_attention_with_kv_cache(
            query=padded(q), key_cache=k_cache, value_cache=v_cache, output=out,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=self.block_table, softcap=0.0,
            scheduler_metadata=meta, s_aux=None)
        return out[..., :d_v].to(v.dtype)


def ragged_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_cu_seq_lens: torch.Tensor,
                           kv_cu_seq_lens: torch.Tensor, scale: float, causal: bool,
                           return_softmax_lse: bool):
    """q [Tq, N, Dqk], k [Tkv, N, Dqk], v [Tkv, N, Dv], requests delimited by the cumulative
    lengths -> out [Tq, N, Dv] in v's dtype (and lse [N, Tq], fp32, natural log)."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if d_v < d_qk:
        v_in = F.pad(v, (0, d_qk - d_v))
    elif d_v > d_qk:  # zero query/key columns leave the scores unchanged
        q, k, v_in = F.pad(q, (0, d_v - d_qk)), F.pad(k, (0, d_v - d_qk)), v
    else:
        v_in = v
    def heads_first(x, lo, hi):  # rows [lo, hi) of [T, N, D] -> [1, N, S, D] fp32
        return x[lo:hi].transpose(0, 1).unsqueeze(0).float()

    q_cu, kv_cu = q_cu_seq_lens.tolist(), kv_cu_seq_lens.tolist()
    outs, lses = [], []
    for i in range(len(q_cu) - 1):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            heads_first(q, q_cu[i], q_cu[i + 1]), heads_first(k, kv_cu[i], kv_cu[i + 1]),
            heads_first(v_in, kv_cu[i], kv_cu[i + 1]), 0.0, causal, scale=scale)
        outs.append(out[0, ..., :d_v].transpose(0, 1))   # [S, N, Dv]
        lses.append(lse[0])                                # [N, S]
    out = torch.cat(outs, dim=0).to(v.dtype)
    return (out, torch.cat(lses, dim=1)) if return_softmax_lse else out


class CareCPUPrefillBackend(CPUSDPAMLAPrefillBackend):
    _paged_plan: PagedPrefillPlan | None = None   # the step's, built on its first new-token prefill

    @staticmethod
    def get_name() -> str:
        return "CARE_CPU_MLA_PREFILL"

    def prepare_metadata(self, prefill_metadata) -> None:
        super().prepare_metadata(prefill_metadata)
        self._paged_plan = None

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        head_size = None if return_softmax_lse else kernel_head_size(q.shape[-1], v.shape[-1])
        if head_size is None or output_scale is not None:
            return super().run_prefill_new_tokens(q, k, v, return_softmax_lse, out, output_scale)
        if self._paged_plan is None:
            self._paged_plan = PagedPrefillPlan.build(self._prefill_metadata.query_start_loc)
        result = self._paged_plan.attention(q, k, v, self.scale, head_size)
        return out.copy_(result) if out is not None else result

    def _ragged_sdpa(self, q, k, v, q_cu_seq_lens, kv_cu_seq_lens, causal, return_softmax_lse):
        assert q_cu_seq_lens.numel() == kv_cu_seq_lens.numel()
        return ragged_flash_attention(q, k, v, q_cu_seq_lens, kv_cu_seq_lens, self.scale, causal,
                                      return_softmax_lse)
