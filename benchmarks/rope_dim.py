"""How the decoupled RoPE key's width (care-convert --rope-dim) changes one-shot perplexity.

The rope key is cached in full for every token, so it takes its width out of the latent's budget: at
KV 0.5 the default 64 dims are a third of SmolLM2's per-layer cache (192) and half of the small models'
(128). Fewer rope dims leave more latent rank but drop RoPE from more key components (the position-free
part of the key goes into the latent); more do the opposite. Each cell is converted with the settings
recommended for deployments (uniform ranks, --objective attention, the o_proj refit: the quickstart's),
same calibration, evaluation and stats caches as benchmarks/oneshot.py; 'default' is the converter's own
choice (min(64, head_dim), at most half the per-layer budget), printed with the width it amounts to.

    .venv/bin/python benchmarks/rope_dim.py                        # 3 models x KV 0.5, 0.25
    .venv/bin/python benchmarks/rope_dim.py --models smollm2-135m --dims 32,64 --ratios 0.5

Writes benchmarks/results/rope_dim.json and rope_dim.md (rows are saved as they finish; --resume skips
rows already there with identical settings). Widths not below the per-layer budget are skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sweep  # noqa: E402

from converter.cache_plan import AttentionShape  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="default,16,32,48,64,96",
                   help="comma list of --rope-dim values; 'default' = the converter's own choice")
    p.add_argument("--objective", default="attention", choices=["kv", "attention"])
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="the o_proj refit (default on, as care-convert)")
    sweep.add_pair_args(p, "rope_dim")
    p.set_defaults(policies="uniform")
    return p


def per_layer_budget(name: str, ratio: float, data: Path) -> int:
    """Values per token per layer the budget allows (care-convert's arithmetic: ratio x 2 g d_h)."""
    return int(ratio * AttentionShape.of_folder(common.model_path(name, data)).parity)


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = sweep.md_header(res, "Decoupled RoPE key width (`--rope-dim`): one-shot perplexity",
                            f"care, {'/'.join(s['policies'])} ranks, --objective {s['objective']}, "
                            f"o_proj refit {'on' if s['refit'] else 'off'}",
                            "perplexity (ratio to the original); 'default' shows the width it chose; "
                            "lowest per row in bold; — = not run (width >= the per-layer budget)")
    dims = s["dims"]
    rows = sweep.bold_best_rows(res, dims, lambda d, r, orig: f"{r['ppl']:.2f} (x{r['ppl'] / orig:.2f})" + (
        f" [d_r {r['rope_dim']}]" if d == "default" else ""))
    lines += [common.md_table(["model (original ppl)", "ranks", "KV ratio", *(f"rope {d}" for d in dims)], rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    policies, ratios = common.csv_list(args.policies), [float(r) for r in common.csv_list(args.ratios)]
    dims = common.csv_list(args.dims)
    data = common.data_dir(args.data_dir)
    shared = {"objective": args.objective, "o_proj_refit": args.refit}

    def cells(name):
        for policy in policies:
            for ratio in ratios:
                budget = per_layer_budget(name, ratio, data)
                for d in dims:
                    if d != "default" and int(d) >= budget:
                        continue
                    yield (f"{name}|{policy}|{ratio}|{d}", {"policy": policy, "kv_ratio": ratio, "dim": d},
                           {"ranks": policy, "kv_ratio": ratio, **shared,
                            "rope_dim": None if d == "default" else int(d)})

    return sweep.run(args, {"ratios": ratios, "policies": policies, "dims": dims, "objective": args.objective,
                            "refit": args.refit},
                     common.csv_list(args.models), cells, render_md, "ckpt_rope_dim",
                     extra=lambda rep: {"rope_dim": rep["rope_dim"]})


if __name__ == "__main__":
    raise SystemExit(main())
