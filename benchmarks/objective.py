"""What the K/V latents are fitted to (care-convert --objective): one-shot perplexity, kv vs attention.

`kv` is the paper's CARE (minimize the error of the keys and values themselves); `attention`
minimizes the keys' error as the queries read it (attention logits) and the values' as o_proj reads
them (converter/attention_weights.py). Same calibration, evaluation and stats caches as
benchmarks/oneshot.py, so the `kv` cells equal oneshot.md's care rows.

    .venv/bin/python benchmarks/objective.py                 # 3 models x KV 0.5, 0.25 x uniform, adjusted
    .venv/bin/python benchmarks/objective.py --models qwen3-small --ratios 0.5 --policies uniform

Writes benchmarks/results/objective.json and objective.md (rows are saved as they finish; --resume
skips rows already there with identical settings).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import oneshot  # noqa: E402

OBJECTIVES = ("kv", "attention")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    p.add_argument("--models", default=oneshot.DEFAULT_MODELS)
    p.add_argument("--policies", default="uniform,adjusted")
    p.add_argument("--ratios", default="0.5,0.25")
    p.add_argument("--eval-tokens", default="smollm2-135m=2048,4096", help="as in oneshot.py")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="checkpoints + stats caches (default DATA/bench/oneshot, "
                                                     "shared with oneshot.py)")
    p.add_argument("--out", default=str(common.RESULTS / "objective"), help="output path stem (.json/.md)")
    p.add_argument("--resume", action="store_true")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = ["# Fitting objective of the latents (`--objective`): one-shot perplexity", "",
             *common.run_lines(res),
             f"- machine: {common.machine_line(res['machine'])}",
             f"- every conversion: care, calibration {s['calib_samples']} x {s['calib_seqlen']} tokens (train split, "
             f"as oneshot.py), perplexity on the test split ({s['eval_seqlen']}-token windows), fp32, no healing",
             "- cells: perplexity (ratio to the original); last column: attention vs kv", ""]
    header = ["model (original ppl)", "ranks", "KV ratio", "kv (paper)", "attention", "change"]
    rows = []
    for model, minfo in res["models"].items():
        orig = minfo.get("original_ppl")
        for policy in s["policies"]:
            for ratio in s["ratios"]:
                cells = [f"{model} ({orig:.2f})", policy, str(ratio)]
                got = [res["rows"].get(f"{model}|{policy}|{ratio}|{o}") for o in OBJECTIVES]
                cells += ["—" if r is None else f"{r['ppl']:.2f} (x{r['ppl'] / orig:.2f})" for r in got]
                cells.append("—" if None in got else f"{100 * (got[1]['ppl'] / got[0]['ppl'] - 1):+.1f} %")
                rows.append(cells)
    lines += [common.md_table(header, rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data = common.data_dir(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data / "bench" / "oneshot"
    models, policies = common.csv_list(args.models), common.csv_list(args.policies)
    ratios = [float(r) for r in common.csv_list(args.ratios)]
    eval_tokens = oneshot.parse_eval_tokens(args.eval_tokens)
    calib = common.calib_subset(data, args.calib_chars)
    ppl_fn, ppl_name = common.perplexity_fn()
    out_json = Path(args.out + ".json")
    settings = {"ratios": ratios, "policies": policies, "eval_seqlen": args.eval_seqlen,
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
            for ratio in ratios:
                for objective in OBJECTIVES:
                    key = f"{name}|{policy}|{ratio}|{objective}"
                    if key in res["rows"]:
                        continue
                    rep, r = oneshot.convert_and_evaluate(
                        src, mdir / "ckpt_objective", calib, tok, texts, per_file, stats_cache, args, ppl_fn,
                        method="care", ranks=policy, kv_ratio=ratio, objective=objective)
                    res["rows"][key] = {
                        "model": name, "policy": policy, "kv_ratio": ratio, "objective": objective, "ppl": r["ppl"],
                        "tokens": r["tokens"], "k_ranks": [l["k_rank"] for l in rep["layers"]],
                        "v_ranks": [l["v_rank"] for l in rep["layers"]],
                        "cache_values_per_token": rep["cache_values_per_token"]}
                    print(f"{name:14s} {policy:9s} KV {ratio:<5} {objective:9s} ppl {r['ppl']:.3f}", flush=True)
                    save()
    save()
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
