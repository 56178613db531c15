"""Rank allocation: how many latent dims each layer gets for K and for V.

Budget: the per-token KV cache summed over layers, `sum_l (r_K[l] + r_V[l] + d_r)`, equals the budget
exactly. The rope key costs d_r per layer; what remains is split between K and V in proportion to
their full (lossless) widths, so that parity (kv_ratio 1.0) is exactly lossless, unless `k_share`
(--k-share) fixes the fraction of the latent that goes to K. After RoRoPE has moved the key's
dominant energy into the rope key, the position-free rest of K often needs less than its width share:
on SmolLM2 at KV 0.5 a K share of 0.25 instead of the default 0.4 lowers one-shot perplexity
34.95 -> 32.28, on qwen3-small it is neutral (benchmarks/results/kshare.md).

  uniform  : every layer gets the same cache width (remainders go one each to the first layers), split
             between K and V within the layer, so a budget that divides evenly gives every layer the
             same width (e.g. 576 = 512 + 64 everywhere: vLLM's stock MLA kernels take it).
  adjusted : greedy water-filling (the paper's Eq. 1), separately for K and V: start every layer at
             its minimum, then repeatedly give +1 to the layer with the largest
             s_l(r) = sigma_{r+1}^2 / sum_{m>r} sigma_m^2 until the budget is spent. Per-layer min/max
             are fractions of the uniform rank (paper code: 1/2 and 2x), capped at the full width.

`multiple` (--rank-multiple M) allocates in units of M values: every k/v rank is a multiple of M, and with a
rope key of a multiple of M so is every projection that writes the latent (kv_a_proj_with_mqa: r_K + r_V + d_r;
Qwen3's k_latent_proj: r_K + d_r, v_latent_proj: r_V), which quantized kernels want (vLLM's CPU W4A16 kernel
takes output widths in multiples of 32, Marlin on GPUs multiples of 64). Water-filling then scores a unit by
the energy of its M singular values, `sum_{r<m<=r+M} sigma_m^2 / sum_{m>r} sigma_m^2` (M = 1: the paper's
score). The latent budget is rounded down to whole units (less than M values below it in all), and a layer's
lossless width down to whole units.
"""
from __future__ import annotations

import heapq
import math

import torch

from .cache_plan import check_latent_room
from .errors import ConversionError
from .options import POLICIES



def split_budget(latent_total: int, full_k: list[int], full_v: list[int],
                 k_share: float | None = None) -> tuple[int, int]:
    """Split the latent budget between K and V: a `k_share` fraction to K (default: proportionally
    to their full widths), clamped so that neither exceeds its lossless width."""
    fk, fv = sum(full_k), sum(full_v)
    if latent_total > fk + fv:
        raise ConversionError(f"budget of {latent_total} latent values exceeds the lossless width {fk + fv}")
    share = fk / (fk + fv) if k_share is None else k_share
    k_total = min(fk, round(latent_total * share)) if fk else 0
    v_total = latent_total - k_total
    if v_total > fv:
        k_total, v_total = latent_total - fv, fv
    return k_total, v_total


def _check_values_kept(fewest: int, v_total: int, num_layers: int, k_share: float | None) -> None:
    """Every layer keeps at least one value rank (the values have no rope part to fall back on, and a care_mla
    config with a v_rank of 0 does not load): `fewest`, the smallest value rank the plan can give a layer, is >= 1.
    Why here: a large --k-share under uniform ranks wrote such a config with exit 0; under adjusted ranks it was
    refused as per-layer bounds that --min/--max-rank-frac cannot move."""
    if fewest < 1:
        share, fix = ((f"--k-share {k_share:g}", "lower --k-share, raise the budget") if k_share is not None
                      else ("the proportional K/V split", "raise the budget"))
        raise ConversionError(f"{share} leaves the value latent {v_total} rank units for {num_layers} layers, and "
                              f"every layer needs at least one: {fix}, or lower --rank-multiple")


def k_share_of(k_ranks: list[int], v_ranks: list[int]) -> float:
    """The share of the latent that these ranks give to K: sum r_K / sum (r_K + r_V) (what a --k-share becomes
    once ranks are whole numbers; reported by care_report.json, the model card and the sweeps)."""
    return sum(k_ranks) / (sum(k_ranks) + sum(v_ranks))


def uniform_ranks(total: int, full: list[int]) -> list[int]:
    n = len(full)
    base, extra = divmod(total, n)
    ranks = [base + (1 if i < extra else 0) for i in range(n)]
    if any(r > f for r, f in zip(ranks, full)):
        raise ConversionError(f"uniform ranks {ranks} exceed the per-layer maximum {full}")
    return ranks


def _score(sig2: torch.Tensor, tails: torch.Tensor, r: int) -> float:
    if r >= len(sig2) or tails[r] <= 0:
        return 0.0
    return float(sig2[r] / tails[r])


def adjusted_ranks(total: int, sigmas: list[torch.Tensor], full: list[int], min_frac: float = 0.5,
                   max_frac: float = 2.0, min_rank: int = 0) -> list[int]:
    """Greedy water-filling of `total` ranks over layers (ties go to the lower layer index)."""
    n = len(sigmas)
    base = total / n
    lo = [min(f, max(min_rank, math.floor(min_frac * base))) for f in full]
    hi = [min(f, max(lo_i, math.ceil(max_frac * base))) for f, lo_i in zip(full, lo)]
    if sum(lo) > total or sum(hi) < total:
        raise ConversionError(f"cannot spend {total} ranks within per-layer bounds [{sum(lo)}, {sum(hi)}]; "
                              f"adjust --min-rank-frac/--max-rank-frac")
    ranks = list(lo)
    sig2 = [s.double() ** 2 for s in sigmas]
    tails = [torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0]) for s in sig2]
    heap = [(-_score(sig2[l], tails[l], ranks[l]), l) for l in range(n) if ranks[l] < hi[l]]
    heapq.heapify(heap)
    for _ in range(total - sum(lo)):
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        if ranks[l] < hi[l]:
            heapq.heappush(heap, (-_score(sig2[l], tails[l], ranks[l]), l))
    return ranks


def unit_sigmas(sigma: torch.Tensor, multiple: int) -> torch.Tensor:
    """Singular values grouped into units of `multiple`: the square root of each group's energy (a last
    partial group is dropped: it can never be allocated whole)."""
    if multiple == 1:
        return sigma
    whole = len(sigma) // multiple * multiple
    return (sigma[:whole].double() ** 2).view(-1, multiple).sum(1).sqrt()


def plan_ranks(policy: str, cache_budget: int, rope_dim: int, full_k: list[int], full_v: list[int],
               sig_k: list[torch.Tensor], sig_v: list[torch.Tensor], min_frac: float = 0.5,
               max_frac: float = 2.0, k_share: float | None = None,
               multiple: int = 1) -> tuple[list[int], list[int]]:
    """Per-layer (k_ranks, v_ranks) whose cache sum_l (k+v+rope_dim) equals `cache_budget` exactly, or with
    `multiple` > 1 (ranks in units of that many values) the largest whole number of units below it."""
    if multiple > 1:
        n = len(full_k)
        check_latent_room(cache_budget, n, rope_dim, multiple)
        unit_k, unit_v = [f // multiple for f in full_k], [f // multiple for f in full_v]
        units = min((cache_budget - n * rope_dim) // multiple, sum(unit_k) + sum(unit_v))
        k, v = plan_ranks(policy, units, 0, unit_k, unit_v,
                          [unit_sigmas(s, multiple) for s in sig_k], [unit_sigmas(s, multiple) for s in sig_v],
                          min_frac, max_frac, k_share)
        return [r * multiple for r in k], [r * multiple for r in v]
    n = len(full_k)
    check_latent_room(cache_budget, n, rope_dim)
    latent = cache_budget - n * rope_dim
    if policy == "uniform":
        per_layer = uniform_ranks(latent, [fk + fv for fk, fv in zip(full_k, full_v)])
        split = [split_budget(lat, [fk], [fv], k_share) for lat, fk, fv in zip(per_layer, full_k, full_v)]
        _check_values_kept(min(v for _, v in split), sum(v for _, v in split), n, k_share)
        return [k for k, _ in split], [v for _, v in split]
    k_total, v_total = split_budget(latent, full_k, full_v, k_share)
    if policy == "adjusted":
        _check_values_kept(v_total // n, v_total, n, k_share)   # (one each is possible iff v_total >= n)
        return (adjusted_ranks(k_total, sig_k, full_k, min_frac, max_frac, 0),
                adjusted_ranks(v_total, sig_v, full_v, min_frac, max_frac, 1))
    raise ConversionError(f"unknown rank policy {policy!r} (choose from {', '.join(POLICIES)})")
