"""Build one converted layer's attention tensors (docs/FORMAT.md) from the original weights.

Inputs per layer: the original q/k/v/o weights (and Qwen3's q_norm/k_norm), the RoRoPE map, and the
K/V factors truncated to the layer's ranks. Everything is computed in fp64 and cast at the end.

K (nope part): Llama  y = Q_N W_K x           -> c_K = down_K x,   k'_N ~ up_K c_K
               Qwen3  y = Q_N k_norm(W_K x)   -> c_K = down_K k̂,  k'_N ~ up_K c_K
V:                    y = W_V x               -> c_V = down_V x,   v ~ up_V c_V
Head h (KV group a): k_nope_h = Q_N[:, a]^T up_K c_K, v_h = up_V[a rows] c_V, q_pe_h = Q_S[:, a] q_h.
Joint (--latent joint): one latent of both, y = [Q_N W_K; W_V] x -> c = down x (Llama), or
y = [Q_N k̂; W_V x] -> c = down_K k̂ + down_V x (Qwen3: `down`'s columns split by input), [k'_N; v] ~ up c: the
same formulas with up_K, up_V the key and value rows of `up`, every column read by both (kv_b_proj dense).

Biases (Qwen2 and biased Llama sources; Llama path only): q_proj's carries b_Q and its rope rows Q_S b_Q;
kv_a_proj_with_mqa's is Q_S b_K on the rope key and 0 on the latent. The key bias's NoPE part is dropped
exactly: it adds q_nope_h(t)·const to every logit of query t, which softmax cancels (the rotated part
kept in the rope key is the only part of b_K a query sees). The value bias also passes through softmax
(its weights sum to 1), so o_proj's bias takes it: W_O b_V(per head) + b_O (`output_bias`).
"""
from __future__ import annotations

import torch

from .factorize import Factor
from .rope_map import RopeMap


def attention_tensors(*, arch: str, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor,
                      q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, rope: RopeMap,
                      k_factor: Factor | None, v_factor: Factor, k_rank: int, v_rank: int,
                      num_heads: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, bq: torch.Tensor | None = None,
                      bk: torch.Tensor | None = None, bias: bool = False) -> dict[str, torch.Tensor]:
    """Return {name-under-self_attn: tensor} for one layer (o_proj is copied by the caller; its bias
    comes from `output_bias`). `bias`: write q_proj/kv_a_proj_with_mqa biases (from bq/bk, None = 0).
    A joint latent: `k_factor` None, `v_factor` the joint factor (converter/joint_latent.target), k_rank 0 and
    v_rank its rank (the checkpoint's k_ranks/v_ranks, docs/FORMAT.md)."""
    d = head_dim
    group = num_heads // num_kv_heads
    d_r = rope.q_s.shape[0]
    wq, wk, wv = wq.double(), wk.double(), wv.double()
    r = k_rank + v_rank
    if k_factor is None:   # joint: every latent column feeds keys and values
        if k_rank:
            raise ValueError("a joint K/V latent is written with k_rank 0")
        down, up = v_factor.truncate(v_rank)
        if arch == "llama":   # c = down x: all of it in kv_a_proj_with_mqa's latent rows
            down_k, down_v = down[:0], down
        else:                 # c = down_K k̂ + down_V x: k_latent_proj's latent rows and v_latent_proj's
            down_k, down_v = down[:, :num_kv_heads * d], down[:, num_kv_heads * d:]
        n_k = rope.q_n.shape[0]
        up_k, up_v = up[:n_k], up[n_k:]
    else:                  # separate: keys read the first k_rank columns, values the rest
        down_k, up_k_part = k_factor.truncate(k_rank)
        down_v, up_v_part = v_factor.truncate(v_rank)
        up_k = torch.cat([up_k_part, up_k_part.new_zeros(up_k_part.shape[0], v_rank)], dim=1)
        up_v = torch.cat([up_v_part.new_zeros(up_v_part.shape[0], k_rank), up_v_part], dim=1)

    kv_b = torch.zeros(num_heads, 2 * d, r, dtype=torch.float64)
    q_maps = []  # per head [d_r, d_h]
    for h in range(num_heads):
        a = h // group
        kv_b[h, :d] = rope.group_block(rope.q_n, a, d).T @ up_k
        kv_b[h, d:] = up_v[a * d:(a + 1) * d]
        q_maps.append(rope.group_block(rope.q_s, a, d))
    out = {"kv_b_proj.weight": kv_b.reshape(num_heads * 2 * d, r)}

    if arch == "llama":
        wq_h = wq.view(num_heads, d, -1)
        q_pe = torch.stack([q_maps[h] @ wq_h[h] for h in range(num_heads)])  # [n_h, d_r, D]
        out["q_proj.weight"] = torch.cat([wq_h, q_pe], dim=1).reshape(num_heads * (d + d_r), -1)
        out["kv_a_proj_with_mqa.weight"] = torch.cat([down_k, down_v, rope.q_s @ wk])
        if bias:
            bq_h = (torch.zeros(num_heads, d, dtype=torch.float64) if bq is None else bq.double().view(num_heads, d))
            bk = torch.zeros(wk.shape[0], dtype=torch.float64) if bk is None else bk.double()
            out["q_proj.bias"] = torch.cat([torch.cat([bq_h[h], q_maps[h] @ bq_h[h]]) for h in range(num_heads)])
            out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r, dtype=torch.float64), rope.q_s @ bk])
    else:
        out["q_proj.weight"] = wq
        out["q_norm.weight"] = q_norm
        out["q_rope_proj.weight"] = torch.cat(q_maps)
        out["k_proj.weight"] = wk
        out["k_norm.weight"] = k_norm
        out["k_latent_proj.weight"] = torch.cat([down_k, rope.q_s])
        out["v_latent_proj.weight"] = down_v
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def expanded_value_bias(bv: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """b_V [g*d_h] as each query head reads it, [n_h*d_h] (head h reads its KV group's)."""
    return bv.view(num_kv_heads, -1).repeat_interleave(num_heads // num_kv_heads, 0).reshape(-1)


def output_bias(wo: torch.Tensor, bo: torch.Tensor | None, bv: torch.Tensor | None, num_heads: int,
                num_kv_heads: int) -> torch.Tensor:
    """o_proj's bias [D] in the converted layer: the source's b_O plus W_O applied to the value bias every
    head outputs (softmax weights sum to 1, so each head's output carries b_V of its KV group as is).
    Fixed: the o_proj refit fits W_O' to the rest of the output (converter/refit.py)."""
    out = torch.zeros(wo.shape[0], dtype=torch.float64) if bo is None else bo.double().clone()
    if bv is not None:
        out += wo.double() @ expanded_value_bias(bv.double(), num_heads, num_kv_heads)
    return out
