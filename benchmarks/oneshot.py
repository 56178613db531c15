"""One-shot (no healing) perplexity of converted checkpoints vs. the original.

For every model: the original's perplexity, then {svd, asvd, care} x {uniform, adjusted} x KV ratios,
each converted with converter.pipeline.convert (calibration statistics computed once per model and
reused through a stats cache) and evaluated with converter.eval_cli.perplexity on the corpus TEST split.

    .venv/bin/python benchmarks/oneshot.py                      # full table (~55 min on 2 busy cores)
    .venv/bin/python benchmarks/oneshot.py --models qwen3-small --ratios 0.5 --methods care,svd

Calibration: the first --calib-chars characters of each data/corpus/{austen,linux61_docs,perl536_docs,
python311_docs}.train.txt (cut at a blank line); --calib-samples windows of --calib-seqlen tokens.
Evaluation: the first N/4 tokens of each data/corpus/{...}.test.txt (N = --eval-tokens for that model),
non-overlapping --eval-seqlen windows; the reported ppl pools the four files token-weighted.
Conversions run without care-convert's o_proj refit (its default) unless --o-proj-refit is given: the
table compares factorizations (benchmarks/o_refit.py measures the refit on top of them).
Writes benchmarks/results/oneshot.json and oneshot.md (rows are saved as they finish; --resume skips
rows already in the JSON with identical settings).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_MODELS = "smollm2-135m,qwen3-small,llama3-small"


def parse_eval_tokens(spec: str) -> dict:
    """'8192' or 'smollm2-135m=4096,8192' (a bare number is the default for every other model)."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = int(v)
        elif part:
            out["*"] = int(part)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma list: smollm2-135m (DATA/smollm2-135m) or a folder name under "
                        f"$CARE_SHARED/models (default {DEFAULT_MODELS})")
    p.add_argument("--methods", default="svd,asvd,care")
    p.add_argument("--policies", "--ranks", dest="policies", default="uniform,adjusted")
    p.add_argument("--ratios", default="1.0,0.75,0.5,0.25")
    p.add_argument("--eval-tokens", default="smollm2-135m=2048,4096",
                   help="test tokens per model, split equally over the 4 test files: N or "
                        "'model=N,...,N' (default smollm2-135m=2048,4096)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512_000,
                   help="characters taken from the start of each *.train.txt for calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--o-proj-refit", action="store_true", help="convert with care-convert's o_proj refit "
                   "(its default; off here so the table compares factorizations alone)")
    p.add_argument("--work-dir", default=None, help="converted checkpoints + stats caches (default DATA/bench/oneshot)")
    p.add_argument("--out", default=str(common.RESULTS / "oneshot"), help="output path stem (.json/.md)")
    p.add_argument("--resume", action="store_true", help="keep rows of an existing OUT.json with the same settings")
    p.add_argument("--render-only", action="store_true", help="only rewrite OUT.md from OUT.json")
    return p


def row_key(model, method, policy, ratio):
    return f"{model}|{method}|{policy}|{ratio}"


def model_inputs(name: str, data: Path, work: Path, eval_tokens: dict, args):
    """Per model: (source path, tokenizer, test texts, eval tokens, tokens per file, work folder,
    stats-cache path). The stats cache is keyed by the calibration settings, so every benchmark that
    calibrates the same way (oneshot.py, kshare.py) shares it."""
    from transformers import AutoTokenizer

    src = common.model_path(name, data)
    n_tok = eval_tokens.get(name, eval_tokens.get("*", 8192))
    per_file = n_tok // len(common.DOMAINS)
    tok = AutoTokenizer.from_pretrained(src)
    texts = common.eval_texts(data, tok, per_file)
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    tag = f"{args.calib_samples}x{args.calib_seqlen}_seed{args.seed}_c{args.calib_chars}"
    stats_cache = common.stats_cache(mdir, tag)
    return src, tok, texts, n_tok, per_file, mdir, stats_cache


def evaluate(model, tok, texts: dict, per_file: int, args, ppl_fn) -> dict:
    parts = {}
    t0 = time.perf_counter()
    for name, text in texts.items():
        r = ppl_fn(model, tok, [text], seqlen=args.eval_seqlen, max_tokens=per_file, device="cpu",
                   batch_size=args.eval_batch)
        parts[name] = {"ppl": float(r["ppl"]), "tokens": int(r["tokens"])}
    pooled = common.combine_ppl(parts)
    return {"ppl": pooled["ppl"], "tokens": pooled["tokens"], "per_file": parts,
            "eval_seconds": round(time.perf_counter() - t0, 2)}


def original_ppl(src, tok, texts: dict, per_file: int, args, ppl_fn) -> float:
    """Perplexity of the unconverted source on the test texts (as `evaluate`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ppl = evaluate(model, tok, texts, per_file, args, ppl_fn)["ppl"]
    del model
    gc.collect()
    return ppl


def convert_and_evaluate(src, ckpt: Path, calib: list, tok, texts: dict, per_file: int, stats_cache: Path, args,
                         ppl_fn, **convert_kw) -> tuple[dict, dict]:
    """Convert `src` into `ckpt` (calibration settings from `args`, the rest from `convert_kw`) and
    evaluate it: (care_report, evaluate() result). Used by the sweeps (kshare.py, objective.py); fp32 and
    without the o_proj refit unless `convert_kw` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM

    import model_defs  # noqa: F401,PLC0415  (registers care_mla with transformers)
    from converter.pipeline import convert

    rep = convert(str(src), str(ckpt), calib_files=[str(c) for c in calib], calib_samples=args.calib_samples,
                  calib_seqlen=args.calib_seqlen, seed=args.seed, overwrite=True, stats_cache=str(stats_cache),
                  **{"dtype": "float32", "o_proj_refit": False, **convert_kw})
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    r = evaluate(model, tok, texts, per_file, args, ppl_fn)
    del model
    gc.collect()
    return rep, r


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.render_only:
        res = json.loads(Path(args.out + ".json").read_text())
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        Path(args.out + ".md").write_text(render_md(
            res, names, [m.strip() for m in args.methods.split(",")], [m.strip() for m in args.policies.split(",")],
            [float(r) for r in args.ratios.split(",")]))
        print(Path(args.out + ".md").read_text())
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    data = common.data_dir(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data / "bench" / "oneshot"
    models, methods, policies = (common.csv_list(x) for x in (args.models, args.methods, args.policies))
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    eval_tokens = parse_eval_tokens(args.eval_tokens)
    calib = common.calib_subset(data, args.calib_chars)
    ppl_fn, ppl_name = common.perplexity_fn()
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")

    settings = {"eval_seqlen": args.eval_seqlen, "eval_batch": args.eval_batch,
                "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                "calib_chars_per_file": args.calib_chars, "seed": args.seed, "perplexity": ppl_name,
                **({"o_proj_refit": True} if args.o_proj_refit else {})}
    results = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
               "settings": settings, "eval_tokens": eval_tokens,
               "calibration_files": [str(p.relative_to(common.REPO)) if p.is_relative_to(common.REPO) else str(p)
                                     for p in calib],
               "test_files": [str(p.relative_to(common.REPO)) if p.is_relative_to(common.REPO) else str(p)
                              for p in common.test_files(data)],
               "models": {}, "rows": {}}
    if args.resume and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("settings") == settings:
            results["rows"] = {k: v for k, v in old.get("rows", {}).items()
                               if v.get("eval_tokens_requested") == eval_tokens.get(v["model"], eval_tokens.get("*"))}
            results["models"] = old.get("models", {})
            print(f"resume: {len(results['rows'])} rows kept from {out_json}", flush=True)
        else:
            print("resume: settings differ, starting over", flush=True)
    save = common.report_saver(
        results, args.out, lambda r: render_md(r, models, methods, policies, ratios),
        extra=lambda r: r["machine"].update(loadavg_now=list(__import__("os").getloadavg())))

    from converter.pipeline import convert

    for name in models:
        src, tok, texts, n_tok, per_file, mdir, stats_cache = model_inputs(name, data, work, eval_tokens, args)
        minfo = results["models"].setdefault(name, {})
        minfo.update({"path": str(src), "eval_tokens_requested": n_tok, "stats_cache": str(stats_cache)})

        key = row_key(name, "original", "-", 1.0)
        if key not in results["rows"]:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            minfo["params"] = sum(p.numel() for p in model.parameters())
            r = evaluate(model, tok, texts, per_file, args, ppl_fn)
            del model
            gc.collect()
            results["rows"][key] = {"model": name, "method": "original", "policy": "-", "kv_ratio": 1.0,
                                    "eval_tokens_requested": n_tok, **r}
            print(f"{name:14s} original                     ppl {r['ppl']:9.3f}  "
                  f"({r['tokens']} tok, {r['eval_seconds']:.0f}s)", flush=True)
            save()

        for method in methods:
            for policy in policies:
                for ratio in ratios:
                    key = row_key(name, method, policy, ratio)
                    if key in results["rows"]:
                        continue
                    ckpt = mdir / "ckpt"
                    cache_existed = stats_cache.is_file()
                    t0 = time.perf_counter()
                    rep = convert(str(src), str(ckpt), calib_files=[str(c) for c in calib], method=method,
                                  ranks=policy, kv_ratio=ratio, calib_samples=args.calib_samples,
                                  calib_seqlen=args.calib_seqlen, seed=args.seed, overwrite=True,
                                  stats_cache=str(stats_cache), dtype="float32", o_proj_refit=args.o_proj_refit)
                    conv_s = time.perf_counter() - t0
                    import model_defs  # noqa: F401,PLC0415  (registers care_mla with transformers)
                    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
                    r = evaluate(model, tok, texts, per_file, args, ppl_fn)
                    del model
                    gc.collect()
                    layers = rep.get("layers", [])
                    row = {"model": name, "method": method, "policy": policy, "kv_ratio": ratio,
                           "eval_tokens_requested": n_tok, **r,
                           "cache_values_per_token": rep.get("cache_values_per_token"),
                           "original_cache_values_per_token": rep.get("original_cache_values_per_token"),
                           "achieved_kv_ratio": rep.get("kv_ratio"), "rope_dim": rep.get("rope_dim"),
                           "k_ranks": [l.get("k_rank") for l in layers], "v_ranks": [l.get("v_rank") for l in layers],
                           "mean_k_rel_error": _mean([l.get("k_rel_error") for l in layers]),
                           "mean_v_rel_error": _mean([l.get("v_rel_error") for l in layers]),
                           "calibration_tokens": rep.get("calibration", {}).get("tokens"),
                           "stats_cache_existed": cache_existed,
                           "convert_seconds": rep.get("seconds", {}), "convert_wall_seconds": round(conv_s, 2)}
                    results["rows"][key] = row
                    orig = results["rows"][row_key(name, "original", "-", 1.0)]["ppl"]
                    print(f"{name:14s} {method:5s} {policy:8s} kv {ratio:4.2f}  ppl {r['ppl']:9.3f} "
                          f"(x{r['ppl'] / orig:.3f})  convert {conv_s:5.1f}s eval {r['eval_seconds']:.0f}s",
                          flush=True)
                    save()
        shutil_rm(mdir / "ckpt")
    save()
    print(out_md.read_text())
    return 0


def shutil_rm(p: Path) -> None:
    import shutil
    shutil.rmtree(p, ignore_errors=True)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 6) if xs else None


def _ratio(q):
    return f"x{q:.2f}" if q < 10 else f"x{q:.0f}"


def _fmt(x, nd=2):
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.{nd}f}"


def render_md(res: dict, models, methods, policies, ratios) -> str:
    rows = res["rows"]
    s = res["settings"]
    out = [*common.report_head(res, "One-shot perplexity: original vs. converted (no healing)"),
           f"- calibration (TRAIN split): {s['calib_samples']} windows x {s['calib_seqlen']} tokens, seed {s['seed']}, "
           f"drawn from the first {s['calib_chars_per_file']} characters of each of "
           + ", ".join(f"`{f}`" for f in res["calibration_files"])
           + "; statistics computed once per model (stats cache) and shared by all its conversions",
           f"- perplexity (TEST split): `{s['perplexity']}`, fp32, non-overlapping {s['eval_seqlen']}-token windows "
           f"(batch {s['eval_batch']}), the first N/4 tokens of each of "
           + ", ".join(f"`{f}`" for f in res["test_files"])
           + "; ppl = exp(token-weighted mean NLL over the four files)",
           "- cells: perplexity (ratio to the original in parentheses); KV = per-token cache values "
           "relative to the original GQA cache (exact: the converter hits the budget exactly)", ""]
    for name in models:
        orig = rows.get(row_key(name, "original", "-", 1.0))
        if orig is None:
            continue
        minfo = res["models"].get(name, {})
        out += [f"## {name}", "",
                f"`{minfo.get('path')}`, {minfo.get('params', 0) / 1e6:.1f}M params; "
                f"eval tokens N = {minfo.get('eval_tokens_requested')} requested, {orig['tokens']} scored; "
                f"original ppl **{orig['ppl']:.3f}**", ""]
        header = ["method", "ranks"] + [f"KV {r}" for r in ratios]
        trs = [["original", "—"] + [f"{orig['ppl']:.2f}" for _ in ratios]]
        cache_row = None
        for method in methods:
            for policy in policies:
                cells = []
                for r in ratios:
                    row = rows.get(row_key(name, method, policy, r))
                    if row is None:
                        cells.append("—")
                    else:
                        cells.append(f"{_fmt(row['ppl'])} ({_ratio(row['ppl'] / orig['ppl'])})")
                        if cache_row is None:
                            cache_row = {}
                        cache_row[r] = f"{row['cache_values_per_token']}/{row['original_cache_values_per_token']}"
                trs.append([method, policy] + cells)
        if cache_row:
            trs.append(["cache values/token", ""] + [cache_row.get(r, "—") for r in ratios])
        out += [common.md_table(header, trs), ""]
        # expectation checks (reported, not tuned for)
        checks = []
        for policy in policies:
            for r in ratios:
                v = {mth: rows.get(row_key(name, mth, policy, r)) for mth in ("care", "asvd", "svd")}
                if all(v.values()):
                    c, a, sv = (v[k]["ppl"] for k in ("care", "asvd", "svd"))
                    if max(c, a, sv) <= min(c, a, sv) * (1 + 1e-3):
                        checks.append(f"{policy} KV {r}: care {c:.2f} = asvd {a:.2f} = svd {sv:.2f} → tie "
                                      f"(at parity every method keeps full rank: identical checkpoints up to rounding)")
                        continue
                    ok = c < a < sv
                    checks.append(f"{policy} KV {r}: care {_fmt(c)} {'<' if c < a else '≥'} asvd {_fmt(a)} "
                                  f"{'<' if a < sv else '≥'} svd {_fmt(sv)} → {'yes' if ok else 'NO'}")
        if checks:
            out += ["care < asvd < svd:", ""] + [f"- {c}" for c in checks] + [""]
        for policy in policies:
            row = rows.get(row_key(name, "care", policy, 0.5))
            if row:
                q = row["ppl"] / orig["ppl"]
                out.append(f"- care {policy} at KV 0.5: {q:.2f}x the original "
                           f"({'within' if q <= 1.5 else 'NOT within'} 1.5x)")
        out.append("")
        # timings
        conv = [row for k, row in rows.items() if row["model"] == name and row["method"] != "original"]
        if conv:
            stages = sorted({st for row in conv for st in row["convert_seconds"] if st != "total"})
            first = conv[:1]  # rows are stored in run order: the model's first conversion collected the statistics
            med = {st: statistics.median(row["convert_seconds"].get(st, 0.0) for row in conv) for st in stages}
            line = (f"Conversion seconds per stage (median over {len(conv)} conversions; calibration statistics are "
                    f"computed by the first conversion and then read from the stats cache): "
                    + ", ".join(f"{st} {med[st]:.2f}" for st in stages))
            if first:
                how = {True: "statistics read from an existing stats cache",
                       False: f"collects the statistics over {first[0].get('calibration_tokens')} tokens"}.get(
                    first[0].get("stats_cache_existed"),
                    f"computes the statistics over {first[0].get('calibration_tokens')} tokens unless the stats "
                    f"cache file already existed")
                line += (f"; first conversion of the run ({how}): "
                         + ", ".join(f"{st} {first[0]['convert_seconds'].get(st, 0):.1f}" for st in stages))
            evs = [row["eval_seconds"] for row in conv]
            line += (f". Eval seconds per row: median {statistics.median(evs):.1f} "
                     f"(original {orig['eval_seconds']:.1f}).")
            out.append(line)
            out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
