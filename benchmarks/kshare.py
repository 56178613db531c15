"""How the K/V split of the latent (care-convert --k-share) changes one-shot perplexity.

Same calibration, evaluation and stats caches as benchmarks/oneshot.py (so its 'default' column is
comparable to oneshot.md's care rows of the same ratio); one conversion + evaluation per
(model, policy, share). 'default' is the converter's own split (proportional to the lossless K and
V widths after the rope key is taken out), printed with the share it amounts to.

    .venv/bin/python benchmarks/kshare.py                              # smollm2-135m + qwen3-small, KV 0.5
    .venv/bin/python benchmarks/kshare.py --models qwen3-small --shares 0.3,0.5 --policies uniform

Writes benchmarks/results/kshare.json and kshare.md (rows are saved as they finish; --resume skips
rows already there with identical settings).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import oneshot  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    p.add_argument("--models", default="smollm2-135m,qwen3-small")
    p.add_argument("--policies", default="uniform,adjusted")
    p.add_argument("--ratio", type=float, default=0.5, help="KV ratio of every conversion (default 0.5)")
    p.add_argument("--shares", default="default,0.2,0.25,0.3,0.35,0.5",
                   help="comma list of --k-share values; 'default' = the converter's proportional split")
    p.add_argument("--eval-tokens", default="smollm2-135m=2048,4096", help="as in oneshot.py")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="checkpoints + stats caches (default DATA/bench/oneshot, "
                                                     "shared with oneshot.py)")
    p.add_argument("--out", default=str(common.RESULTS / "kshare"), help="output path stem (.json/.md)")
    p.add_argument("--resume", action="store_true")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = ["# K/V split of the latent (`--k-share`): one-shot perplexity", "",
             *common.run_lines(res),
             f"- machine: {common.machine_line(res['machine'])}",
             f"- every conversion: care, KV {s['ratio']}, calibration {s['calib_samples']} x {s['calib_seqlen']} "
             f"tokens (train split, as oneshot.py), perplexity on the test split ({s['eval_seqlen']}-token windows), "
             "fp32, no healing",
             "- cells: perplexity (K share of the latent actually given; ratio to the original)", ""]
    for model, minfo in res["models"].items():
        orig = minfo.get("original_ppl")
        lines += [f"## {model}", "", f"original ppl **{orig:.3f}**, eval tokens {minfo.get('eval_tokens')}", ""]
        shares = res["settings"]["shares"]
        header = ["ranks"] + [f"k-share {sh}" for sh in shares]
        rows = []
        for policy in res["settings"]["policies"]:
            cells = [policy]
            for sh in shares:
                r = res["rows"].get(f"{model}|{policy}|{sh}")
                cells.append("—" if r is None else
                             f"{r['ppl']:.2f} ({r['k_share_actual']:.2f}; x{r['ppl'] / orig:.2f})")
            rows.append(cells)
        lines += [common.md_table(header, rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data = common.data_dir(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data / "bench" / "oneshot"
    models, policies, shares = (common.csv_list(x) for x in (args.models, args.policies, args.shares))
    eval_tokens = oneshot.parse_eval_tokens(args.eval_tokens)
    calib = common.calib_subset(data, args.calib_chars)
    ppl_fn, ppl_name = common.perplexity_fn()
    out_json = Path(args.out + ".json")
    settings = {"ratio": args.ratio, "policies": policies, "shares": shares, "eval_seqlen": args.eval_seqlen,
                "eval_batch": args.eval_batch, "calib_samples": args.calib_samples,
                "calib_seqlen": args.calib_seqlen, "calib_chars_per_file": args.calib_chars, "seed": args.seed,
                "perplexity": ppl_name}
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "settings": settings, "models": {}, "rows": {}}
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("settings") == settings:
            res["rows"], res["models"] = old["rows"], old["models"]
    save = common.report_saver(res, args.out, render_md)

    for name in models:
        src, tok, texts, n_tok, per_file, mdir, stats_cache = oneshot.model_inputs(name, data, work, eval_tokens,
                                                                                   args)
        minfo = res["models"].setdefault(name, {"path": str(src), "eval_tokens": n_tok})
        if "original_ppl" not in minfo:
            minfo["original_ppl"] = oneshot.original_ppl(src, tok, texts, per_file, args, ppl_fn)
            save()
        for policy in policies:
            for sh in shares:
                key = f"{name}|{policy}|{sh}"
                if key in res["rows"]:
                    continue
                rep, r = oneshot.convert_and_evaluate(
                    src, mdir / "ckpt_kshare", calib, tok, texts, per_file, stats_cache, args, ppl_fn,
                    method="care", ranks=policy, kv_ratio=args.ratio, k_share=None if sh == "default" else float(sh))
                k_ranks = [l["k_rank"] for l in rep["layers"]]
                v_ranks = [l["v_rank"] for l in rep["layers"]]
                actual = sum(k_ranks) / (sum(k_ranks) + sum(v_ranks))
                res["rows"][key] = {"model": name, "policy": policy, "k_share": sh, "ppl": r["ppl"],
                                    "tokens": r["tokens"], "k_share_actual": actual, "k_ranks": k_ranks,
                                    "v_ranks": v_ranks, "cache_values_per_token": rep["cache_values_per_token"]}
                print(f"{name:14s} {policy:9s} k-share {sh:8s} (actual {actual:.3f}) ppl {r['ppl']:.3f}", flush=True)
                save()
    save()
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
