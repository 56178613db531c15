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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sweep  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,qwen3-small")
    p.add_argument("--ratio", type=float, default=0.5, help="KV ratio of every conversion (default 0.5)")
    p.add_argument("--shares", default="default,0.2,0.25,0.3,0.35,0.5",
                   help="comma list of --k-share values; 'default' = the converter's proportional split")
    sweep.add_common_args(p, "kshare")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = sweep.md_header(res, "K/V split of the latent (`--k-share`): one-shot perplexity", f"care, KV {s['ratio']}",
                            "perplexity (K share of the latent actually given; ratio to the original)")
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


def k_share_actual(rep: dict) -> dict:
    k = sum(l["k_rank"] for l in rep["layers"])
    return {"k_share_actual": k / (k + sum(l["v_rank"] for l in rep["layers"]))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    policies, shares = common.csv_list(args.policies), common.csv_list(args.shares)

    def cells(name):
        for policy in policies:
            for sh in shares:
                yield (f"{name}|{policy}|{sh}", {"policy": policy, "k_share": sh},
                       {"ranks": policy, "kv_ratio": args.ratio, "k_share": None if sh == "default" else float(sh)})

    return sweep.run(args, {"ratio": args.ratio, "policies": policies, "shares": shares},
                     common.csv_list(args.models), cells, render_md, "ckpt_kshare", extra=k_share_actual)


if __name__ == "__main__":
    raise SystemExit(main())
