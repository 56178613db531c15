"""Start-up check of an MLA prefill backend at a model's own head dims.

Why: care_mla layers attend with (qk_nope, rope, v) head dims that vLLM's fast GPU prefill backends
do not list (they whitelist DeepSeek's and a few others), so the plugin offers FlashAttention for
them with v zero-padded to the query/key head dim (backends/gpu_prefill.py). Which head dims an
installed FlashAttention build really takes differs between FA2, FA3 and FA4 and between GPUs;
rather than copy those rules, the plugin runs the backend once at start-up on a small ragged batch
and compares it with vLLM's dense CPU_SDPA_MLA (plain PyTorch per-request attention: it runs on any
device) on the same inputs. Both entry points vLLM's MLA layer calls are checked: new tokens (causal,
with and without the log-sum-exp) and a context chunk (not causal, with the log-sum-exp the merge
uses), including the log-sum-exp's [heads, tokens] layout. A backend that raises or disagrees is not
used (the caller falls back to the dense prefill and says why).
"""
from __future__ import annotations

from itertools import accumulate
from types import SimpleNamespace

import torch

Q_LENS = (1, 7, 33)          # ragged new tokens of three requests ...
CONTEXT_LENS = (5, 40, 2)    # ... and, for the context-chunk call, their cached contexts
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 0.1}  # max |diff|, outputs and lse:
# bf16 rounding of the outputs alone is ~0.008 here; the faults the test plants give 0.4 to 5


def _cu(lens, device) -> torch.Tensor:
    return torch.tensor([0, *accumulate(lens)], dtype=torch.int32, device=device)


def check_prefill_backend(backend, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> str | None:
    """None if `backend` (an MLAPrefillBackend instance) computes what CPU_SDPA_MLA computes at its
    head dims on `device` in `dtype`, else what went wrong (an exception's message or the largest
    difference)."""
    from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

    reference = CPUSDPAMLAPrefillBackend(
        num_heads=backend.num_heads, scale=backend.scale, kv_lora_rank=backend.kv_lora_rank,
        qk_nope_head_dim=backend.qk_nope_head_dim, qk_rope_head_dim=backend.qk_rope_head_dim,
        v_head_dim=backend.v_head_dim, vllm_config=backend.vllm_config)
    heads, d_qk, d_v = backend.num_heads, backend.qk_nope_head_dim + backend.qk_rope_head_dim, backend.v_head_dim
    g = torch.Generator().manual_seed(seed)

    def draw(tokens: int, dim: int) -> torch.Tensor:
        # explicit devices throughout: vLLM builds models under a default-device context
        return torch.randn(tokens, heads, dim, generator=g, device="cpu").to(device=device, dtype=dtype)

    n_q, n_kv = sum(Q_LENS), sum(CONTEXT_LENS)
    q, k, v = draw(n_q, d_qk), draw(n_q, d_qk), draw(n_q, d_v)
    ctx_k, ctx_v = draw(n_kv, d_qk), draw(n_kv, d_v)
    new = SimpleNamespace(query_start_loc=_cu(Q_LENS, device), max_query_len=max(Q_LENS))
    chunk = SimpleNamespace(query_start_loc=new.query_start_loc, max_query_len=max(Q_LENS),
                            cu_seq_lens=_cu(CONTEXT_LENS, device), max_seq_len=max(CONTEXT_LENS))
    fp32 = lambda *ts: [t.float() for t in ts]  # noqa: E731  (the reference: same inputs, fp32 result)
    calls = {
        "new tokens": (lambda b, *x: b.run_prefill_new_tokens(*x, return_softmax_lse=False), (q, k, v)),
        "new tokens with lse": (lambda b, *x: b.run_prefill_new_tokens(*x, return_softmax_lse=True), (q, k, v)),
        "context chunk": (lambda b, *x: b.run_prefill_context_chunk(chunk, *x), (q, ctx_k, ctx_v)),
    }
    tol = TOLERANCE.get(dtype, 0.1)
    try:
        for bk in (backend, reference):
            bk.prepare_metadata(new)
        for name, (call, inputs) in calls.items():
            want = call(reference, *fp32(*inputs))
            got = call(backend, *inputs)
            want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
            if len(got) != len(want):
                return f"{name}: {len(got)} results, expected {len(want)}"
            out = got[0][..., :d_v]    # a backend may return v padded to the qk head dim (vLLM slices it)
            parts = [("output", out, want[0])] + ([("lse", got[1], want[1])] if len(want) > 1 else [])
            for what, g_t, w_t in parts:
                if g_t.shape != w_t.shape:
                    return f"{name}: {what} shape {tuple(g_t.shape)}, expected {tuple(w_t.shape)}"
                err = (g_t.float() - w_t.float()).abs().max().item()
                if not err <= tol:   # NaN fails too
                    return f"{name}: {what} differs from CPU_SDPA_MLA by {err:.3g} (tolerance {tol:g})"
    except Exception as e:  # noqa: BLE001  (any failure of the kernel means: do not use it)
        return f"{type(e).__name__}: {e}"
    return None
