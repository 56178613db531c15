"""One latent shared by keys and values (`care-convert --latent joint`).

Why: the CARE paper fits separate K and V latents; K and V are maps of the same layer input, so their outputs
share directions, and one latent of the same cache width fitted to both (DeepSeek's MLA form: vLLM's MLA layer
reads it natively, kv_b_proj maps the one latent to both) keeps more. Measured before it was built
(benchmarks/results/joint_latent.md): 0.56-0.79x the key/value output energy left out at the same cache on three
models; with real conversions: benchmarks/results/joint_latent_convert.md.

What: the latent is fitted to the key's position-free rows and the values together, y = [Q_N W_K; W_V] x
(`target`), with the whole output moment, cross terms included (`moment`; calibration's `ckv`), under an output
weighting with --objective attention (`weighting`). Qwen3's keys pass k_norm first, so its target reads two
inputs, the post-norm keys k and x: y = [Q_N k; W_V x] = blockdiag(Q_N, W_V) [k; x], and the latent is the sum
of a map of each, c = B_K Q_N k + B_V W_V x (k_latent_proj's and v_latent_proj's latent rows, docs/FORMAT.md).
The damping scales each input by its own energy, as the separate K and V latents' do.

With `--objective attention` the key rows are weighted by the queries (M_K) and the value rows by o_proj (M_V),
each over its own total, and W (`--joint-key-weight`) says how much a unit of relative key logit error counts
against one of relative value output error. The best W differs by model (SmolLM2 wanted 4, the small Llama 0.25
in the emulation), as the best K share of separate latents does, so `--joint-key-weight auto` chooses it as
`--k-share auto` chooses the share: every candidate is factorized and allocated, assembled without the o_proj refit
and scored by KL(original || converted) on the first calibration tokens (converter/kshare_auto.score).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from . import factorize, kshare_auto

KEY_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)   # --joint-key-weight auto's candidates
DEFAULT_KEY_WEIGHT = 1.0   # without --joint-key-weight: a unit of relative key error counts as one of value error


def target(arch: str, q_n: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """The map a joint latent approximates (fp64): the key's RoRoPE NoPE rows over the values, [Q_N W_K; W_V] of x
    (Llama path), or blockdiag(Q_N, W_V) of [k; x] (Qwen3: k the post-k_norm keys; `wk` unused)."""
    q_n, wv = q_n.to(wv.device, torch.float64), wv.double()
    if arch == "qwen3":
        return torch.block_diag(q_n, wv)
    return torch.cat([q_n @ wk.double(), wv])


def moment(q_n: torch.Tensor, ck: torch.Tensor, ckv: torch.Tensor, cv: torch.Tensor, x_scale: float,
           wv: torch.Tensor | None = None) -> factorize.Moment:
    """The output Moment of `target`: [[G_K, G_KV], [G_KV^T, G_V]] = [[Q_N C_K Q_N^T, Q_N C_KV], [C_KV^T Q_N^T, C_V]].
    `wv` given (Qwen3's target, inputs [k; x]): each input is damped by its own scale, mean(diag C_K) for the
    post-norm keys and `x_scale` for x."""
    gk, gkv = q_n @ ck @ q_n.T, q_n @ ckv
    gram = torch.cat([torch.cat([gk, gkv], 1), torch.cat([gkv.T, cv], 1)])
    if wv is None:
        return factorize.Moment(gram, x_scale)
    damp = torch.block_diag(ck.diagonal().mean().item() * (q_n @ q_n.T), x_scale * (wv @ wv.T))
    return factorize.Moment(gram, x_scale, damp)


def weighting(gram: torch.Tensor, mk: torch.Tensor, mv: torch.Tensor, key_weight: float) -> torch.Tensor:
    """--objective attention's output weighting of a joint latent of outputs with moment `gram` ([K_nope; V]):
    blockdiag(W M_K / tr(M_K G_K), M_V / tr(M_V G_V)), each part's error relative to its own total, the key part
    counting W times (without it, --objective kv: key and value energy as they are)."""
    n_k = mk.shape[0]
    return torch.block_diag(key_weight * mk / torch.trace(mk @ gram[:n_k, :n_k]),
                            mv / torch.trace(mv @ gram[n_k:, n_k:]))


def rank_cap(latent_total: int, num_layers: int, max_rank_frac: float, multiple: int) -> int:
    """An upper bound on any layer's allocated rank (uniform or adjusted, in units of `multiple`): how much of each
    candidate's factor `--joint-key-weight auto` keeps until one is chosen."""
    return math.ceil(max(1.0, max_rank_frac) * latent_total / num_layers) + multiple


def choose_key_weight(weights: list[float], configs: list, tensors_for: Callable[[int, list[tuple[int, int]]],
                                                                                  Iterable[dict]],
                      source, windows: torch.Tensor, device: str, batch_size: int, dtype: torch.dtype,
                      score_tokens: int | None = None) -> tuple[int, dict]:
    """(index of the chosen weight, the report of the choice). `configs[i]`: the converted config of candidate i
    (its ranks); `tensors_for(l, pairs)`: layer l's converted tensors for each candidate in turn."""
    scored = kshare_auto.score_windows(windows, score_tokens)
    kls = kshare_auto.score(source, scored, configs, tensors_for, device, batch_size, dtype,
                            desc=f"joint key weight auto ({len(configs)} weights)")
    best = min(range(len(weights)), key=lambda i: (kls[i], i))
    report = {"chosen": weights[best],
              "candidates": [{"joint_key_weight": w, "kl": round(kl, 6)} for w, kl in zip(weights, kls)],
              "score_windows": int(scored.shape[0]), "score_tokens": int(scored.numel()), "refit": False}
    return best, report
