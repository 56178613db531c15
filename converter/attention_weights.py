"""Output weightings for `--objective attention`: how the attention itself reads the K and V latents.

The paper's CARE minimizes the activation error of the keys and values themselves,
E||k - k̂||^2 and E||v - v̂||^2. But no one reads k and v directly:

* a key is only ever read as the logits q_h·k of the query heads of its KV group (its NoPE part; the
  rope key is exact). With queries and keys from different tokens, the expected squared logit error
  summed over heads is tr(M_K E[e e^T]) with M_K = sum_h P_a(h) E[q_h q_h^T] P_a(h)^T, P_a the
  columns of the RoRoPE NoPE map acting on KV head a. Directions the queries never look along
  cost nothing; ones they look along hard cost more.
* a value is only read through o_proj: head h's output error is W_O,h (attention-weighted e_a(h)).
  The heads of one KV group read the same values; taking their attention patterns as alike (and
  the groups' errors as unrelated) gives M_V = blockdiag_a(Wbar_a^T Wbar_a), Wbar_a = sum_{h in a} W_O,h.
  Of the three forms tried (docs/RESULTS.md, "Fitting objective"), it is the one never worse than the plain
  objective: every head unrelated (blockdiag of sum_h W_O,h^T W_O,h) was worse than it wherever
  tried, all heads alike (Wbar^T Wbar over all groups) better in some cases but worse than plain
  CARE on SmolLM2 at KV 0.25.

`factorize.factorize(..., out_weight=M)` then minimizes tr(M (A - Â) C (A - Â)^T), the same
closed-form problem after whitening by M^{1/2} (with M and C damped as factorize.py damps them, so exactly the
damped problem's optimum). Everything here is fp64 on the device of the inputs.
"""
from __future__ import annotations

import torch


def key_weight(query_cov: torch.Tensor, q_n: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """M_K [n_nope, n_nope] from per-head pre-RoPE query second moments `query_cov` [n_h, d_h, d_h]
    and the RoRoPE NoPE rows `q_n` [n_nope, g*d_h]."""
    n_h, d_h, _ = query_cov.shape
    group = n_h // num_kv_heads
    blocks = q_n.view(q_n.shape[0], num_kv_heads, d_h)           # P_a = blocks[:, a, :]
    per_group = query_cov.view(num_kv_heads, group, d_h, d_h).sum(1)   # sum over the group's heads
    return torch.einsum("nad,ade,mae->nm", blocks, per_group.to(q_n.dtype), blocks)


def llama_query_cov(wq: torch.Tensor, cx: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head second moments of linear queries (summed over tokens), E[q_h q_h^T] = W_Q,h C_x W_Q,h^T
    [n_h, d_h, d_h]: M_K's query side, and through its diagonal what the rope selection ranks by. One
    W_Q C_x product (the costly part: 69 GFLOP in fp64 for an 8B layer)."""
    wq_h = wq.view(num_heads, -1, wq.shape[-1])
    return torch.bmm((wq @ cx).view_as(wq_h), wq_h.transpose(1, 2))


def value_weight(wo: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """M_V [g*d_h, g*d_h] = blockdiag over KV heads a of Wbar_a^T Wbar_a, Wbar_a = sum_{h in a} W_O,h
    (the o_proj columns of head h); wo [D, n_h*d_h]."""
    d_h = wo.shape[1] // num_heads
    group = num_heads // num_kv_heads
    wbar = wo.view(wo.shape[0], num_kv_heads, group, d_h).sum(2)          # [D, g, d_h]
    return torch.block_diag(*torch.einsum("kad,kae->ade", wbar, wbar))
