"""Low-rank factorization of one K or V target: y = A u  ->  y ~ up[:, :r] @ (down[:r] @ u).

`A` is [out, in] (torch orientation), `u` the target's input with second moment `C` (sum u u^T).
Each method returns the FULL factorization, ordered by energy; truncating to the first r latent dims
is the method's rank-r solution (nested property), so ranks are allocated after factorizing once.

  care : SVD of C_d^{1/2} A^T (C_d = C + alpha*mean(diag C)*I, alpha = 0.01 relative, as the paper
         states), W_a = C_d^{-1/2} U S, W_b = V^T. Minimizes the activation error ||C^{1/2}(A - Â)^T||.
         Computed in the equivalent output-space form: since C_d^{1/2} A^T = U S V^T,
         W_a = C_d^{-1/2} U S = A^T V, so the factor is the projection of the outputs onto the top
         eigenvectors V of the [out, out] Gram matrix A C_d A^T (eigenvalues S^2). One eigh of an
         [out, out] matrix instead of an eigh of the [in, in] C plus an SVD: for Llama-8B shapes
         1024^2 instead of 4096^2, which is what makes an 8B conversion take seconds, not minutes.
  svd  : plain weight SVD of A^T (Palu's baseline).
  asvd : SVD of diag(s^0.5) A^T with s = mean |u| (ASVD's input scaling).
All in fp64 (eigh/SVD of covariances lose too much in fp32), on whatever device the inputs are on
(the pipeline passes CUDA tensors when converting with --device cuda); results stay on that device.
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

    def keep(self, r: int) -> "Factor":
        """The first r latent dims as a Factor owning just them (sigma kept whole: it is only read);
        truncate() returns views that would keep the full factor's memory alive."""
        down, up = self.truncate(r)
        return Factor(down.clone(), up.clone(), self.sigma)

    def to(self, device) -> "Factor":
        return Factor(self.down.to(device), self.up.to(device), self.sigma.to(device))

    def approx(self, r: int) -> torch.Tensor:
        down, up = self.truncate(r)
        return up @ down


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix SVD sign ambiguity (largest |entry| of each right vector positive): reproducible output."""
    idx = vh.abs().argmax(dim=1)
    s = torch.sign(vh[torch.arange(vh.shape[0], device=vh.device), idx])
    s[s == 0] = 1
    return u * s, vh * s[:, None]


def _gram_eig(a: torch.Tensor, c: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(out, in) eigenvectors (rows, sign-fixed) and sqrt-eigenvalues of A C_d A^T, descending."""
    c = 0.5 * (c + c.T)
    damp = alpha * c.diagonal().mean().clamp_min(1e-30)
    gram = a @ c @ a.T + damp * (a @ a.T)              # = A C_d A^T without forming C_d
    lam, v = torch.linalg.eigh(0.5 * (gram + gram.T))
    r = min(a.shape)
    lam, v = lam.flip(0)[:r].clamp_min(0), v.flip(1)[:, :r]
    _, vh = _canonical_signs(v, v.T.contiguous())
    return vh, lam.sqrt()


def _sqrt_and_inverse(m: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M_d^{1/2} and M_d^{-1/2} of a PSD matrix, damped like C: M_d = M + alpha*mean(diag M)*I."""
    m = 0.5 * (m + m.T)
    damp = alpha * m.diagonal().mean().clamp_min(1e-30)
    lam, u = torch.linalg.eigh(m + damp * torch.eye(m.shape[0], dtype=m.dtype, device=m.device))
    root = lam.clamp_min(damp).sqrt()
    return (u * root) @ u.T, (u / root) @ u.T


def factorize(a: torch.Tensor, c: torch.Tensor | None, abs_mean: torch.Tensor | None, method: str,
              alpha: float = DAMPING, out_weight: torch.Tensor | None = None) -> Factor:
    """Full-rank factorization of target A [out, in] with input second moment C [in, in].

    `out_weight` M [out, out] (care only): minimize tr(M (A - Â) C (A - Â)^T) instead, i.e. the error
    as something downstream that reads y through M's square root sees it (the queries reading the
    keys, o_proj reading the values; see converter/attention_weights.py). Solved exactly the same
    way on the whitened target M_d^{1/2} A, then mapped back: up = M_d^{-1/2} V, down = V^T M_d^{1/2} A.
    """
    a = a.double()
    if a.shape[0] == 0:  # nothing left to compress (e.g. every key dim keeps RoPE)
        return Factor(down=a.new_zeros(0, a.shape[1]), up=a.new_zeros(0, 0), sigma=a.new_zeros(0))
    w = a.T  # [in, out], the paper's orientation
    if out_weight is not None and method != "care":
        raise ValueError(f"an output weighting needs method 'care' (got {method!r})")
    if method == "care":
        if out_weight is not None:
            root, inv_root = _sqrt_and_inverse(out_weight.to(a.device, torch.float64), alpha)
            whitened = root @ a
            vh, sig = _gram_eig(whitened, c.to(a.device, torch.float64), alpha)
            return Factor(down=(vh @ whitened).contiguous(), up=(inv_root @ vh.T).contiguous(), sigma=sig)
        vh, sig = _gram_eig(a, c.to(a.device, torch.float64), alpha)
        return Factor(down=(vh @ a).contiguous(), up=vh.T.contiguous(), sigma=sig)
    if method == "svd":
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


@dataclass
class ErrorTable:
    """The activation error of a factor's rank-r truncation for any r, without the input covariance.

    With W = down, U = up and target T: tr((T - U_r W_r) C (T - U_r W_r)^T) = tr(T C T^T)
    - 2 tr(U_r (W C T^T)_r) + tr(U_r (W C W^T)_rr U_r^T), so an [R, out] and an [R, R] product stand in
    for C [in, in]: the pipeline frees each layer's covariances as soon as it is factorized, before
    rank allocation has chosen r (for 8B shapes C_x is 134 MB a layer, the table 16 MB)."""
    target_energy: float    # tr(T C T^T)
    total: float            # what the error is relative to
    wct: torch.Tensor       # W C T^T [R, out]
    wcw: torch.Tensor       # W C W^T [R, R]

    def relative_error(self, up: torch.Tensor, r: int) -> float:
        u = up[:, :r].double()
        num = (self.target_energy - 2 * (u * self.wct[:r].T).sum().item()
               + ((u @ self.wcw[:r, :r]) * u).sum().item())
        return (max(num, 0.0) / self.total) ** 0.5 if self.total > 0 else 0.0

    def keep(self, r: int) -> "ErrorTable":
        return ErrorTable(self.target_energy, self.total, self.wct[:r].clone(), self.wcw[:r, :r].clone())


def error_table(target: torch.Tensor, factor: Factor, c: torch.Tensor, total: float | None = None) -> ErrorTable:
    """ErrorTable of `factor` for target T [out, in] with input second moment C; `total` defaults to
    tr(T C T^T). The products run where the inputs are; the table comes back to the CPU."""
    t, w = target.double(), factor.down.to(target.device, torch.float64)
    c = c.to(target.device, torch.float64)
    wc = w @ c
    energy = ((t @ c) * t).sum().item()
    return ErrorTable(energy, energy if total is None else total, (wc @ t.T).cpu(), (wc @ w.T).cpu())


def relative_error(a: torch.Tensor, a_hat: torch.Tensor, c: torch.Tensor, total: float | None = None) -> float:
    """sqrt( tr((A-Â) C (A-Â)^T) / total ), total defaulting to tr(A C A^T): relative activation error."""
    d = (a.double() - a_hat.double())
    c = c.double()
    num = max(((d @ c) * d).sum().item(), 0.0)
    den = total if total is not None else ((a.double() @ c) * a.double()).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0
