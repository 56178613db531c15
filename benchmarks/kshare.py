"""How the K/V split of the latent (care-convert --k-share) changes one-shot perplexity.

Same calibration, evaluation and stats caches as benchmarks/oneshot.py (so its 'default' column is
comparable to oneshot.md's care rows of the same ratio); one conversion + evaluation per
(model, policy, ratio, share). 'default' is the converter's own split (proportional to the lossless K and
V widths after the rope key is taken out), printed with the share it amounts to. 'joint' is no split: one
latent of the same cache width shared by keys and values (care-convert --latent joint),
and 'joint:W' the same with --joint-key-weight W (--objective attention only); their cells show "joint" where
the others show the K share. The defaults are the
paper's settings (`--objective kv`, no o_proj refit), as benchmarks/results/kshare.md was made;
`--objective attention --refit --policies uniform` are the deployment settings (the quickstart's).

    .venv/bin/python benchmarks/kshare.py                              # smollm2-135m + qwen3-small, KV 0.5
    .venv/bin/python benchmarks/kshare.py --models qwen3-small --shares 0.3,0.5 --policies uniform
    .venv/bin/python benchmarks/kshare.py --models smollm2-135m,qwen3-small,llama3-small --ratios 0.5,0.25 \\
        --policies uniform --objective attention --refit --out benchmarks/results/kshare_deploy
    .venv/bin/python benchmarks/kshare.py --models smollm2-135m,llama3-small --ratios 0.5,0.25 --policies uniform \\
        --objective attention --refit --shares default,joint:0.25,joint:1,joint:4 \\
        --out benchmarks/results/joint_latent_convert

Writes benchmarks/results/kshare.json and kshare.md (rows are saved as they finish; --resume skips
rows already there with identical settings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sweep  # noqa: E402
from converter import budget_sweep  # noqa: E402
from converter.budget_sweep import JOINT, is_joint  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,qwen3-small")
    p.add_argument("--ratios", default="0.5", help="comma list of KV ratios (default 0.5)")
    p.add_argument("--shares", default="default,0.2,0.25,0.3,0.35,0.5",
                   help="comma list of --k-share values; 'default' = the converter's proportional split, 'auto' = "
                        "--k-share auto (its cell shows the share it chose), 'joint' = --latent joint (one latent "
                        "for K and V), 'joint:W' = that with --joint-key-weight W (W a number or auto)")
    p.add_argument("--objective", default="kv", choices=["kv", "attention"])
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                   help="the o_proj refit (default off here, as oneshot.py; on in care-convert)")
    p.add_argument("--score-tokens", type=int, default=None,
                   help="calibration tokens --k-share auto scores its candidates on (default: the converter's, "
                        "care-convert --k-share-score-tokens' default)")
    sweep.add_common_args(p, "kshare")
    return p


def share_options(share: str) -> dict:
    """The care-convert options of one --shares value: 'default' -> the proportional split, 'joint[:W]' -> a
    joint latent (with --joint-key-weight W), else --k-share (a number or 'auto'): what care-eval sweep's --k-shares
    means by it (converter/budget_sweep.share_options)."""
    from converter.cli import auto_or_number

    if share == "default":
        return {"k_share": None}
    return budget_sweep.share_options(share if is_joint(share) else auto_or_number(share))


def heading(share: str) -> str:
    if share == JOINT:
        return "joint latent"
    return f"joint latent, W = {share[len(JOINT) + 1:]}" if is_joint(share) else f"k-share {share}"


def cell(share: str, r: dict, orig: float) -> str:
    given = (f"joint, W {r['joint_key_weight_auto']['chosen']:g} chosen" if "joint_key_weight_auto" in r
             else "joint" if is_joint(share) else f"{r['k_share_actual']:.2f}")
    return f"{r['ppl']:.2f} ({given}; x{r['ppl'] / orig:.2f})"


def render_md(res: dict) -> str:
    s = res["settings"]
    shares = s["shares"]
    given = ("K share of the latent actually given, or \"joint\": one latent shared by K and V (`--latent joint`, "
             "W = `--joint-key-weight`)" if any(map(is_joint, shares)) else "K share of the latent actually given")
    lines = sweep.md_header(res, "K/V split of the latent (`--k-share`): one-shot perplexity",
                            f"care, --objective {s['objective']}, o_proj refit {'on' if s['o_proj_refit'] else 'off'}",
                            f"perplexity ({given}; ratio to the original); lowest per row in bold")
    rows = sweep.bold_best_rows(res, shares, cell)
    lines += [common.md_table(["model (original ppl)", "ranks", "KV ratio", *map(heading, shares)], rows), ""]
    autos = [r for r in res["rows"].values() if "k_share_auto" in r]
    if autos:
        lines += auto_scores_md(autos)
    return "\n".join(lines) + "\n"


def auto_scores_md(rows: list[dict]) -> list[str]:
    """The `--k-share auto` cells' scores: each candidate split's KL to the original on the calibration windows
    (no refit), the chosen (lowest) in bold; shares whose rank plans coincide were scored once and show the same
    KL."""
    from converter.kshare_auto import CANDIDATES

    columns = ["default", *CANDIDATES]
    table = []
    for r in rows:
        auto = r["k_share_auto"]
        kl = {share: c["kl"] for c in auto["candidates"] for share in c["k_shares"]}
        best = min((v for v in kl.values() if v is not None), default=None)
        table.append([r["model"], r["policy"], f"{r['kv_ratio']:g}", f"{auto['chosen']} ({auto['k_share_actual']:.2f})"]
                     + ["—" if kl.get(c) is None else f"**{kl[c]:.4f}**" if kl[c] == best else f"{kl[c]:.4f}"
                        for c in columns])
    return [f"`--k-share auto`: each candidate split's KL to the original (nats/token) on the first "
            f"{rows[0]['k_share_auto']['score_tokens']} calibration tokens, converted without the refit; the lowest "
            "(in bold) is the share it converts at", "",
            common.md_table(["model", "ranks", "KV ratio", "chosen (K share)", *(f"{c}" for c in columns)], table), ""]


def main(argv=None) -> int:
    from converter.budget_sweep import k_share_given

    parser = build_parser()
    args = parser.parse_args(argv)
    policies, shares = common.csv_list(args.policies), common.csv_list(args.shares)
    for sh in shares:
        try:
            opts = share_options(sh)
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"--shares: {sh!r} is not 'default', 'joint', 'joint:W', 'joint:auto', 'auto' or a number")
        if "joint_key_weight" in opts and args.objective != "attention":
            parser.error(f"--shares {sh}: --joint-key-weight weighs --objective attention's errors (use 'joint' "
                         f"with --objective {args.objective})")
    ratios = [float(r) for r in common.csv_list(args.ratios)]
    shared = {"objective": args.objective, "o_proj_refit": args.refit}
    own = {"ratios": ratios, "policies": policies, "shares": shares, **shared}
    scoring = {}
    if args.score_tokens is not None:   # (recorded only when given: older results reproduce their settings)
        own["score_tokens"] = scoring["k_share_score_tokens"] = args.score_tokens

    def cells(name):
        for key, fields, kw in sweep.pair_cells(name, "k_share", shares, policies, ratios, **shared, **scoring):
            yield key, fields, {**kw, **share_options(kw["k_share"])}

    return sweep.run(args, own, common.csv_list(args.models), cells, render_md, "ckpt_kshare",
                     extra=lambda rep: {**({"latent": "joint"} if rep.get("latent") == "joint" else
                                           {"k_share_actual": k_share_given(rep)}),
                                        **({"k_share_auto": rep["k_share_auto"]} if "k_share_auto" in rep else {}),
                                        **({"joint_key_weight_auto": rep["joint_key_weight_auto"]}
                                           if "joint_key_weight_auto" in rep else {})})


if __name__ == "__main__":
    raise SystemExit(main())
