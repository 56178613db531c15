"""The conversion pipeline: load -> calibrate -> map RoPE -> factorize -> allocate -> assemble (+ refit
o_proj, converter/refit.py) + write.

`convert()` is the Python API behind `care-convert`. All validation that does not need the model
happens before it is loaded; nothing is written to OUT until the whole checkpoint is ready (it is
streamed into a temporary folder beside OUT, layer by layer, and renamed at the end).

Host memory, besides the memory-mapped source: a Qwen3-MoE's experts one layer at a time
(converter/experts.py), one layer's input covariance at a time during
calibration (reduced at once to small output-space moments), then per layer only what rank allocation
needs (each factor without its [R, in] latent map, rebuilt once the rank is chosen), then one shard of
output tensors at a time. The o_proj refit (on by default) holds the calibration windows' hidden states
twice (original and converted model) and one layer's converted attention outputs before o_proj:
samples x seqlen x (2 x hidden + n_h*d_h) in the calibration dtype, and two [n_h*d_h]^2 fp64 moments
of one layer. benchmarks/convert_memory.py measures it on 8B shapes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from model_defs.configuration_care import AUTO_MAP, CareMLAConfig, variant_architecture
from tqdm.auto import tqdm

from . import (allocate, assemble, attention_weights, cache_plan, calib_data, calibrate, factorize, joint_latent,
               kshare_auto, load, model_card, refit, rope_map, source_rope, write)
from .cache_plan import AttentionShape
from .cli_checks import check_free_space, convert_inputs, prepare_out
from .errors import ConversionError
from .options import AUTO, Options
from .plot import plot_ranks
from .versions import installed_version, recorded_versions

MODEL_TYPE = "care_mla"
# Qwen3-MoE config fields carried over unchanged (the sparse MLP is copied as it is)
MOE_CONFIG_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                   "decoder_sparse_step", "mlp_only_layers")

DTYPES = load.DTYPES


def moe_config(cfg) -> dict:
    """A MoE source's sparse-MLP fields in Qwen3-MoE's terms (the converted config's, docs/FORMAT.md). A Mixtral
    layer's MLP is Qwen3-MoE's on every layer with normalized top-k weights (softmax, top k, renormalized: what
    transformers' MixtralTopKRouter computes), experts of intermediate_size."""
    if getattr(cfg, "model_type", None) == "mixtral":   # (Qwen3MoeConfig also answers to num_local_experts)
        return {"num_experts": cfg.num_local_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "moe_intermediate_size": cfg.intermediate_size, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": []}
    return {k: getattr(cfg, k) for k in MOE_CONFIG_KEYS}


@dataclass
class Timer:
    seconds: dict = field(default_factory=dict)

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0, 3)
        return _Stage()


def output_dtype(opts: Options, model: torch.nn.Module) -> str:
    """The checkpoint's dtype: --dtype, or with `auto` the dtype the source is stored in (as transformers'
    dtype="auto"). Why not always fp32: an 8B bf16 source would become a 32 GB checkpoint, and the
    fp32 copies of its MLP and embedding weights alone need ~27 GB of RAM on top of the 16 GB source.
    GGUF sources are dequantized to fp32, so they stay fp32."""
    if opts.dtype != "auto":
        return opts.dtype
    names = {v: k for k, v in DTYPES.items()}
    return names.get(next(model.parameters()).dtype, "float32")


def cache_shape(opts: Options, cfg) -> tuple[int, int]:
    """(cache values per token over all layers, rope key width) of converting a model of config `cfg` with
    `opts`. Refuses, before anything slow runs, a budget above parity, a rope key wider than the original keys,
    and rope keys that leave the latents no room (converter/cache_plan.py; care-convert asked the same of the
    source's config.json before loading it, where it could read it: converter/source_checks.py)."""
    return cache_plan.cache_shape(opts, AttentionShape.of_config(cfg))


def _load_or_collect_stats(src: load.Source, windows: torch.Tensor, opts: Options, meta: dict) -> calibrate.CalibStats:
    path = Path(opts.stats_cache) if opts.stats_cache else None
    if path is not None and path.is_file():
        try:   # (weights_only: tensors, numbers, strings and containers; a pickle naming code is refused)
            saved = torch.load(path, weights_only=True)
        except Exception as e:   # noqa: BLE001  (truncated by a full disk, or written by something else)
            raise ConversionError(f"stats cache {path} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); delete it") from None
        saved_meta = saved.get("meta") if isinstance(saved, dict) else None   # (`meta`: what this run expects)
        if not isinstance(saved_meta, dict):
            raise ConversionError(f"stats cache {path} is not a care-convert statistics file (a torch file holding "
                                  f"{type(saved).__name__}); delete it")
        version = saved_meta.get("stats_version")
        if version != calibrate.STATS_VERSION:
            raise ConversionError(f"stats cache {path} was written by an older care-convert (statistics version "
                                  f"{version}, this one reads {calibrate.STATS_VERSION}); delete it")
        try:
            stats = calibrate.CalibStats.from_dict(saved)
        except (KeyError, TypeError) as e:
            raise ConversionError(f"stats cache {path} is not a complete care-convert statistics file ({e!r}); "
                                  f"delete it") from None
        if stats.meta == meta:
            return stats
        raise ConversionError(f"stats cache {path} was made for other inputs ({stats.meta}); delete it")
    stats = calibrate.collect_stats(src.model, windows, src.arch, opts.device, opts.calib_batch,
                                    dtype=DTYPES[opts.calib_dtype], layer_in_memory=src.layer_in_memory)
    stats.meta = meta
    # whole or not at all: a file cut short (Ctrl-C, SIGTERM, a full disk) would be read by the next run
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(stats.to_dict(), tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return stats


def convert(src: str | Path, out: str | Path, *, calib_files: list[str | Path], **kw) -> dict:
    """Convert `src` into a care_mla checkpoint at `out`; returns the care_report dict."""
    opts = Options(**kw)
    opts.validate()
    out = Path(out)
    prepare_out(out, opts.overwrite, convert_inputs(src, calib_files, opts.stats_cache))
    timer = Timer()
    with timer.stage("load"):
        docs = calib_data.read_texts(list(calib_files))
        source = load.load_source(src, opts.revision, stream_experts=True, hf_overrides=opts.hf_overrides)
    with timer.stage("calibrate"):  # tokenization counts as calibration
        windows = calib_data.token_windows(source.tokenizer, docs, opts.calib_samples, opts.calib_seqlen, opts.seed)
    meta = {"stats_version": calibrate.STATS_VERSION, "source": str(src), "samples": opts.calib_samples,
            "seqlen": opts.calib_seqlen, "seed": opts.seed, "files": [str(f) for f in calib_files],
            **_inputs_identity(src, windows)}
    if opts.calib_dtype != "float32":
        meta["calib_dtype"] = opts.calib_dtype
    if source.revision is not None:
        meta["revision"] = source.revision
    if opts.hf_overrides:   # another rope changes the forward, and so every layer's statistics but the first
        meta["hf_overrides"] = opts.hf_overrides
    return _convert_loaded(source, windows, out, opts, timer, meta, [str(f) for f in calib_files])


def _inputs_identity(src: str | Path, windows: torch.Tensor) -> dict:
    """What a --stats-cache is reused for besides the paths and options: the calibration's token windows (a digest:
    the text's contents, the tokenizer) and the source's files as they are now (name, size, mtime; a Hub source is
    pinned by its revision). Why: keyed on paths alone, a cache was reused after the calibration text or the model
    at the same path changed (a Qwen3 put where a Llama had been was converted with the Llama's moments, exit 0)."""
    import hashlib

    path = Path(src)
    files = [path] if path.is_file() else [*sorted(path.glob("*.safetensors")), path / "config.json"] \
        if path.is_dir() else []
    return {"windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "source_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]}


def convert_source(source: load.Source, windows: torch.Tensor, out: str | Path, opts: Options) -> dict:
    """Convert an already loaded source with calibration token windows [N, T] (the benchmarks call
    this directly with random-weight models); `convert()` is the file-based entry point."""
    opts.validate()
    out = Path(out)
    prepare_out(out, opts.overwrite, convert_inputs(source.name, [], opts.stats_cache))
    return _convert_loaded(source, windows, out, opts, Timer(),
                           {"stats_version": calibrate.STATS_VERSION, "source": source.name}, [])


def _convert_loaded(source: load.Source, windows: torch.Tensor, out: Path, opts: Options, timer: Timer,
                    stats_meta: dict, calib_files: list[str]) -> dict:
    """Everything after loading and tokenizing; the options and OUT were checked by the caller."""
    opts = dataclasses.replace(opts, dtype=output_dtype(opts, source.model))
    # (not kept: calibration may move layers between devices, and references would hold the old copies)
    check_free_space(Path(out), _bytes_in(_copied_tensors(source.model), DTYPES[opts.dtype]),
                     "the converted checkpoint")
    src = source.name
    cfg = source.config
    n_layers, n_heads, g = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    shape = AttentionShape.of_config(cfg)
    d_h, per_layer_orig = shape.head_dim, shape.parity
    budget, d_r = cache_plan.cache_shape(opts, shape)
    joint = opts.latent == "joint"
    if joint and source.arch != "qwen3":   # (Qwen3's latent also reads the normed keys: never narrower than parity)
        cache_plan.check_joint_room(budget, n_layers, d_r, shape, cfg.hidden_size)
    if joint and source.arch == "qwen3" and opts.method != "care":
        raise ConversionError(f"--latent joint with --method {opts.method} is not supported for "
                              f"{cfg.architectures[0] if cfg.architectures else source.arch} sources: their keys pass "
                              f"k_norm, so the latent reads the post-norm keys and the layer input, and a weight-only "
                              f"baseline has no scale to weigh the two by; use --method care (or --latent separate)")

    with timer.stage("calibrate"):
        stats = _load_or_collect_stats(source, windows, opts, stats_meta)

    layers = source.model.model.layers
    attn = [layer.self_attn for layer in layers]
    la = opts.device  # where the fp64 linear algebra runs (results come back to the CPU)

    def weights(l: int, device: str = "cpu", names: str = "qkv") -> tuple[torch.Tensor, ...]:
        """fp64 copies of layer l's q/k/v weights on `device`, only those named (each pass moves
        to the GPU just what it multiplies)."""
        a = attn[l]
        return tuple(getattr(a, f"{n}_proj").weight.detach().to(device, torch.float64) for n in names)

    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(la, torch.float64)

    inv_freq = source.model.model.rotary_emb.inv_freq.detach().float().cpu()
    attention_bias = has_attention_bias(source.model)

    def layer_tensors(l: int, k_factor: factorize.Factor, v_factor: factorize.Factor, k_rank: int,
                      v_rank: int, qkv: tuple[torch.Tensor, ...] | None = None) -> dict[str, torch.Tensor]:
        """Layer l's converted attention tensors at these ranks (names under self_attn; o_proj's weight
        excluded, its bias included for a biased source), fp64: the writer casts them, the refit and the
        --k-share auto scoring read them unrounded. The factors are those the factorize stage left (light);
        `qkv`: the layer's weights(l), when the caller already has them."""
        a = attn[l]
        wq, wk, wv = qkv or weights(l)
        bq, bk, bv, bo = (_bias(getattr(a, f"{n}_proj")) for n in "qkvo")
        tensors = assemble.attention_tensors(
            arch=source.arch, wq=wq, wk=wk, wv=wv,
            q_norm=a.q_norm.weight.detach() if source.arch == "qwen3" else None,
            k_norm=a.k_norm.weight.detach() if source.arch == "qwen3" else None,
            rope=maps[l],
            k_factor=None if joint else k_factor.materialize(_k_target(source.arch, maps[l].q_n, wk), k_rank),
            v_factor=v_factor.materialize(joint_latent.target(source.arch, maps[l].q_n, wk, wv) if joint else wv,
                                          v_rank),
            k_rank=k_rank, v_rank=v_rank,
            num_heads=n_heads, num_kv_heads=g, head_dim=d_h, dtype=torch.float64, bq=bq, bk=bk, bias=attention_bias)
        if attention_bias:
            tensors["o_proj.bias"] = assemble.output_bias(a.o_proj.weight.detach(), bo, bv, n_heads, g)
        return tensors

    with timer.stage("rope_map"):
        counts, maps = _rope_maps(stats, opts, inv_freq, d_r, g, d_h)

    # a joint latent's candidate key weights (several: --joint-key-weight auto) and, per candidate, each layer's
    # (light factor, K error curve, V error curve); with several, each factor is kept only up to any rank a layer
    # can be given, until one is chosen
    key_weights = (list(joint_latent.KEY_WEIGHTS) if opts.joint_key_weight == AUTO
                   else [opts.joint_key_weight or joint_latent.DEFAULT_KEY_WEIGHT])
    joint_cands = [[] for _ in key_weights]
    cap = (joint_latent.rank_cap(budget - n_layers * d_r, n_layers, opts.max_rank_frac, opts.rank_multiple)
           if len(key_weights) > 1 else None)
    with timer.stage("factorize"):
        k_factors, v_factors, k_errors, v_errors = [], [], [], []
        for l in tqdm(range(n_layers), desc="factorize", unit="layer"):
            st, rm = stats.layers[l], maps[l]
            wk, wv = weights(l, la, "kv")
            ck, ax, q_n = on(st.ck), on(st.ax), on(rm.q_n)
            mk, mv = _attention_weights(opts, st.qc, attn[l], q_n, n_heads, g, on)
            # the whole key's energy (exact rope part included): what the report's K error is relative to
            key_total = ck.diagonal().sum().item()
            k_target = _k_target(source.arch, q_n, wk)
            if joint:   # one factor of [K_nope; V]: kept where the V factor goes, K's left empty (k_ranks 0)
                if st.ckv is None:
                    raise ConversionError("--latent joint needs the key/value cross moment, which these statistics "
                                          "lack (a stats cache from before it was collected?); delete the stats cache")
                target = joint_latent.target(source.arch, q_n, wk, wv)
                moment = joint_latent.moment(q_n, ck, on(st.ckv), on(st.cv), st.x_scale,
                                             wv if source.arch == "qwen3" else None)
                n_k = k_target.shape[0]
                for cands, w in zip(joint_cands, key_weights):
                    weight = None if mk is None else joint_latent.weighting(moment.gram, mk, mv, w)
                    jf = factorize.factorize(target, moment, ax, opts.method, out_weight=weight)
                    light = jf.light() if cap is None else jf.light().keep(cap)
                    cands.append((light.to("cpu"), factorize.error_curve(target, jf, moment, key_total,
                                                                         rows=slice(0, n_k)),
                                  factorize.error_curve(target, jf, moment, rows=slice(n_k, None))))
                k_factors.append(factorize.Factor(None, jf.up.new_zeros(n_k, 0), jf.sigma.new_zeros(0),
                                                  jf.basis.new_zeros(0, n_k)).to("cpu"))
                stats.layers[l] = None
                continue
            if source.arch == "llama":   # input x
                k_moment = factorize.Moment(q_n @ ck @ q_n.T, st.x_scale)
                kf = factorize.factorize(k_target, k_moment, ax, opts.method, out_weight=mk)
            else:                        # input the post-k_norm key
                k_moment = factorize.Moment(q_n @ ck @ q_n.T, ck.diagonal().mean().item())
                if opts.method == "care":   # activation-optimal on the real post-norm keys
                    kf = factorize.factorize(q_n, k_moment, None, "care", out_weight=mk)
                else:                        # weight-based baselines see only the (linearized) weights
                    gamma = on(attn[l].k_norm.weight.detach()).repeat(g)
                    kf = factorize.projection_factor(q_n, factorize.factorize(q_n @ (gamma[:, None] * wk), None, ax,
                                                                              opts.method))
            v_moment = factorize.Moment(on(st.cv), st.x_scale)
            vf = factorize.factorize(wv, v_moment, ax, opts.method, out_weight=mv)
            # all that is kept of the layer until rank allocation: each factor without its [R, in] latent
            # map (rebuilt for the chosen rank when assembling) and its error at every rank (the report)
            k_errors.append(factorize.error_curve(k_target, kf, k_moment, key_total))
            v_errors.append(factorize.error_curve(wv, vf, v_moment))
            k_factors.append(kf.light().to("cpu"))
            v_factors.append(vf.light().to("cpu"))
            stats.layers[l] = None

    full_k = [min(f.basis.shape[0], g * d_h - d_r) for f in k_factors]

    def plan(k_share: float | None, v_list: list[factorize.Factor] | None = None) -> tuple[list[int], list[int]]:
        """(K ranks, V ranks) per layer with this K share of the latent (None: the proportional default), of the
        V factors (default) or `v_list`; a joint latent's are (zeros, its ranks)."""
        v_list = v_factors if v_list is None else v_list
        # (a joint latent of [K_nope; V] is lossless at K_nope's width plus V's: its whole spectrum)
        full_v = [min(f.sigma.shape[0], 2 * g * d_h - d_r) if joint else min(f.basis.shape[0], g * d_h)
                  for f in v_list]
        return allocate.plan_ranks(opts.ranks, budget, d_r, full_k, full_v, [f.sigma for f in k_factors],
                                   [f.sigma for f in v_list], opts.min_rank_frac, opts.max_rank_frac, k_share,
                                   opts.rank_multiple)

    joint_auto_report = None
    if joint:
        chosen = 0
        if len(key_weights) > 1:
            with timer.stage("joint_key_weight_auto"):
                plans = [plan(None, [f for f, _, _ in cands]) for cands in joint_cands]

                def weight_tensors(l: int, pairs: list[tuple[int, int]]):
                    """Layer l's tensors of each candidate weight in turn (the pairs are their ranks, in order)."""
                    qkv = weights(l)
                    for cands, (_, v_rank) in zip(joint_cands, pairs):
                        yield layer_tensors(l, None, cands[l][0], 0, v_rank, qkv)

                chosen, joint_auto_report = joint_latent.choose_key_weight(
                    key_weights, [CareMLAConfig(**_config(source, cfg, opts, d_h, d_r, *ranks, maps[0].inv_freq,
                                                          str(src))) for ranks in plans],
                    weight_tensors, source, windows, opts.device, opts.calib_batch, DTYPES[opts.calib_dtype],
                    opts.k_share_score_tokens)
        v_factors = [f for f, _, _ in joint_cands[chosen]]
        k_errors = [k for _, k, _ in joint_cands[chosen]]
        v_errors = [v for _, _, v in joint_cands[chosen]]
        opts = dataclasses.replace(opts, joint_key_weight=key_weights[chosen])
        joint_cands = None

    def plan_tensors(l: int, ranks: list[tuple[int, int]]):
        """Layer l's attention tensors for each (K rank, V rank) in turn (a generator: one plan's at a time), its
        fp64 weights cast once for all."""
        qkv = weights(l)
        for k_rank, v_rank in ranks:
            yield layer_tensors(l, k_factors[l], v_factors[l], k_rank, v_rank, qkv)

    k_share, auto_report = opts.k_share, None
    if k_share == AUTO:
        with timer.stage("k_share_auto"):
            k_share, auto_report = kshare_auto.choose(
                plan, lambda ranks: CareMLAConfig(**_config(source, cfg, opts, d_h, d_r, *ranks, maps[0].inv_freq,
                                                            str(src))),
                plan_tensors, source, windows, opts.device, opts.calib_batch, DTYPES[opts.calib_dtype],
                score_tokens=opts.k_share_score_tokens)
    with timer.stage("allocate"):
        k_ranks, v_ranks = plan(k_share)
        # only the allocated ranks are used from here on
        k_factors = [f.keep(r) for f, r in zip(k_factors, k_ranks)]
        v_factors = [f.keep(r) for f, r in zip(v_factors, v_ranks)]

    cache = sum(k + v + d_r for k, v in zip(k_ranks, v_ranks))
    # whole units of --rank-multiple may fall short of the budget (by less than a unit, or where the lossless
    # widths are not whole units, by what their remainders add up to); never over it
    assert cache <= budget and (cache == budget or opts.rank_multiple > 1), (cache, budget)
    dtype = DTYPES[opts.dtype]
    copied = _copied_tensors(source.model)
    config = _config(source, cfg, opts, d_h, d_r, k_ranks, v_ranks, maps[0].inv_freq, str(src))
    refitter = None
    if opts.o_proj_refit:
        with timer.stage("refit"):
            refitter = refit.OutputRefit(source.model, windows, CareMLAConfig(**config), opts.device,
                                         opts.calib_batch, DTYPES[opts.calib_dtype], opts.o_proj_refit_ridge)
    layer_reports = []
    with write.atomic_dir(out, opts.overwrite) as tmp:
        shards = write.ShardWriter(tmp, opts.max_shard_size)

        def emit(names_tensors) -> None:
            """Cast finished tensors to `dtype` and hand them to the writer, which writes a shard whenever
            one is full (the cast counts as assembly)."""
            with timer.stage("assemble"):
                cast = [(name, t.detach().to(dtype).contiguous()) for name, t in names_tensors]
            with timer.stage("write"):
                for name, t in cast:
                    shards.add(name, t)

        # the refit runs inside this loop and is most of its time: the bar says so
        for l in tqdm(range(n_layers), desc="assemble + refit" if refitter else "assemble", unit="layer"):
            # assemble, report and write one layer, then free its factors
            with timer.stage("assemble"):
                a = attn[l]
                tensors = layer_tensors(l, k_factors[l], v_factors[l], k_ranks[l], v_ranks[l])
            o_proj, refit_report = a.o_proj.weight.detach(), {}
            if refitter is not None:
                with timer.stage("refit"):
                    o_proj, refit_report = refitter.layer(l, layers[l], tensors, source.layer_in_memory)
            emit([(f"model.layers.{l}.self_attn.{name}", t) for name, t in tensors.items()]
                 + [(f"model.layers.{l}.self_attn.o_proj.weight", o_proj)] + copied.pop(l)
                 + source.streamed_tensors(l))
            with timer.stage("report"):
                layer_reports.append({**_layer_report(l, maps[l], k_errors[l], v_errors[l], k_ranks[l], v_ranks[l],
                                                      joint),
                                      **refit_report})
            k_factors[l] = v_factors[l] = tensors = None
        emit(copied.pop(None))
        refitter = None   # frees the calibration hidden states before the last shard is written

        report = {
            "source": str(src), "source_revision": source.revision,
            "source_architecture": cfg.architectures[0] if cfg.architectures else None,
            "method": opts.method, "objective": opts.objective, "rank_policy": opts.ranks,
            "latent": opts.latent,
            "o_proj_refit": opts.o_proj_refit,
            "o_proj_refit_ridge": opts.applied_refit_ridge,
            "kv_ratio": cache / (n_layers * per_layer_orig), "rope_dim": d_r,
            "rope_pairs_per_frequency": counts, "rope_select": opts.rope_select,
            "rope_distance": opts.rope_distance,
            "cache_values_per_token": cache,
            "original_cache_values_per_token": n_layers * per_layer_orig,
            "layers": layer_reports,
            **({"k_share_auto": auto_report} if auto_report is not None else {}),
            **({"joint_key_weight_auto": joint_auto_report} if joint_auto_report is not None else {}),
            "calibration": {"files": calib_files, "samples": int(windows.shape[0]),
                            "seqlen": int(windows.shape[1]), "tokens": stats.tokens, "seed": opts.seed,
                            "device": opts.device, "dtype": opts.calib_dtype},
            "options": {"damping": factorize.DAMPING, "asvd_alpha": factorize.ASVD_ALPHA,
                        "min_rank_frac": opts.min_rank_frac, "max_rank_frac": opts.max_rank_frac,
                        "k_share": opts.k_share, "rank_multiple": opts.rank_multiple,
                        **({"joint_key_weight": opts.joint_key_weight}
                           if opts.latent == "joint" and opts.objective == "attention" else {}),
                        "dtype": opts.dtype},
            "seconds": timer.seconds,
            "versions": recorded_versions(),
        }
        with timer.stage("write"):
            shards.close()
            write.save_json(config, tmp / "config.json")
            write.save_model_code(tmp)
            licence_files = source.save_side_files(tmp)
            model_card.write_card(tmp, out.name, config, report, base_model=source.base_model,
                                  metadata=source.card_metadata(), license_names=licence_files)
            plot_ranks(k_ranks, v_ranks, d_r, f"{Path(str(src)).name}: {opts.method}, {opts.ranks}, "
                       f"{'joint K/V latent, ' if joint else ''}"
                       f"KV {report['kv_ratio']:.2f} of original", tmp / "care_ranks.png")
            write.save_json(report, tmp / "care_report.json")
    # the report inside OUT was written before the write stage ended: complete its timings in place
    report["seconds"] = dict(timer.seconds, total=round(sum(timer.seconds.values()), 3))
    write.save_json(report, out / "care_report.json")
    return report


def _rope_maps(stats: calibrate.CalibStats, opts: Options, inv_freq: torch.Tensor, d_r: int, g: int, d_h: int
               ) -> tuple[list[int], list[rope_map.RopeMap]]:
    """Every layer's RoRoPE map from its key and query moments, with the rope pairs per frequency that
    all layers share (rope_map.shared_pair_counts)."""
    pcas = [rope_map.frequency_pca(st.rotated_key_moment, g, d_h)
            for st in tqdm(stats.layers, desc="rope map", unit="layer")]
    if opts.rope_select == "qk":
        ranked = [rope_map.reorder_components(
            rope_map.logit_scores(e, u, stats.layers[l].qd, inv_freq, opts.rope_distance), e, u)
            for l, (e, u) in enumerate(pcas)]
    else:
        ranked = [(e, e, u) for e, u in pcas]
    counts = rope_map.shared_pair_counts([sc for sc, _, _ in ranked], d_r)
    return counts, [rope_map.build_map(e, u, counts, inv_freq, g, d_h) for _, e, u in ranked]


def _attention_weights(opts: Options, query_cov: torch.Tensor, attn, q_n: torch.Tensor, n_heads: int, g: int,
                       on) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(M_K, M_V) for --objective attention (converter/attention_weights.py), (None, None) for kv;
    `query_cov` [n_h, d_h, d_h]: the per-head pre-RoPE query moments of calibration."""
    if opts.objective == "kv":
        return None, None
    return (attention_weights.key_weight(on(query_cov), q_n, g),
            attention_weights.value_weight(on(attn.o_proj.weight.detach()), n_heads, g))


def has_attention_bias(model) -> bool:
    """Whether the source's attention projections have biases (Qwen2: q/k/v; Llama attention_bias: all four)."""
    attn = model.model.layers[0].self_attn
    return any(_bias(getattr(attn, f"{n}_proj")) is not None for n in "qkvo")


def _bias(linear) -> torch.Tensor | None:
    b = getattr(linear, "bias", None)
    return None if b is None else b.detach()


def _k_target(arch: str, q_n: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """The map the K latent approximates: the RoRoPE NoPE rows of the key, Q_N W_K of x for Llama, Q_N
    of the post-k_norm key for Qwen3 (the factorize stage and assembly must use the same one)."""
    return q_n @ wk if arch == "llama" else q_n


def _copied_tensors(model) -> dict[int | None, list[tuple[str, torch.Tensor]]]:
    """The source's tensors the conversion copies unchanged, by decoder layer (None: embedding, final
    norm, LM head), as stored: each is cast to the output dtype only when its layer is written. All
    attention tensors but o_proj are rebuilt by assemble; a tied LM head and rotary buffers are not saved,
    nor what the model does not hold (meta: Qwen3-MoE experts, which load.Source.streamed_tensors reads).
    o_proj is not among them either: the layer loop writes it, refitted (converter/refit.py) or as stored."""
    out: dict[int | None, list] = {l: [] for l in range(len(model.model.layers))}
    out[None] = []
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if (".self_attn." in name
                or (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq") or t.is_meta):
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        out[layer].append((name, t))
    return out


def _bytes_in(copied: dict, dtype: torch.dtype) -> int:
    """What the copied tensors take in the checkpoint (cast to its dtype): a lower bound of its size, known before
    calibrating (the attention tensors are rebuilt at ranks decided later; streamed MoE experts are not counted)."""
    return sum(t.numel() for tensors in copied.values() for _, t in tensors) * dtype.itemsize


def _layer_report(l, rm, k_errors, v_errors, k_rank, v_rank, joint: bool = False) -> dict:
    """Relative K/V activation errors on the calibration data (K: relative to the whole key, exact rope
    part included), read off the error curves the factorize stage left (factorize.error_curve). A joint latent's
    rank is v_rank (k_rank 0): both of its curves are read there."""
    return {"layer": l, "k_rank": k_rank, "v_rank": v_rank, "rope_dim": rm.q_s.shape[0],
            "k_rel_error": round(k_errors[v_rank if joint else k_rank].item(), 6), "v_rel_error": round(v_errors[v_rank].item(), 6),
            "rope_energy_fraction": round(rm.energy_kept, 6)}


def _config(source, cfg, opts, d_h, d_r, k_ranks, v_ranks, inv_freq, src_name) -> dict:
    ranks = [k + v for k, v in zip(k_ranks, v_ranks)]
    gen_ids = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {
        "model_type": MODEL_TYPE,
        "architectures": [variant_architecture(source.arch == "qwen3", source.num_experts > 0)],
        "auto_map": dict(AUTO_MAP),
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": source_rope.served_max_positions(cfg),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "initializer_range": getattr(cfg, "initializer_range", 0.02),
        **gen_ids,
        "dtype": opts.dtype,
        "original_num_key_value_heads": cfg.num_key_value_heads, "original_head_dim": d_h,
        "qk_nope_head_dim": d_h, "qk_rope_head_dim": d_r, "v_head_dim": d_h,
        "k_ranks": list(k_ranks), "v_ranks": list(v_ranks), "kv_lora_rank": max(ranks),
        "q_lora_rank": None,
        "use_qk_norm": source.arch == "qwen3",
        **({"joint_latent": True} if opts.latent == "joint" else {}),
        "attention_bias": has_attention_bias(source.model),
        "rope_inv_freq": [float(x) for x in inv_freq.tolist()],
        "softmax_scale": source_rope.softmax_scale(source.model.model.rotary_emb, d_h),
        "source_rope_parameters": dict(getattr(cfg, "rope_parameters", None) or {}),
        **({"source_hf_overrides": opts.hf_overrides} if opts.hf_overrides else {}),
        "source_model": src_name,
        "source_revision": source.revision,
        "source_architecture": cfg.architectures[0] if cfg.architectures else None,
        "care_vllm_version": installed_version("care-vllm"),   # (as transformers records transformers_version)
        **(moe_config(cfg) if source.num_experts else {}),
        "care": {"method": opts.method, "objective": opts.objective, "rank_policy": opts.ranks,
                 **({"latent": "joint"} if opts.latent == "joint" else {}),
                 "o_proj_refit": opts.o_proj_refit,
                 "o_proj_refit_ridge": opts.applied_refit_ridge,
                 "kv_ratio": round((sum(ranks) + cfg.num_hidden_layers * d_r)
                                   / (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d_h), 6),
                 "rope_dim": d_r},
    }
