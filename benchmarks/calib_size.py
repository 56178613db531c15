"""How much calibration text a conversion needs: one-shot perplexity and conversion time against
care-convert --calib-samples.

Everything the converter fits comes from the calibration windows (the input covariances of the
latents, the o_proj refit's moments), so fewer windows convert faster but fit noisier statistics;
the converter's default is 256 windows of 256 tokens, the quickstart uses 64 to stay within a few
minutes on 2 CPU cores. Each cell is converted from scratch (no stats cache: the calibration time is
part of what is measured) with the deployment settings (uniform ranks, --objective attention, the
o_proj refit), calibrated on oneshot.py's train-split text and evaluated on its test split.

    .venv/bin/python benchmarks/calib_size.py                      # smollm2-135m, KV 0.5, 16/64/256 windows
    .venv/bin/python benchmarks/calib_size.py --models qwen3-small --sizes 8,32,128 --ratios 0.5,0.25

Writes benchmarks/results/calib_size.json and calib_size.md (rows saved as they finish; --resume skips
rows already there with identical settings).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import oneshot  # noqa: E402
import sweep  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--sizes", default="16,64,256", help="comma list of --calib-samples values")
    p.add_argument("--ratios", default="0.5")
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    sweep.add_eval_calib_args(p)
    p.add_argument("--work-dir", default=None, help="checkpoints (default DATA/bench/oneshot)")
    p.add_argument("--out", default=str(common.RESULTS / "calib_size"), help="output path stem (.json/.md)")
    p.add_argument("--resume", action="store_true", help="keep rows of an existing OUT.json with the same settings")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = [*common.report_head(res, "Calibration size (`--calib-samples`): one-shot perplexity and conversion time"),
             f"- every conversion: care, uniform ranks, --objective attention, o_proj refit, windows of "
             f"{s['calib_seqlen']} tokens from the train split (as oneshot.py), no stats cache; perplexity on "
             f"the test split ({s['eval_seqlen']}-token windows), fp32, no healing",
             "- seconds: care-convert's own stage timings (calibrate: the calibration forward; refit: the o_proj "
             "refit, which runs the windows through every layer again; total: every stage)", ""]
    rows = []
    for model, minfo in res["models"].items():
        orig = minfo["original_ppl"]
        for ratio in s["ratios"]:
            for size in s["sizes"]:
                r = res["rows"].get(f"{model}|{ratio}|{size}")
                if r is None:
                    continue
                sec = r["seconds"]
                rows.append([f"{model} ({orig:.2f})", str(ratio), str(size), f"{size * s['calib_seqlen']:,}",
                             f"{r['ppl']:.2f} (x{r['ppl'] / orig:.2f})", f"{sec.get('calibrate', 0):.0f}",
                             f"{sec.get('refit', 0):.0f}", f"{sec.get('total', 0):.0f}"])
    lines += [common.md_table(["model (original ppl)", "KV ratio", "windows", "tokens", "perplexity",
                               "calibrate s", "refit s", "total s"], rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from converter.pipeline import convert

    args = build_parser().parse_args(argv)
    sizes, ratios = [int(x) for x in common.csv_list(args.sizes)], [float(r) for r in common.csv_list(args.ratios)]
    st = sweep.start(args, {"sizes": sizes, "ratios": ratios}, render_md)
    res, save = st.res, st.save
    for name in common.csv_list(args.models):
        src, tok, texts, n_tok, per_file, mdir, _ = oneshot.model_inputs(name, st.data, st.work, st.eval_tokens,
                                                                          args)
        minfo = res["models"].setdefault(name, {"path": str(src), "eval_tokens": n_tok})
        if "original_ppl" not in minfo:
            minfo["original_ppl"] = oneshot.original_ppl(src, tok, texts, per_file, args, st.ppl_fn)
            save()
        for ratio in ratios:
            for size in sizes:
                key = f"{name}|{ratio}|{size}"
                if key in res["rows"]:
                    continue
                t0 = time.perf_counter()
                rep = convert(str(src), str(mdir / "ckpt_calib_size"), calib_files=[str(c) for c in st.calib],
                              calib_samples=size, calib_seqlen=args.calib_seqlen, seed=args.seed, overwrite=True,
                              dtype="float32", ranks="uniform", objective="attention", o_proj_refit=True,
                              kv_ratio=ratio)
                wall = time.perf_counter() - t0
                model = AutoModelForCausalLM.from_pretrained(str(mdir / "ckpt_calib_size"), dtype=torch.float32)
                r = oneshot.evaluate(model.eval(), tok, texts, per_file, args, st.ppl_fn)
                del model
                gc.collect()
                res["rows"][key] = {"model": name, "kv_ratio": ratio, "calib_samples": size, "ppl": r["ppl"],
                                    "tokens": r["tokens"], "calibration_tokens": rep["calibration"]["tokens"],
                                    "seconds": rep["seconds"], "convert_wall_seconds": round(wall, 1)}
                print(f"{key}: ppl {r['ppl']:.3f}, convert {wall:.0f} s", flush=True)
                save()
    save()
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
