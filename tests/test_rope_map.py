"""RoRoPE properties, checked on synthetic keys/queries with a known answer."""
from __future__ import annotations

import torch

from converter import rope_map


def _rope_neox(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    ang = pos[:, None].double() * inv_freq[None, :].double()
    if x.ndim == 3:
        ang = ang[:, None]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)


def test_mixing_commutes_with_rope_and_keeps_scores():
    """Per-frequency head mixing (RoRoPE) is orthogonal and commutes with RoPE: with RoPE kept on every
    rotated component, q.k scores of every query head are unchanged at any pair of positions."""
    torch.manual_seed(0)
    g, d, n_h, T = 3, 8, 6, 7
    inv_freq = (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)).float().double()  # kept as fp32
    a = torch.randn(g * d, g * d, dtype=torch.float64)
    energy, mixing = rope_map.frequency_pca(a @ a.T, g, d)
    rm = rope_map.build_map(energy, mixing, [g] * (d // 2), inv_freq, g, d)  # everything keeps RoPE
    q_full = torch.cat([rm.q_s, rm.q_n])
    assert torch.allclose(q_full @ q_full.T, torch.eye(g * d, dtype=torch.float64), atol=1e-12)

    k = torch.randn(T, g, d, dtype=torch.float64)
    q = torch.randn(T, n_h, d, dtype=torch.float64)
    pos = torch.randint(0, 5000, (T,))
    ref = torch.einsum("thd,shd->hts", _rope_neox(q, pos, inv_freq),
                       _rope_neox(k, pos, inv_freq).repeat_interleave(n_h // g, dim=1))
    k_pe = _rope_neox(k.reshape(T, -1) @ rm.q_s.T, pos, rm.inv_freq)                      # shared rope key
    q_pe = torch.stack([q[:, h] @ rm.group_block(rm.q_s, h // (n_h // g), d).T for h in range(n_h)], 1)
    got = torch.einsum("thr,sr->hts", _rope_neox(q_pe, pos, rm.inv_freq), k_pe)
    assert torch.allclose(got, ref, atol=1e-9)


def test_qk_selection_skips_slow_frequencies_that_key_energy_would_pick():
    """A huge key component at the slowest frequency barely rotates: dropping its RoPE costs nothing,
    so `qk` selection keeps RoPE on a fast frequency instead, while key-energy selection takes the slow one."""
    g, d, n_h = 1, 8, 2
    inv_freq = torch.tensor([1.0, 0.1, 1e-3, 1e-6], dtype=torch.float64)
    moment = torch.diag(torch.tensor([1.0, 1.0, 1.0, 100.0] * 2, dtype=torch.float64))  # freq 3 dominates keys
    energy, mixing = rope_map.frequency_pca(moment, g, d)
    q_diag = torch.ones(n_h, d, dtype=torch.float64)
    assert rope_map.shared_pair_counts([energy], 2) == [0, 0, 0, 1]
    scores = rope_map.logit_scores(energy, mixing, q_diag, inv_freq, distance=1024)
    assert rope_map.shared_pair_counts([scores], 2) == [1, 0, 0, 0]
