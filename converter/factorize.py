"""Low-rank factorization of one K or V target: y = A u  ->  y ~ up[:, :r] @ (down[:r] @ u).

`A` is [out, in] (torch orientation), `u` the target's input with second moment `C` (sum u u^T).
Each method returns the FULL factorization, ordered by energy; truncating to the first r latent dims
is the method's rank-r solution (nested property), so ranks are allocated after factorizing once.
Every method's latent is a map of the target's own outputs, down = B A (B [R, out], `Factor.basis`),
so all that the factorization and its error need of C is the output moment A C A^T and mean(diag C)
(`Moment`): the converter never holds more than one layer's [in, in] input covariance (calibration
reduces each layer's to output space at once; converter/calibrate.py).

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

from .options import METHODS

DAMPING = 0.01
ASVD_ALPHA = 0.5


@dataclass
class Moment:
    """What a factorization of target A [out, in] needs of its input's second moment C [in, in]:
    the output moment A C A^T [out, out] and mean(diag C) (the damping's scale). `damp_gram`: A S A^T for an
    input whose parts differ in scale, damped by S = blockdiag(mean(diag C_i) I) per part instead of
    mean(diag C) I (Qwen3's joint latent reads the post-norm keys and the layer input, converter/joint_latent.py)."""
    gram: torch.Tensor
    scale: float
    damp_gram: torch.Tensor | None = None

    @classmethod
    def of(cls, a: torch.Tensor, c: torch.Tensor) -> "Moment":
        """From the whole input covariance (tests, and anything holding C)."""
        a, c = a.double(), c.to(a.device, torch.float64)
        return cls(a @ c @ a.T, c.diagonal().mean().item())


@dataclass
class Factor:
    down: torch.Tensor | None  # [R, in] = basis @ A (None in a light() factor)
    up: torch.Tensor           # [out, R]
    sigma: torch.Tensor        # [R] singular values, descending (what rank allocation ranks by)
    basis: torch.Tensor        # [R, out]: the latent as a map of the target's outputs

    def truncate(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down[:r], self.up[:, :r]

    def keep(self, r: int) -> "Factor":
        """The first r latent dims as a Factor owning just them (sigma kept whole: it is only read);
        truncate() returns views that would keep the full factor's memory alive."""
        down = None if self.down is None else self.down[:r].clone()
        return Factor(down, self.up[:, :r].clone(), self.sigma, self.basis[:r].clone())

    def light(self) -> "Factor":
        """This factor without `down`, its bulk ([R, in]: 33 MB per K or V factor of an 8B layer, 67 MB
        of 70B): what the pipeline holds for every layer until rank allocation has chosen r;
        `materialize` then rebuilds the rows it needs from the target."""
        return Factor(None, self.up, self.sigma, self.basis)

    def materialize(self, a: torch.Tensor, r: int) -> "Factor":
        """The first r latent dims with `down` = basis[:r] @ A for target A [out, in]."""
        basis = self.basis[:r].to(a.device, torch.float64)
        return Factor((basis @ a.double()).contiguous(), self.up[:, :r].to(a.device), self.sigma, basis)

    def to(self, device) -> "Factor":
        return Factor(None if self.down is None else self.down.to(device), self.up.to(device),
                      self.sigma.to(device), self.basis.to(device))

    def approx(self, r: int) -> torch.Tensor:
        down, up = self.truncate(r)
        return up @ down


def _canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix SVD sign ambiguity (largest |entry| of each right vector positive): reproducible output."""
    idx = vh.abs().argmax(dim=1)
    s = torch.sign(vh[torch.arange(vh.shape[0], device=vh.device), idx])
    s[s == 0] = 1
    return u * s, vh * s[:, None]


def _gram_eig(a: torch.Tensor, m: Moment, alpha: float, w: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(out, in) eigenvectors (rows, sign-fixed) and sqrt-eigenvalues of W A C_d A^T W^T
    (W = I unless an output whitening `w` is given), descending."""
    if m.damp_gram is None:
        damp = alpha * max(m.scale, 1e-30) * (a @ a.T)
    else:
        damp = alpha * m.damp_gram.to(a.device, torch.float64)
    gram = m.gram.to(a.device, torch.float64) + damp   # = A C_d A^T without forming C_d
    if w is not None:
        gram = w @ gram @ w.T
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


def factorize(a: torch.Tensor, c: Moment | torch.Tensor | None, abs_mean: torch.Tensor | None, method: str,
              alpha: float = DAMPING, out_weight: torch.Tensor | None = None) -> Factor:
    """Full-rank factorization of target A [out, in] with input second moment C [in, in], given as its
    `Moment` for A or whole (care only; svd and asvd read the weights and `abs_mean` alone).

    `out_weight` M [out, out] (care only): minimize tr(M (A - Â) C (A - Â)^T) instead, i.e. the error
    as something downstream that reads y through M's square root sees it (the queries reading the
    keys, o_proj reading the values; see converter/attention_weights.py). Solved exactly the same
    way on the whitened target M_d^{1/2} A, then mapped back: up = M_d^{-1/2} V, down = V^T M_d^{1/2} A,
    each latent dimension then rescaled so that up's columns have unit norm (_unit_columns).
    """
    a = a.double()
    if a.shape[0] == 0:  # nothing left to compress (e.g. every key dim keeps RoPE)
        return Factor(down=a.new_zeros(0, a.shape[1]), up=a.new_zeros(0, 0), sigma=a.new_zeros(0),
                      basis=a.new_zeros(0, 0))
    w = a.T  # [in, out], the paper's orientation
    if out_weight is not None and method != "care":
        raise ValueError(f"an output weighting needs method 'care' (got {method!r})")
    if method == "care":
        m = c if isinstance(c, Moment) else Moment.of(a, c)
        if out_weight is not None:
            root, inv_root = _sqrt_and_inverse(out_weight.to(a.device, torch.float64), alpha)
            vh, sig = _gram_eig(a, m, alpha, root)
            return _factor(a, *_unit_columns(vh @ root, inv_root @ vh.T), sig)
        vh, sig = _gram_eig(a, m, alpha)
        return _factor(a, vh, vh.T, sig)
    if method == "svd":
        # A^T = U S V^T, W_a = U S = A^T V: the latent is V^T A
        u, sig, vh = torch.linalg.svd(w, full_matrices=False)
    elif method == "asvd":
        # diag(s) A^T = U S V^T, W_a = diag(s)^-1 U S = A^T V: again V^T A
        s = abs_mean.double().clamp_min(1e-12) ** ASVD_ALPHA
        u, sig, vh = torch.linalg.svd(s[:, None] * w, full_matrices=False)
    else:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    _, vh = _canonical_signs(u, vh)
    return _factor(a, vh, vh.T, sig)


def _unit_columns(basis: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D basis, up D^-1) with D = diag(column norms of up): the same product, with up's columns of unit norm as
    every unweighted factor's are (up = V, orthonormal), so that the latent carries the outputs' own scale.

    Why: an output weighting's scale is arbitrary (M_K sums query moments over calibration tokens; a joint
    latent's is divided by its part's energy), and up = M^-1/2 V, down = V^T M^1/2 A put all of it in the
    split: with SmolLM2's joint attention-objective latent, kv_a_proj's latent rows came out ~1e-4 and kv_b_proj
    ~60 (up to 850). The product was right, but AdamW moves every entry by ~lr, so care-heal's first update at
    its default lr (2e-5) raised the KL to the original from 0.16 to 4.9 on held-out chat; and a latent of
    ~1e-3 is below what an fp8 KV cache (e4m3, scale 1) holds."""
    norms = up.norm(dim=0)
    d = torch.where(norms > 0, norms, torch.ones_like(norms))
    return basis * d[:, None], up / d


def _factor(a: torch.Tensor, basis: torch.Tensor, up: torch.Tensor, sigma: torch.Tensor) -> Factor:
    return Factor(down=(basis @ a).contiguous(), up=up.contiguous(), sigma=sigma, basis=basis.contiguous())


def projection_factor(a_in: torch.Tensor, basis_source: Factor) -> Factor:
    """Factor of y = A_in u that projects y onto an orthonormal output basis (Qwen3's K latent).

    `basis_source.up` [out, R] must have orthonormal columns (right singular vectors of some matrix
    with the same output space); the latent is c = up^T A_in u and y ~ up c.
    """
    up = basis_source.up
    return _factor(a_in.double(), up.T, up, basis_source.sigma)


def error_curve(target: torch.Tensor, factor: Factor, c: Moment | torch.Tensor, total: float | None = None,
                rows: slice | None = None) -> torch.Tensor:
    """Relative activation error of `factor`'s rank-r truncation for every r = 0..R, [R+1] fp64 on the
    CPU: sqrt(tr((T - U_r W_r) C (T - U_r W_r)^T) / total), `total` defaulting to tr(T C T^T).

    Why a curve: the report needs the error at the rank allocation will choose, and the pipeline frees
    each layer's statistics as soon as it is factorized. With W = down = B T (Factor.basis), U = up and
    G = T C T^T (the `Moment`), the error is tr(G) - 2 sum_{i<r} u_i . (B G)_i + sum_{i,j<r} (U^T U)_ij
    (B G B^T)_ij: prefix sums over i (and over the leading r x r block), all r at once in O(R^2 out).

    `rows`: the error of those outputs only (T's rows `rows` against U's), e.g. the keys' or the values' part of a
    latent shared by both (--latent joint); `total` then defaults to their own energy."""
    m = c if isinstance(c, Moment) else Moment.of(target, c)
    b = factor.basis.double()
    u = factor.up.to(b.device, torch.float64)
    gram = m.gram.to(b.device, torch.float64)
    bg = b @ gram
    rows = slice(None) if rows is None else rows
    u = u[rows]
    energy = gram[rows, rows].diagonal().sum().item()
    total = energy if total is None else total
    linear = (u * bg[:, rows].T).sum(0)                           # u_i . (B G)_i
    h = (u.T @ u) * (bg @ b.T)                                    # symmetric [R, R]
    quadratic = 2 * h.tril(-1).sum(1) + h.diagonal()              # what row/column i adds to the block sum
    zero = linear.new_zeros(1)
    num = energy - 2 * torch.cat([zero, linear.cumsum(0)]) + torch.cat([zero, quadratic.cumsum(0)])
    if total <= 0:
        return torch.zeros_like(num).cpu()
    return (num.clamp_min(0) / total).sqrt().cpu()


def relative_error(a: torch.Tensor, a_hat: torch.Tensor, c: torch.Tensor, total: float | None = None) -> float:
    """sqrt( tr((A-Â) C (A-Â)^T) / total ), total defaulting to tr(A C A^T): relative activation error."""
    d = (a.double() - a_hat.double())
    c = c.double()
    num = max(((d @ c) * d).sum().item(), 0.0)
    den = total if total is not None else ((a.double() @ c) * a.double()).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0
