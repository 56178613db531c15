"""`--k-share auto`: choose the K/V split of the latent by scoring candidate splits on calibration text.

Why: how the latent budget is split between the K and the V latents matters (docs/RESULTS.md, "K/V
split"): a share below the converter's proportional default was best in 7 of 8 cells of
benchmarks/results/kshare_deploy.md, by up to 4.6 % in perplexity, and the best share moves with the
model and the budget, so no fixed share is right everywhere. Sweeping it (`care-eval sweep
--k-shares`) means a conversion per share; most of that is unnecessary, because nothing before the
rank allocation depends on the share: calibration, the rope map and the factorization are done once,
and each candidate share is only a different rank plan.

How: every candidate share (CANDIDATES and the proportional default; shares whose plans coincide are
scored once) is assembled as it would be written, WITHOUT the o_proj refit, and the converted model
runs on the first calibration windows (SCORE_TOKENS tokens) layer by layer beside the original, one
source layer in memory at a time; each candidate is scored by KL(original || converted) of the
next-token distributions, and the conversion then proceeds at the lowest (with the refit, if on). The
refit is left out of the scoring because it is most of a conversion's time and hardly changes the
ranking: without it, the sweep's best share, refitted, was within 0.2 % of the refitted optimum in 4 of
4 cells (benchmarks/results/kshare_attention_norefit.md). The scoring text is the calibration text the
factors were fitted to (no held-out split: the candidates share the fit, only their ranks differ).

Measured (benchmarks/results/kshare_auto.md, 3 models x KV 0.5 / 0.25, held-out perplexity): better than
the proportional split in 6 of 6 cells, within 0.8 % of the best fixed share. CANDIDATES reach down to
0.15 because llama3-small's best was there; SCORE_TOKENS = 4096 because 16384 picked the same share in
all six cells (kshare_auto_16384.md, kshare_auto_4096.md) at four times the cost.

Cost: per candidate, one forward of SCORE_TOKENS tokens through the converted layers (the original's
once; SmolLM2 on 2 CPU cores: 67 s for nine plans, about what the refit takes; Llama-3.1-8B shapes: ~140 s a
layer, 2.4x the refit: benchmarks/results/convert_speed_llama3-8b-2layers_cpu_kshare_auto.md), and its hidden states:
(candidates + 1) x tokens x hidden values in the calibration dtype.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import allocate, calibrate
from .errors import ConversionError
from .options import SCORE_TOKENS

CANDIDATES = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)   # besides the proportional default
LOGIT_CHUNK = 1024     # tokens per LM-head call when scoring (a 128K vocabulary: 0.5 GB of fp32 logits)

Ranks = tuple[list[int], list[int]]


def score_windows(windows: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
    """The first calibration windows that hold `tokens` tokens (default SCORE_TOKENS; at least one window,
    at most all)."""
    tokens = SCORE_TOKENS if tokens is None else tokens
    return windows[:max(1, min(windows.shape[0], math.ceil(tokens / windows.shape[1])))]


def choose(plan: Callable[[float | None], Ranks], config_for: Callable[[Ranks], object],
           tensors_for: Callable[[int, list[tuple[int, int]]], Iterable[dict]], source, windows: torch.Tensor,
           device: str, batch_size: int, dtype: torch.dtype, score_tokens: int | None = None
           ) -> tuple[float | None, dict]:
    """The K share to convert at (None: the proportional default) and the report of the choice.

    `plan(share)` gives a share's (K ranks, V ranks); `config_for(ranks)` the converted model's config with
    them (a CareMLAConfig); `tensors_for(l, [(k_rank, v_rank), ...])` layer l's converted attention tensors for
    each pair in turn, as the pipeline writes them (o_proj's weight excluded). With a single distinct plan (at parity every share
    is the lossless one) nothing is scored. The candidates are scored on the first `score_tokens` calibration tokens
    (default SCORE_TOKENS; whole windows, at least one)."""
    plans: dict[tuple, list[float | None]] = {}
    for share in [None, *CANDIDATES]:
        try:
            ranks = plan(share)
        except ConversionError:   # a share the budget's constraints cannot hold is not a candidate
            if share is None:     # (the default's error is the conversion's own)
                raise
            continue
        plans.setdefault((tuple(ranks[0]), tuple(ranks[1])), []).append(share)
    keys = list(plans)
    scored = score_windows(windows, score_tokens)
    kls = [0.0] if len(keys) == 1 else score(
        source, scored, [config_for((list(k), list(v))) for k, v in keys], tensors_for, device, batch_size, dtype)
    best = min(range(len(keys)), key=lambda i: (kls[i], i))   # ties: the earlier (the default first)
    chosen = plans[keys[best]][0]
    candidates = [{"k_shares": ["default" if s is None else s for s in plans[key]],
                   "k_share_actual": round(allocate.k_share_of(*key), 6),
                   "kl": None if len(keys) == 1 else round(kl, 6)} for key, kl in zip(keys, kls)]
    report = {"chosen": "default" if chosen is None else chosen, "k_share_actual": candidates[best]["k_share_actual"],
              "candidates": candidates, "score_windows": int(scored.shape[0]),
              "score_tokens": int(scored.numel()), "refit": False}
    return chosen, report


@torch.no_grad()
def score(source, windows: torch.Tensor, configs: list,
          tensors_for: Callable[[int, list[tuple[int, int]]], Iterable[dict]],
          device: str, batch_size: int, dtype: torch.dtype, desc: str | None = None) -> list[float]:
    """KL(original || converted) in nats per predicted token on `windows` [N, T] for each converted config
    (rank plan), the converted layers built by `tensors_for` with the source's own o_proj (no refit). Also
    what `--joint-key-weight auto` scores its candidates with (converter/joint_latent.py); `desc`: the bar's."""
    from model_defs.modeling_care import CareMLAAttention, CareRope   # noqa: PLC0415 (transformers modeling)

    model = source.model
    inner = model.model
    n, t = windows.shape
    park = calibrate.hidden_home(device, (len(configs) + 1) * n * t * inner.config.hidden_size
                                 * torch.finfo(dtype).bits // 8)
    original = calibrate.embedded_batches(inner.embed_tokens, windows, batch_size, device, dtype, park)
    streams = [[h.clone() for h in original] for _ in configs]
    pos = torch.arange(t, device=device).unsqueeze(0)
    care_rope = CareRope(configs[0]).to(device)   # the rope key's frequencies do not depend on the ranks
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    for l in tqdm(range(len(inner.layers)), desc=desc or f"k-share auto ({len(configs)} splits)", unit="layer"):
        src_layer = inner.layers[l]
        in_memory = source.layer_in_memory(l, dtype, device) if source.layer_in_memory else contextlib.nullcontext()
        with in_memory:
            layer = calibrate.working_copy(src_layer, device, dtype)
            try:
                w_o = src_layer.self_attn.o_proj.weight.detach()
                plans = tensors_for(l, [(config.k_ranks[l], config.v_ranks[l]) for config in configs])
                for config, hidden, tensors in zip(configs, streams, plans):
                    attn = CareMLAAttention(config, l)
                    attn.load_state_dict({**tensors, "o_proj.weight": w_o}, strict=True)
                    attn.to(device, dtype).eval()
                    for i, h in enumerate(hidden):
                        h = h.to(device)
                        rope = care_rope(pos.expand(h.shape[0], -1))
                        with calibrate.matmul_precision(device):
                            h = h + attn(layer.input_layernorm(h), rope, attention_mask=mask)[0]
                            h = h + layer.mlp(layer.post_attention_layernorm(h))
                        hidden[i] = h.to(park)
                for i, h in enumerate(original):
                    original[i] = calibrate.layer_forward(layer, h.to(device), pos, inner.rotary_emb, device).to(park)
            finally:
                if layer is src_layer:
                    layer.cpu()
    return _kl_per_token(model, original, streams, device, dtype)


def _kl_per_token(model, original: list[torch.Tensor], streams: list[list[torch.Tensor]], device: str,
                  dtype: torch.dtype) -> list[float]:
    """Mean KL(original || converted) of the next-token distributions (fp32 log-softmax), LOGIT_CHUNK tokens
    at a time: the final norm and LM head of the source, shared by every converted model."""
    norm = calibrate.working_copy(model.model.norm, device, dtype)
    head = calibrate.working_copy(model.lm_head, device, dtype)
    try:
        totals, tokens = [0.0] * len(streams), 0
        for i, h in enumerate(original):
            flat = h.flatten(0, 1)
            for s in range(0, flat.shape[0], LOGIT_CHUNK):
                log_p = torch.log_softmax(head(norm(flat[s:s + LOGIT_CHUNK].to(device))).float(), -1)
                p = log_p.exp()
                for c, hidden in enumerate(streams):
                    log_q = torch.log_softmax(head(norm(hidden[i].flatten(0, 1)[s:s + LOGIT_CHUNK].to(device)))
                                              .float(), -1)
                    totals[c] += (p * log_p.sub(log_q)).sum().item()
            tokens += flat.shape[0]
    finally:
        for module, src in ((norm, model.model.norm), (head, model.lm_head)):
            if module is src:
                module.cpu()
    return [total / tokens for total in totals]
