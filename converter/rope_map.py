"""RoRoPE: move RoPE onto a small shared key that carries most of the key energy.

Original keys (HF NeoX layout): KV head a, frequency j < d_h/2 is the 2-vector
(k_a[j], k_a[j + d_h/2]) rotated by angle pos * inv_freq[j]. For each frequency j, an orthogonal
g x g mixing U_j across the KV heads, applied identically to both components, commutes with that
rotation. U_j = eigenvectors of M_j = E[k_.j k_.j^T] summed over both components (PCA within the
frequency), so component c of frequency j carries energy lambda_{j,c}.

The d_r/2 (c, j) components whose RoPE matters most (logit_scores: key energy x query energy x how
much the frequency rotates over `distance` tokens; or key energy alone, `--rope-select key`; summed
over layers, see shared_pair_counts) keep RoPE (with their exact frequency inv_freq[j],
llama3 scaling included, since it is taken from the source's own inv_freq); all others become NoPE
dims and go into the K latent. With d_r = g*d_h every component keeps RoPE and the map is exact.

The result is an orthogonal matrix split into Q_S [d_r, g*d_h] (rope rows, NeoX order: first the
first components of the kept pairs, then their second components) and Q_N [g*d_h - d_r, g*d_h].
Query head h of group a gets q_pe_h = Q_S[:, a*d_h:(a+1)*d_h] q_h and keeps q_nope_h = q_h.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class RopeMap:
    q_s: torch.Tensor        # [d_r, g*d_h] fp64
    q_n: torch.Tensor        # [g*d_h - d_r, g*d_h] fp64
    inv_freq: torch.Tensor   # [d_r/2] fp32: exact inverse frequency of each kept pair
    pairs: list[tuple[int, int]]   # kept (component c, frequency j), in rope-pair order
    energy_kept: float       # fraction of the key energy carried by the rope key

    def group_block(self, mat: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
        """Columns of `mat` (Q_S or Q_N) acting on KV head `group`: [rows, d_h]."""
        return mat[:, group * head_dim:(group + 1) * head_dim]


def frequency_pca(key_moment: torch.Tensor, num_kv_heads: int, head_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency PCA across KV heads: energies [d_h/2, g] (descending) and mixings [d_h/2, g, g]."""
    g, d, half = num_kv_heads, head_dim, head_dim // 2
    ck = key_moment.double()
    heads = torch.arange(g) * d
    lams, us = [], []
    for j in range(half):
        i1, i2 = heads + j, heads + j + half
        m = ck[i1][:, i1] + ck[i2][:, i2]
        lam, u = torch.linalg.eigh(0.5 * (m + m.T))
        lam, u = lam.flip(0).clamp_min(0), u.flip(1)
        s = torch.sign(u[u.abs().argmax(0), torch.arange(g)])  # deterministic signs
        lams.append(lam)
        us.append(u * torch.where(s == 0, torch.ones_like(s), s))
    return torch.stack(lams), torch.stack(us)


def logit_scores(energy: torch.Tensor, mixing: torch.Tensor, query_diag: torch.Tensor, inv_freq: torch.Tensor,
                 distance: float) -> torch.Tensor:
    """How much attention-logit error dropping RoPE on each (frequency j, component c) would cause.

    Why not key energy alone: low frequencies barely rotate over the distances that matter, so
    dropping their RoPE costs little however large their keys are (and trained models put much key
    energy there). Score = key energy x energy of the matching query component (summed over the
    query heads, through the same mixing) x (1 - sinc(theta_j * distance)), the mean of
    1 - cos(theta_j * delta) for delta uniform in [0, distance].
    `query_diag` [n_h, d_h]: second moment of each pre-RoPE query dim.
    """
    half, g = energy.shape
    n_h = query_diag.shape[0]
    group = n_h // g
    qpair = query_diag[:, :half] + query_diag[:, half:]               # [n_h, half]
    kv_of_head = torch.arange(n_h) // group
    # query energy of component c at freq j: sum_h U_j[a(h), c]^2 * qpair[h, j]
    qe = torch.einsum("hj,jhc->jc", qpair.double(), mixing.double()[:, kv_of_head, :] ** 2)
    x = inv_freq.double() * distance
    w = 1.0 - torch.where(x > 1e-8, torch.sin(x) / x.clamp_min(1e-8), torch.ones_like(x))
    return energy * qe * w[:, None]


def reorder_components(score: torch.Tensor, energy: torch.Tensor, mixing: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each frequency's components by `score` (descending): RoPE is then kept on the first ones."""
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    return (torch.gather(score, 1, order), torch.gather(energy, 1, order),
            torch.gather(mixing, 2, order[:, None, :].expand_as(mixing)))


def shared_pair_counts(energies: list[torch.Tensor], rope_dim: int) -> list[int]:
    """How many components of each frequency keep RoPE, the SAME for every layer.

    Why shared: the served model has one rope frequency table, so every layer's rope key must use
    the same frequencies. Each layer's energies are normalized to sum 1, summed over layers, and the
    rope_dim/2 largest (frequency, component) slots win.
    """
    total = sum(e / e.sum().clamp_min(1e-300) for e in energies)  # [half, g], descending along g
    half, g = total.shape
    flat = sorted(((float(total[j, c]), j, c) for j in range(half) for c in range(g)),
                  key=lambda t: (-t[0], t[1], t[2]))
    counts = [0] * half
    for _, j, c in flat[:rope_dim // 2]:
        counts[j] += 1
    return counts


def build_map(energy: torch.Tensor, mixing: torch.Tensor, counts: list[int], inv_freq: torch.Tensor,
              num_kv_heads: int, head_dim: int) -> RopeMap:
    """The layer's orthogonal map: components c < counts[j] of frequency j keep RoPE."""
    g, d, half = num_kv_heads, head_dim, head_dim // 2
    heads = torch.arange(g) * d
    kept = [(c, j) for j in range(half) for c in range(counts[j])]
    dropped = [(c, j) for j in range(half) for c in range(counts[j], g)]

    def rows(idx):
        first = torch.zeros(len(idx), g * d, dtype=torch.float64)
        second = torch.zeros_like(first)
        for r, (c, j) in enumerate(idx):
            first[r, heads + j] = mixing[j, :, c]
            second[r, heads + j + half] = mixing[j, :, c]
        return first, second

    s1, s2 = rows(kept)
    n1, n2 = rows(dropped)
    total = float(energy.sum())
    return RopeMap(
        q_s=torch.cat([s1, s2]), q_n=torch.cat([n1, n2]),
        inv_freq=torch.stack([inv_freq[j].float() for _, j in kept]),
        pairs=kept,
        energy_kept=(sum(float(energy[j, c]) for c, j in kept) / total) if total > 0 else 1.0,
    )
