"""Low-rank factorization of one K or V target: y = A u  ->  y ~ up[:, :r] @ (down[:r] @ u).

`A` is [out, in] (torch orientation), `u` the target's input with second moment `C` (sum u u^T).
Each method returns the FULL factorization, ordered by energy; truncating to the first r latent dims
is the method's rank-r solution (nested property), so ranks are allocated after factorizing once.

  care : SVD of C_d^{1/2} A^T (C_d = C + alpha*mean(diag C)*I, alpha = 0.01 relative, as the paper
         states), W_a = C_d^{-1/2} U S, W_b = V^T. Minimizes the activation error ||C^{1/2}(A - Â)^T||.
  svd  : plain weight SVD of A^T (Palu's baseline).
  asvd : SVD of diag(s^0.5) A^T with s = mean |u| (ASVD's input scaling).
All in fp64 (eigh/SVD of covariances lose too much in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("care", "svd", "asvd")
DAMPING = 0.01
ASVD_ALPHA = 0.5


@dataclass
class Factor:
    down: torch.Tensor   # [R, in]
    up: torch.Tensor     # [out, R]
    sigma: torch.Tensor  # [R] singular values, descending (what rank allocation ranks by)

    def truncate(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down[:r], self.up[:, :r]

    def approx(self, r: int) -> torch.Tensor:
        down, up = self.truncate(r)
        return up @ down


def _sym_sqrt_and_inv(c: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = 0.5 * (c + c.T)
    c = c + alpha * c.diagonal().mean().clamp_min(1e-30) * torch.eye(c.shape[0], dtype=c.dtype)
    lam, v = torch.linalg.eigh(c)
    lam = lam.clamp_min(lam.max() * 1e-15)
    return (v * lam.sqrt()) @ v.T, (v * lam.rsqrt()) @ v.T


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix SVD sign ambiguity (largest |entry| of each right vector positive): reproducible output."""
    idx = vh.abs().argmax(dim=1)
    s = torch.sign(vh[torch.arange(vh.shape[0]), idx])
    s[s == 0] = 1
    return u * s, vh * s[:, None]


def factorize(a: torch.Tensor, c: torch.Tensor | None, abs_mean: torch.Tensor | None, method: str,
              alpha: float = DAMPING) -> Factor:
    """Full-rank factorization of target A [out, in] with input second moment C [in, in]."""
    a = a.double()
    if a.shape[0] == 0:  # nothing left to compress (e.g. every key dim keeps RoPE)
        return Factor(down=a.new_zeros(0, a.shape[1]), up=a.new_zeros(0, 0), sigma=a.new_zeros(0))
    w = a.T  # [in, out], the paper's orientation
    if method == "care":
        s_half, s_inv = _sym_sqrt_and_inv(c.double(), alpha)
        u, sig, vh = torch.linalg.svd(s_half @ w, full_matrices=False)
        u, vh = _canonical_signs(u, vh)
        w_a = s_inv @ u * sig
    elif method == "svd":
        u, sig, vh = torch.linalg.svd(w, full_matrices=False)
        u, vh = _canonical_signs(u, vh)
        w_a = u * sig
    elif method == "asvd":
        s = abs_mean.double().clamp_min(1e-12) ** ASVD_ALPHA
        u, sig, vh = torch.linalg.svd(s[:, None] * w, full_matrices=False)
        u, vh = _canonical_signs(u, vh)
        w_a = (u * sig) / s[:, None]
    else:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    return Factor(down=w_a.T.contiguous(), up=vh.T.contiguous(), sigma=sig)


def projection_factor(a_in: torch.Tensor, basis_source: Factor) -> Factor:
    """Factor of y = A_in u that projects y onto an orthonormal output basis (Qwen3's K latent).

    `basis_source.up` [out, R] must have orthonormal columns (right singular vectors of some matrix
    with the same output space); the latent is c = up^T A_in u and y ~ up c.
    """
    up = basis_source.up
    return Factor(down=(up.T @ a_in.double()).contiguous(), up=up, sigma=basis_source.sigma)


def relative_error(a: torch.Tensor, a_hat: torch.Tensor, c: torch.Tensor, total: float | None = None) -> float:
    """sqrt( tr((A-Â) C (A-Â)^T) / total ), total defaulting to tr(A C A^T): relative activation error."""
    d = (a.double() - a_hat.double())
    num = torch.einsum("oi,ij,oj->", d, c.double(), d).clamp_min(0).item()
    den = total if total is not None else torch.einsum("oi,ij,oj->", a.double(), c.double(), a.double()).item()
    return (num / den) ** 0.5 if den > 0 else 0.0
