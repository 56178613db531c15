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
import sweep  # noqa: E402

OBJECTIVES = ("kv", "attention")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sweep.add_pair_args(p, "objective")
    return p


def render_md(res: dict) -> str:
    lines = sweep.md_header(res, "Fitting objective of the latents (`--objective`): one-shot perplexity", "care",
                            "perplexity (ratio to the original); last column: attention vs kv")
    lines += [sweep.pair_table(res, OBJECTIVES, ["kv (paper)", "attention"]), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return sweep.run_pair(args, "objective", OBJECTIVES, render_md, "ckpt_objective")


if __name__ == "__main__":
    raise SystemExit(main())
