"""CPU MLA prefill through PyTorch's fused flash-attention kernel.

vLLM 0.32's CPU MLA prefill backend (CPU_SDPA_MLA) computes each request's attention densely:
it materialises the [heads, S_q, S_kv] fp32 score matrix, masks it with a [S_q, S_kv] boolean
triangle, softmaxes it and takes a separate logsumexp pass when the prefill is merged with cached
context. That is O(S^2) memory per request and layer (9 heads x 8K x 8K x 4 B = 2.4 GB for one
SmolLM2-shaped 8K prefill, not chunked) and several passes over it.

`CareCPUFlashPrefillBackend` keeps everything of CPU_SDPA_MLA (metadata, the new-token and
context-chunk entry points, the merge) and replaces only the per-request kernel with
`aten._scaled_dot_product_flash_attention_for_cpu`, which is in every PyTorch CPU build, tiles the
scores (O(S) memory), applies the causal mask inside the tiles and returns the log-sum-exp the
context merge needs. It wants one head size for q, k and v, so v (v_head_dim) is zero-padded to
the query's head size (qk_nope + rope) and the padding sliced off the output, as vLLM's
zentorch backend does. Inputs are computed in fp32 like CPU_SDPA_MLA.

Used for care_mla models on CPU when vLLM would pick CPU_SDPA_MLA (models._prefill_backend_cls);
vLLM's other CPU choices (zentorch on AMD Zen) are kept. Checked against CPU_SDPA_MLA's own
per-request attention in tests/test_vllm_plugin.py and end to end by every serving test.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend


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


class CareCPUFlashPrefillBackend(CPUSDPAMLAPrefillBackend):
    @staticmethod
    def get_name() -> str:
        return "CARE_CPU_FLASH_MLA"

    def _ragged_sdpa(self, q, k, v, q_cu_seq_lens, kv_cu_seq_lens, causal, return_softmax_lse):
        assert q_cu_seq_lens.numel() == kv_cu_seq_lens.numel()
        return ragged_flash_attention(q, k, v, q_cu_seq_lens, kv_cu_seq_lens, self.scale, causal,
                                      return_softmax_lse)
