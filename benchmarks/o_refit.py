"""What the o_proj refit (care-convert --o-proj-refit, the default) does to one-shot perplexity.

Each cell is converted twice with the same factorization: without the refit (the latents alone, as the
paper) and with it (every layer's o_proj refitted by least squares to what its converted attention
outputs on the calibration windows, propagated through the converted layers; converter/refit.py).
Same calibration, evaluation and stats caches as benchmarks/oneshot.py, so the "off" cells equal the
care rows of oneshot.md (--objective kv) and objective.md (--objective attention).

    .venv/bin/python benchmarks/o_refit.py                   # 3 models x KV 0.5, 0.25 x uniform, adjusted
    .venv/bin/python benchmarks/o_refit.py --objective attention --out benchmarks/results/o_refit_attention

Writes benchmarks/results/o_refit.json and o_refit.md (--resume skips rows already there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

REFIT = (False, True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="kv", choices=["kv", "attention"])
    sweep.add_pair_args(p, "o_refit")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = sweep.md_header(res, "o_proj refit (`--o-proj-refit`): one-shot perplexity, without vs with",
                            f"care, --objective {s['objective']}",
                            "perplexity (ratio to the original); last column: with vs without the refit")
    lines += [sweep.pair_table(res, REFIT, ["factorization alone", "+ o_proj refit"]), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return sweep.run_pair(args, "o_proj_refit", REFIT, render_md, "ckpt_o_refit",
                          shared={"objective": args.objective},
                          extra=lambda rep: {"attn_rel_error": [l.get("attn_rel_error") for l in rep["layers"]]})


if __name__ == "__main__":
    raise SystemExit(main())
