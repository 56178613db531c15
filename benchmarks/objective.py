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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import oneshot  # noqa: E402
import sweep  # noqa: E402

OBJECTIVES = ("kv", "attention")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=oneshot.DEFAULT_MODELS)
    p.add_argument("--ratios", default="0.5,0.25")
    sweep.add_common_args(p, "objective")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = sweep.md_header(res, "Fitting objective of the latents (`--objective`): one-shot perplexity", "care",
                            "perplexity (ratio to the original); last column: attention vs kv")
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
    policies, ratios = common.csv_list(args.policies), [float(r) for r in common.csv_list(args.ratios)]

    def cells(name):
        for policy in policies:
            for ratio in ratios:
                for objective in OBJECTIVES:
                    yield (f"{name}|{policy}|{ratio}|{objective}",
                           {"policy": policy, "kv_ratio": ratio, "objective": objective},
                           {"ranks": policy, "kv_ratio": ratio, "objective": objective})

    return sweep.run(args, {"ratios": ratios, "policies": policies}, common.csv_list(args.models), cells,
                     render_md, "ckpt_objective")


if __name__ == "__main__":
    raise SystemExit(main())
