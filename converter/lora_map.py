"""Carry a LoRA adapter of the source model over to its converted checkpoint: the maths.

Why this can be exact: every converted projection that reads the layer input is a fixed linear image of
the source's (converter/assemble.py, converter/factorize.py: a latent is `basis @ A` of its target A):

  Llama path   q_proj'            = [I; Q_S,a(h)] W_Q,h per head   (the query plus its rope rows)
               kv_a_proj_with_mqa' = [B_K Q_N; Q_S] W_K  (rows c_K and k_rope),  B_V W_V (rows c_V)
                 (joint latent, --latent joint: B_K Q_N W_K + B_V W_V on the latent rows, Q_S W_K on k_rope)
  Qwen3 path   q_proj', k_proj'   = W_Q, W_K  (q_norm/k_norm and the latent maps follow them)
               v_latent_proj'     = B_V W_V
  both         MLP'               = W (copied)
               o_proj'            = W_O R (R = I, or the o_proj refit's map of its input: converter/refit.py)

A LoRA delta s B A on W therefore becomes M s B A on the converted projection: same A, B' = M s B, and the
converted model with the converted adapter computes what the converted model computes for the merged
source (exactly, at full rank). The maps M are not stored in the checkpoint: they are recovered here by
least squares from the source's and the checkpoint's weights, T = M S with S of full row rank, and the
residual ||T - M S|| / ||T|| proves the relation (a healed checkpoint, or one converted from another
source, fails it by name). o_proj's delta gets the same R on its input side (B A R): R is fitted on the
calibration data, so this is what refitting the merged model would give if the adapter did not change
the calibration data's hidden states (it does a little: reported as approximate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConversionError


@dataclass
class Delta:
    """One LoRA pair with its scaling folded in: W += b @ a (b [out, r], a [r, in])."""
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Fit:
    """How a converted tensor T relates to source tensor(s) S: T = map @ S, with its relative residual."""
    map: torch.Tensor
    residual: float


def solve(target: torch.Tensor, source: torch.Tensor, what: str) -> Fit:
    """Least-squares M with M @ source = target (fp64). `source` [k, in] must have full row rank: otherwise
    M is not determined where the adapter's B may point, and a wrong map would pass unnoticed."""
    s, t = source.double(), target.double()
    sv = torch.linalg.svdvals(s)
    if sv.numel() and sv[-1] <= 1e-9 * sv[0]:
        raise ConversionError(f"{what}: the source weight [{s.shape[0]} x {s.shape[1]}] is rank-deficient, so the "
                              f"converted weight does not determine how its adapter maps")
    m = torch.linalg.lstsq(s.T, t.T).solution.T
    return Fit(m, _relative(t - m @ s, t))


def solve_scale(target: torch.Tensor, source: torch.Tensor) -> Fit:
    """The scalar c with target ~ c * source (the MLP: copied, c = 1)."""
    s, t = source.double(), target.double()
    c = (t * s).sum() / (s * s).sum().clamp_min(1e-300)
    return Fit(c.reshape(1, 1), _relative(t - c * s, t))


def solve_input_side(target: torch.Tensor, source: torch.Tensor) -> tuple[Fit, bool]:
    """o_proj after the refit: W_O' = W_O R (R from the calibration data alone, converter/refit.py). Returns
    R^ = I + pinv(W_O) (W_O' - W_O), which is R where W_O has full column rank and the identity on what W_O
    does not determine (Qwen3-4B's o_proj is 2560 x 4096), and whether R was fully determined."""
    s, t = source.double(), target.double()
    r = torch.eye(s.shape[1], dtype=torch.float64) + torch.linalg.pinv(s) @ (t - s)
    sv = torch.linalg.svdvals(s)
    determined = s.shape[0] >= s.shape[1] and bool(sv[-1] > 1e-9 * sv[0])
    return Fit(r, _relative(t - s @ r, t)), determined


def _relative(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.norm() / ref.norm().clamp_min(1e-300)).item()


def per_head_fits(target: torch.Tensor, source: torch.Tensor, num_heads: int, what: str) -> list[Fit]:
    """q_proj: head h's converted rows from its source rows alone (each W_Q,h [d_h, D] has full row rank
    even where the whole W_Q has more rows than columns, as Qwen3-4B's 4096 x 2560)."""
    t, s = target.view(num_heads, -1, target.shape[-1]), source.view(num_heads, -1, source.shape[-1])
    return [solve(t[h], s[h], f"{what} head {h}") for h in range(num_heads)]


def map_per_head(fits: list[Fit], delta: Delta) -> Delta:
    """B' = blockdiag(M_h) B."""
    n = len(fits)
    b = delta.b.double().view(n, -1, delta.b.shape[-1])
    return Delta(delta.a, torch.cat([f.map @ b[h] for h, f in enumerate(fits)]))


def map_rows(fit: Fit, delta: Delta) -> Delta:
    """B' = M B (or c B for a scalar fit)."""
    b = delta.b.double()
    return Delta(delta.a, fit.map @ b if fit.map.shape != (1, 1) else fit.map.item() * b)


def map_columns(fit: Fit, delta: Delta) -> Delta:
    """A' = A R (a delta read through the same input-side map as its weight)."""
    return Delta(delta.a.double() @ fit.map, delta.b)


def stack_rows(parts: list[tuple[torch.Tensor, Delta]], rows: int) -> Delta:
    """Several deltas that write rows of one converted projection (kv_a_proj_with_mqa: c_K and k_rope from the
    key adapter, c_V from the value adapter; with a joint latent both write every latent row, and add up) as one
    LoRA pair of their summed ranks.
    Each part: (the converted row indices its B fills, in order, the delta)."""
    a = torch.cat([d.a.double() for _, d in parts])
    b = torch.zeros(rows, a.shape[0], dtype=torch.float64)
    col = 0
    for index, d in parts:
        r = d.a.shape[0]
        b[index, col:col + r] = d.b.double()
        col += r
    return Delta(a, b)


def padded(delta: Delta, rank: int, dtype: torch.dtype) -> Delta:
    """Zero rows of A / columns of B up to `rank` (one r for the whole adapter: the product is unchanged)."""
    r = delta.a.shape[0]
    a = torch.cat([delta.a.double(), delta.a.new_zeros(rank - r, delta.a.shape[1]).double()])
    b = torch.cat([delta.b.double(), delta.b.new_zeros(delta.b.shape[0], rank - r).double()], dim=1)
    return Delta(a.to(dtype).contiguous(), b.to(dtype).contiguous())
