"""`care-eval sweep`: which KV budget to convert at, measured on the user's own text.

    care-eval sweep SRC --calib FILE... --text FILE... [--kv-ratios 0.25,0.5,0.75,1] [--rope-dims 64,96]
                    [--k-shares default,0.25,auto,joint:auto] [--keep DIR] [every care-convert option but
                    --kv-ratio/--kv-width] [--seqlen --max-tokens --batch-size --eval-dtype]

The budget is the one choice of a conversion that trades quality for serving capacity, and how much a
given budget costs depends on the model and on the text (SmolLM2 at KV 0.5 loses far more than the
small trained models in docs/RESULTS.md). The sweep converts SRC once per ratio exactly as
`care-convert --kv-ratio R` with the same options would (the kept checkpoints are those), calibrating
once (the statistics do not depend on the budget: one stats cache serves every conversion), and runs
`care-eval compare`'s measurement of each against SRC on held-out text: perplexity, KL(original ||
converted) and top-1 agreement per token, next to what the budget buys (cache values per token and
how many times more tokens fit in the same KV memory). One JSON object on stdout, a table on stderr.
With --rope-dims it converts at every (ratio, rope key width) pair: above KV 0.5 a wider rope key
than the default 64 can be worth it (docs/RESULTS.md, "RoPE key width"), and what is best depends on
the model; pairs the budget cannot hold are refused before anything is converted. With --k-shares
it converts at every ratio (and rope width) with each K/V split of the latent (`--k-share`; 'default'
is the converter's own, proportional to the lossless K and V widths; 'auto' is `--k-share auto`, which
picks one on the calibration text): the best split depends on the model and the budget (docs/RESULTS.md,
"K/V split"), and each row states the share the ranks give. 'joint' is no split: one latent that keys and values
share (`--latent joint`), and 'joint:W' the same with `--joint-key-weight W` (a number or auto; --objective
attention), so one sweep compares separate latents with the joint one on the user's text.

Memory: as `compare`, the original and one converted model at a time (in --eval-dtype), besides what
the converter itself holds (docs/LIMITS.md). Without --keep the checkpoints live in a temporary
folder, one at a time. With --keep DIR (which must not exist) each finished conversion stays as
DIR/kv<R> (DIR/kv<R>-rope<D> with --rope-dims, -kshare<S> added with --k-shares, -kshare-joint[-W] for a
joint latent), ready for `vllm
serve`; a failure leaves the ones already finished (each complete: converter/write.py writes them
atomically) and nothing else.
"""
from __future__ import annotations

import gc
import itertools
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .cache_plan import AttentionShape, cache_shape
from .errors import ConversionError
from .options import Options
from .source_checks import check_stored_source

DEFAULT_RATIOS = "0.25,0.5,0.75,1"
JOINT = "joint"   # the --k-shares value of a joint latent ('joint:W': with --joint-key-weight W)
_NOT_SWEPT = object()   # a run's K share when --k-shares is not given


class SweepError(ValueError):
    """A problem with the sweep's own arguments (care-eval turns it into exit code 2)."""


def parse_ratios(spec: str) -> list[float]:
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0]: sorted, without repeats, each in (0, 1] (parity at most)."""
    return _parse_list(spec, "--kv-ratios", float, "a number", DEFAULT_RATIOS,
                       lambda r: 0 < r <= 1.0 and math.isfinite(r),
                       "is outside (0, 1]: the kept share of the cache, parity (1.0) at most, as in care-convert")


def parse_rope_dims(spec: str) -> list[int]:
    """'96,64' -> [64, 96]: sorted, without repeats, each a positive even number."""
    return _parse_list(spec, "--rope-dims", int, "a whole number", "64,96,128", lambda d: d > 0 and d % 2 == 0,
                       "is not a positive even number")


def parse_k_shares(spec: str) -> list[float | str | None]:
    """'0.3,joint:auto,auto,default,0.25' -> [None, 'auto', 'joint:auto', 0.25, 0.3]: the converter's default split
    (None) first, then --k-share auto's choice, then the joint latents as given ('joint', 'joint:W'), then the
    shares sorted, without repeats, each in (0, 1)."""
    items = [p.strip() for p in spec.split(",")]
    named = [value for name, value in (("default", None), ("auto", "auto")) if name in items]
    joint = list(dict.fromkeys(p for p in items if is_joint(p)))
    for share in joint:
        share_options(share)   # a bad W fails here
    numbers = [p for p in items if p not in ("default", "auto") and not is_joint(p)]
    if not numbers:
        return named + joint
    return named + joint + _parse_list(",".join(numbers), "--k-shares", float,
                                       "a number, 'default', 'auto', 'joint' or 'joint:W'", "default,auto,0.25,0.3",
                                       lambda f: 0 < f < 1, "is outside (0, 1): the share of the latent given to K")


def is_joint(share) -> bool:
    """Whether a --k-shares value is a joint latent ('joint' or 'joint:W')."""
    return isinstance(share, str) and (share == JOINT or share.startswith(JOINT + ":"))


def share_options(share) -> dict:
    """The care-convert options (converter.options.Options fields) of one --k-shares value: a K share (a number,
    'auto' or None, the default split), or a joint latent: 'joint' -> --latent joint, 'joint:W' -> with
    --joint-key-weight W (a number or auto). Also what benchmarks/kshare.py's --shares means."""
    import argparse

    from .cli import auto_or_number

    if not is_joint(share):
        return {"k_share": share}
    weight = share[len(JOINT) + 1:]
    try:
        return {"k_share": None, "latent": "joint", **({"joint_key_weight": auto_or_number(weight)} if weight else {})}
    except argparse.ArgumentTypeError as e:
        raise SweepError(f"--k-shares: {share!r}: {e}") from None


def _parse_list(spec: str, flag: str, kind, kind_name: str, example: str, valid, why: str) -> list:
    values = set()
    for part in spec.split(","):
        try:
            value = kind(part)
        except ValueError:
            raise SweepError(f"{flag}: {part.strip()!r} is not {kind_name} (give e.g. {example})") from None
        if not valid(value):
            raise SweepError(f"{flag}: {part.strip()} {why}")
        values.add(value)
    return sorted(values)


def sweep(src: str, calib_files: Sequence[str], texts: Sequence, ratios: Sequence[float], *,
          rope_dims: Sequence[int] | None = None, k_shares: Sequence[float | None] | None = None,
          keep: Path | None = None, seqlen: int = 1024,
          max_tokens: int | None = None, batch_size: int = 1, eval_dtype: str = "float32",
          **convert_options) -> dict[str, Any]:
    """Convert `src` at each KV ratio (and each of `rope_dims` and of `k_shares`, if given, in place of
    the rope_dim and k_share options; a k_share of None is the converter's default) with
    `convert_options` (converter.options.Options fields) and compare each conversion
    with `src` on `texts` (documents as eval_cli.read_texts returns them).

    Returns {"original_model", "original": {"ppl", "nll"}, "rows": [per ratio (and rope width, K share):
    "kv_ratio", "rope_dim", "k_share" (as asked, with k_shares; None: the default), "k_share_actual"
    (sum of K ranks / sum of latent ranks),
    "cache_values_per_token", "original_cache_values_per_token", "kv_capacity"
    (original / converted cache per token), "converted": {"ppl", "nll"}, "ppl_ratio", "kl", "top1_agreement",
    "convert_seconds", "checkpoint" (with keep)], "tokens", "input_tokens", "seqlen", "windows",
    "convert_options"}. Raises SweepError / ConversionError / eval_cli.EvalError on bad input, before
    anything is converted where the input allows it."""
    from . import calib_data
    from .eval_cli import compare, load_model, locate_model, text_windows

    if not ratios:
        raise SweepError("--kv-ratios: no ratio given")
    if rope_dims and convert_options.get("rope_dim") is not None:
        raise SweepError("give either --rope-dim or --rope-dims, not both")
    if k_shares and convert_options.get("k_share") is not None:
        raise SweepError("give either --k-share or --k-shares, not both")
    if k_shares and convert_options.get("latent") == JOINT:
        raise SweepError("--k-shares sweeps the K/V split of separate latents and, as 'joint' or 'joint:W', the joint "
                         "latent: drop --latent joint")
    rope_options = [{"rope_dim": d} for d in rope_dims] if rope_dims else [{}]
    shares = list(k_shares) if k_shares else [_NOT_SWEPT]
    # (ratio, the conversion's own options, the K share asked for)
    runs = [(r, {**ro, **({} if sh is _NOT_SWEPT else share_options(sh))}, sh)
            for r in ratios for ro, sh in itertools.product(rope_options, shares)]
    weighted = [sh for sh in shares if is_joint(sh) and sh != JOINT]
    if weighted and Options(**convert_options).objective != "attention":
        raise SweepError(f"--k-shares {weighted[0]}: the key weight W of 'joint:W' is the attention objective's; add "
                         f"--objective attention, or give 'joint'")
    for r, opt, _ in runs:   # every option checked before the first (slow) conversion
        Options(**{**convert_options, **opt}, kv_ratio=r).validate()
    if keep is not None:
        if keep.exists():
            raise SweepError(f"--keep {keep} already exists (the sweep writes a new folder of checkpoints)")
        if not keep.parent.is_dir():
            raise SweepError(f"parent folder of --keep does not exist: {keep.parent}")
    calib_data.read_texts(list(calib_files))   # a bad or empty calibration file fails now, not after loading
    locate_model(src, convert_options.get("revision"))   # a mistyped SRC too
    shape = check_stored_source(src, convert_options.get("revision"))
    if shape is not None:   # a rope width the budget or the keys cannot hold, from config.json: before loading
        _check_cache_shapes(runs, convert_options, shape)
    from .pipeline import convert   # torch, transformers: ~5 s (a bad option was refused before it)

    device = convert_options.get("device", "cpu")
    original, tokenizer = load_model(src, device, eval_dtype, convert_options.get("revision"),
                                     convert_options.get("hf_overrides"))
    text_windows(tokenizer, texts, seqlen, max_tokens)   # empty or too short held-out text: fail before converting
    _check_cache_shapes(runs, convert_options, AttentionShape.of_config(original.config))   # (any source)
    rows: list[dict] = []
    measured: dict = {}
    with tempfile.TemporaryDirectory(prefix="care-sweep-") as work:
        stats = convert_options.pop("stats_cache", None) or str(Path(work) / "calib_stats.pt")
        folder = keep if keep is not None else Path(work)
        folder.mkdir(exist_ok=True)
        try:
            for r, opt, share in runs:
                out = folder / f"kv{r:g}{_option_suffix(opt, share)}"
                print(f"care-eval sweep: converting at KV {r:g}{_options_text(opt, share)} -> {out}", file=sys.stderr)
                report = convert(src, out, calib_files=list(calib_files), kv_ratio=r, stats_cache=stats,
                                 **{**convert_options, **opt})
                converted, _ = load_model(str(out), device, eval_dtype)
                measured = compare(original, converted, tokenizer, texts, seqlen, max_tokens, device, batch_size)
                del converted
                gc.collect()
                if keep is None:
                    shutil.rmtree(out)
                rows.append(_row(r, share, report, measured, out if keep is not None else None))
        finally:
            if keep is not None and not any(keep.iterdir()):
                keep.rmdir()   # nothing finished: leave nothing behind
    return {"original_model": src, "original": measured["original"], "rows": rows,
            **{k: measured[k] for k in ("tokens", "input_tokens", "seqlen", "windows")},
            "eval_dtype": eval_dtype, "calib_files": [str(f) for f in calib_files], "convert_options": convert_options}


def _check_cache_shapes(runs: list, convert_options: dict, shape: AttentionShape) -> None:
    """Refuse a run whose rope width the budget or the keys of a source of `shape` cannot hold (cache_plan.py)."""
    for r, opt, share in runs:
        try:
            cache_shape(Options(**{**convert_options, **opt}, kv_ratio=r), shape)
        except ConversionError as e:
            raise SweepError(f"KV {r:g}{_options_text(opt, share)}: {e}") from None


def _options_text(opt: dict, share) -> str:
    return "".join([f", rope {opt['rope_dim']}" if "rope_dim" in opt else "",
                    "" if share is _NOT_SWEPT else f", k-share {share or 'default'}"])


def _option_suffix(opt: dict, share) -> str:
    """The kept checkpoint's folder name after kv<R>: -rope<D>, -kshare<S> (-kshare-default, -kshare-auto,
    -kshare-joint, -kshare-joint-<W>)."""
    return "".join([f"-rope{opt['rope_dim']}" if "rope_dim" in opt else "",
                    "" if share is _NOT_SWEPT else f"-kshare{share}" if isinstance(share, float)
                    else f"-kshare-{(share or 'default').replace(':', '-')}"])


def k_share_given(report: dict) -> float | None:
    """The share of a conversion's latent that its ranks give to K: sum r_K / sum (r_K + r_V) (care_report.json);
    None for a joint latent (--latent joint: keys and values share the whole latent)."""
    from .allocate import k_share_of

    if report.get("latent") == "joint":
        return None
    return k_share_of([layer["k_rank"] for layer in report["layers"]],
                      [layer["v_rank"] for layer in report["layers"]])


def _row(ratio: float, share, report: dict, measured: dict, checkpoint: Path | None) -> dict:
    cache, original = report["cache_values_per_token"], report["original_cache_values_per_token"]
    weight = report["options"].get("joint_key_weight")   # (a joint latent with --objective attention)
    row = {"kv_ratio": ratio, "rope_dim": report["rope_dim"],
           **({} if share is _NOT_SWEPT else {"k_share": share}),   # as asked (None: the default split)
           "k_share_actual": k_share_given(report), **({} if weight is None else {"joint_key_weight": weight}),
           "cache_values_per_token": cache,
           "original_cache_values_per_token": original, "kv_capacity": original / cache,
           "converted": measured["converted"], "ppl_ratio": measured["ppl_ratio"], "kl": measured["kl"],
           "top1_agreement": measured["top1_agreement"], "convert_seconds": report["seconds"]["total"]}
    for auto in ("k_share_auto", "joint_key_weight_auto"):   # what an auto option chose and every candidate's score
        if auto in report:
            row[auto] = report[auto]
    if checkpoint is not None:
        row["checkpoint"] = str(checkpoint)
    return row


def format_table(result: dict) -> str:
    """The sweep as a markdown table (what care-eval prints on stderr)."""
    o = result["original"]
    lines = [f"{result['original_model']}: perplexity {o['ppl']:.3f} on {result['tokens']} held-out tokens "
             f"({result['windows']} windows of {result['seqlen']})", "",
             "| KV ratio | rope key | K share | cache values/token | KV capacity | perplexity | ppl ratio "
             "| KL (nats/token) | top-1 agreement | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["k_share_actual"] is not None:
            share = ("auto: " if r.get("k_share") == "auto" else "") + f"{r['k_share_actual']:.2f}"
        else:   # a joint latent, with the key weight its fit used
            weight = r.get("joint_key_weight")
            share = ("joint" if weight is None else
                     f"joint, W {'auto: ' if 'joint_key_weight_auto' in r else ''}{weight:g}")
        lines.append(f"| {r['kv_ratio']:g} | {r['rope_dim']} | {share} "
                     f"| {r['cache_values_per_token']} / {r['original_cache_values_per_token']} "
                     f"| {r['kv_capacity']:.2f}x | {r['converted']['ppl']:.3f} | {r['ppl_ratio']:.3f}x | "
                     f"{r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['convert_seconds']:.0f} |"
                     .replace("| -0.0000 |", "| 0.0000 |"))   # an exact conversion's KL, rounded below zero
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The `sweep` subcommand of care-eval: care-convert's options plus the evaluation's."""
    from .cli import SRC_HELP, add_conversion_args

    p = sub.add_parser("sweep", help="convert at several KV ratios (calibrating once) and compare each with "
                                     "the original on local text: which budget to convert at")
    p.add_argument("src", help=SRC_HELP)
    p.add_argument("--kv-ratios", default=DEFAULT_RATIOS,
                   help=f"comma list of KV budgets as fractions of the original cache, each in (0, 1] "
                        f"(default {DEFAULT_RATIOS})")
    p.add_argument("--rope-dims", default=None, metavar="D,D...",
                   help="also sweep the decoupled rope key width: convert at every ratio with each of these "
                        "(even; in place of --rope-dim)")
    p.add_argument("--k-shares", default=None, metavar="F,F...",
                   help="also sweep the K/V split of the latent: convert at every ratio with each of these "
                        "--k-share values, in (0, 1), 'default' (the proportional split) or 'auto' (care-convert --k-share "
                        "auto's choice), or 'joint' (no split: --latent joint) and 'joint:W' (with --joint-key-weight "
                        "W, a number or auto); in place of --k-share")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep each checkpoint as DIR/kv<R> (DIR/kv<R>-rope<D> with --rope-dims, -kshare<S> added "
                        "with --k-shares; DIR must not exist); default: temporary, deleted")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE",
                   help="held-out text to compare on: .txt or .jsonl (\"text\" or chat \"messages\")")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the comparison forward passes (--dtype is the checkpoints', as in care-convert)")
    add_conversion_args(p, budget=False)


def run(args, texts: list) -> dict:
    """care-eval sweep's body (arguments parsed and the held-out text read by care-eval's main)."""
    from .eval_cli import EvalError

    skip = {"command", "src", "kv_ratios", "rope_dims", "k_shares", "keep", "text", "seqlen", "max_tokens",
            "batch_size", "eval_dtype", "calib"}
    options = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        result = sweep(args.src, args.calib, texts, parse_ratios(args.kv_ratios),
                       rope_dims=parse_rope_dims(args.rope_dims) if args.rope_dims else None,
                       k_shares=parse_k_shares(args.k_shares) if args.k_shares else None,
                       keep=Path(args.keep) if args.keep else None, seqlen=args.seqlen, max_tokens=args.max_tokens,
                       batch_size=args.batch_size, eval_dtype=args.eval_dtype, **options)
    except (SweepError, ConversionError) as e:
        raise EvalError(str(e)) from None
    print(format_table(result), file=sys.stderr)
    return result
