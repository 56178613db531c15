"""What the o_proj refit (care-convert --o-proj-refit, the default) does to one-shot perplexity.

Each cell is converted twice with the same factorization: without the refit (the latents alone, as the
paper) and with it (every layer's o_proj refitted by least squares to what its converted attention
outputs on the calibration windows, propagated through the converted layers; converter/refit.py).
Same calibration, evaluation and stats caches as benchmarks/oneshot.py, so the "off" cells equal the
care rows of oneshot.md (--objective kv) and objective.md (--objective attention).

    .venv/bin/python benchmarks/o_refit.py                   # 3 models x KV 0.5, 0.25 x uniform, adjusted
    .venv/bin/python benchmarks/o_refit.py --objective attention --out benchmarks/results/o_refit_attention
    .venv/bin/python benchmarks/o_refit.py --policies uniform --ridges 0.001,0.01,0.1,1 \
        --out benchmarks/results/refit_ridge          # the refit's ridge (--o-proj-refit-ridge)

Writes benchmarks/results/o_refit.json and o_refit.md (--resume skips rows already there). With
--ridges, each cell is converted without the refit and once per ridge, a column each.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sweep  # noqa: E402

REFIT = (False, True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="kv", choices=["kv", "attention"])
    p.add_argument("--ridges", default=None, metavar="LIST",
                   help="comma list of --o-proj-refit-ridge values, a column each (default: the converter's "
                        "default ridge only, as the without/with table)")
    sweep.add_pair_args(p, "o_refit")
    return p


def ridge_table(res: dict) -> str:
    """One row per model x policy x ratio: perplexity without the refit, then with each ridge (the
    lowest in bold)."""
    keys = ["off", *(f"{r:g}" for r in res["settings"]["ridges"])]
    rows = []
    for head, _, got in sweep.table_rows(res, keys):
        best = min((r["ppl"] for r in got if r), default=None)
        rows.append(head + ["—" if r is None else (f"**{r['ppl']:.2f}**" if r["ppl"] == best else f"{r['ppl']:.2f}")
                            for r in got])
    return common.md_table(["model (original ppl)", "ranks", "KV ratio", "no refit",
                            *(f"ridge {k}" for k in keys[1:])], rows)


def render_md(res: dict) -> str:
    s = res["settings"]
    if s.get("ridges"):
        lines = sweep.md_header(res, "o_proj refit: its ridge (`--o-proj-refit-ridge`), one-shot perplexity",
                                f"care, --objective {s['objective']}",
                                "perplexity; ridge = lam / mean diag(C_o'o') (converter/refit.py); lowest in bold")
        return "\n".join(lines + [ridge_table(res), ""]) + "\n"
    lines = sweep.md_header(res, "o_proj refit (`--o-proj-refit`): one-shot perplexity, without vs with",
                            f"care, --objective {s['objective']}",
                            "perplexity (ratio to the original); last column: with vs without the refit")
    lines += [sweep.pair_table(res, REFIT, ["factorization alone", "+ o_proj refit"]), ""]
    return "\n".join(lines) + "\n"


def ridge_cells(name: str, policies: list[str], ratios: list[float], ridges: list[float], objective: str):
    """Cells of the ridge sweep: model x policy x ratio x (no refit, then each ridge)."""
    for policy in policies:
        for ratio in ratios:
            base = {"ranks": policy, "kv_ratio": ratio, "objective": objective}
            yield (f"{name}|{policy}|{ratio}|off", {"policy": policy, "kv_ratio": ratio, "ridge": None},
                   {**base, "o_proj_refit": False})
            for r in ridges:
                yield (f"{name}|{policy}|{ratio}|{r:g}", {"policy": policy, "kv_ratio": ratio, "ridge": r},
                       {**base, "o_proj_refit": True, "o_proj_refit_ridge": r})


def attn_errors(rep: dict) -> dict:
    return {"attn_rel_error": [l.get("attn_rel_error") for l in rep["layers"]]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.ridges:
        policies, ratios = common.csv_list(args.policies), [float(r) for r in common.csv_list(args.ratios)]
        ridges = [float(r) for r in common.csv_list(args.ridges)]
        settings = {"ratios": ratios, "policies": policies, "ridges": ridges, "objective": args.objective}
        return sweep.run(args, settings, common.csv_list(args.models),
                         lambda name: ridge_cells(name, policies, ratios, ridges, args.objective),
                         render_md, "ckpt_o_refit", attn_errors)
    return sweep.run_pair(args, "o_proj_refit", REFIT, render_md, "ckpt_o_refit",
                          shared={"objective": args.objective}, extra=attn_errors)


if __name__ == "__main__":
    raise SystemExit(main())
