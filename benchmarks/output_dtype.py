"""What writing the checkpoint in bf16 (care-convert --dtype, `auto` for a bf16 source) costs in one-shot perplexity.

The factorization runs in fp64 either way; only the written factors are rounded. Every checkpoint
is evaluated in fp32 (upcast on load), so the columns differ by the rounding of the weights alone.
Same calibration, evaluation and stats caches as benchmarks/oneshot.py.

    .venv/bin/python benchmarks/output_dtype.py     # 3 models x KV 0.5, 0.25, uniform, --objective attention

Writes benchmarks/results/output_dtype.json and output_dtype.md (--resume skips rows already there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

DTYPES = ("float32", "bfloat16")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="attention", choices=["kv", "attention"])
    sweep.add_pair_args(p, "output_dtype")
    p.set_defaults(policies="uniform")
    return p


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = sweep.md_header(res, "Checkpoint dtype (`--dtype`): one-shot perplexity, fp32 vs bf16 weights",
                            f"care, --objective {s['objective']}",
                            "perplexity (ratio to the original), bf16 weights upcast to fp32 on load; "
                            "last column: bf16 vs fp32")
    lines += [sweep.pair_table(res, DTYPES, ["fp32 weights", "bf16 weights"], change_digits=2), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return sweep.run_pair(args, "dtype", DTYPES, render_md, "ckpt_output_dtype",
                          shared={"objective": args.objective})


if __name__ == "__main__":
    raise SystemExit(main())
