"""Would one latent shared by K and V (DeepSeek's MLA, TransMLA) keep more than CARE's separate K and V latents
at the same cache? An indicator, not a conversion: the share of the key/value output energy each leaves out.

care-convert caches per layer [c_K (r_K) | c_V (r_V) | k_rope (d_r)] and fits c_K and c_V separately (the CARE
paper). K and V are both linear maps of the same attention input, so their outputs share directions; a joint
latent c (r = r_K + r_V) fitted to [K_nope; V] together keeps at least as much, for the same cached values (the
separate latents are a joint one whose up-projection is block-diagonal), and vLLM's MLA reads a joint latent
natively (kv_b_proj maps one latent to both). How much more is what this measures, per model and budget, on the
calibration text (train split, as oneshot.py):

* K_nope: the key rows care-convert's rope map leaves position-free (the part the latent must hold; the rope key
  is cached whole), from the same statistics care-convert uses; Qwen3 keys after k_norm, as converted.
* the objective of `--objective kv`: output error energy; the best rank-r fit keeps the top r eigenvalues of the
  outputs' second moment. Cells: unexplained share of sum over layers of (K_nope + V) energy, for the separate
  latents at care-convert's default split (proportional to the lossless widths) and at the best split of each
  layer (an oracle), and for a joint latent of the same rank.

Not measured: perplexity (a joint latent is not implemented: format, model_defs, plugin and the attention
objective would change), and the decode cost (a joint latent's scores and values both run over all r dims).

    .venv/bin/python benchmarks/joint_latent.py     # the three models, KV 0.5 and 0.25

Writes benchmarks/results/joint_latent.json and joint_latent.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from converter import calib_data, calibrate, load, pipeline  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,qwen3-small,llama3-small")
    p.add_argument("--ratios", default="0.5,0.25")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512000)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=str(common.RESULTS / "joint_latent"))
    return p


@torch.no_grad()
def output_moments(model, arch: str, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, sum over tokens of y y^T for y = [key; value] (fp64): the key as the latent sees it (Qwen3:
    after k_norm), pre-RoPE."""
    moments: list[torch.Tensor | None] = [None] * len(model.model.layers)
    held: dict[int, torch.Tensor] = {}

    def hook(l: int, part: str):
        def record(_module, _inputs, out):
            y = out.detach().double()
            if part == "k" and arch == "qwen3":   # k_norm's output is per head: [batch, tokens, g, d_h]
                y = y.flatten(2)
            y = y.reshape(-1, y.shape[-1])
            if part == "k":
                held[l] = y
                return
            y = torch.cat([held.pop(l), y], 1)
            moments[l] = y.T @ y if moments[l] is None else moments[l] + y.T @ y
        return record

    handles = []
    for l, layer in enumerate(model.model.layers):
        a = layer.self_attn
        key_module = a.k_norm if arch == "qwen3" else a.k_proj
        handles += [key_module.register_forward_hook(hook(l, "k")), a.v_proj.register_forward_hook(hook(l, "v"))]
    try:
        for chunk in windows.split(8):
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    return moments


def left_out(eigs: torch.Tensor, r: int) -> float:
    """Energy a best rank-r fit leaves (eigs descending)."""
    return eigs[r:].sum().item()


def model_rows(name: str, data: Path, ratios: list[float], args) -> list[dict]:
    source = load.load_source(common.model_path(name, data))
    model, cfg = source.model.float().eval(), source.config
    windows = calib_data.token_windows(source.tokenizer,
                                       calib_data.read_texts(common.calib_subset(data, args.calib_chars)),
                                       args.calib_samples, args.calib_seqlen, 0)
    stats = calibrate.collect_stats(model, windows, source.arch, "cpu", 8)
    moments = output_moments(model, source.arch, windows)
    g, d_h = cfg.num_key_value_heads, pipeline.head_dim(cfg)
    inv_freq = model.model.rotary_emb.inv_freq.detach().float().cpu()
    rows = []
    for ratio in ratios:
        opts = pipeline.Options(kv_ratio=ratio, ranks="uniform")
        budget, d_r = pipeline.cache_shape(opts, cfg)
        per_layer = budget // cfg.num_hidden_layers
        r = per_layer - d_r
        _, maps = pipeline._rope_maps(stats, opts, inv_freq, d_r, g, d_h)
        totals = {"energy": 0.0, "k_energy": 0.0, "separate_default": 0.0, "separate_best": 0.0, "joint": 0.0}
        for l, m in enumerate(moments):
            q_n = maps[l].q_n.double()
            n_k, n_v = q_n.shape[0], g * d_h
            lift = torch.block_diag(q_n, torch.eye(n_v, dtype=torch.float64))   # [K_nope; V] from [K; V]
            joint = lift @ m @ lift.T
            ek, ev, ej = (torch.linalg.eigvalsh(c).flip(0).clamp(min=0)
                          for c in (joint[:n_k, :n_k], joint[n_k:, n_k:], joint))
            r_k = round(r * n_k / (n_k + n_v))
            totals["energy"] += ej.sum().item()
            totals["k_energy"] += ek.sum().item()
            totals["separate_default"] += left_out(ek, r_k) + left_out(ev, r - r_k)
            totals["separate_best"] += min(left_out(ek, a) + left_out(ev, r - a) for a in range(0, min(r, n_k) + 1))
            totals["joint"] += left_out(ej, r)
        row = {"model": name, "kv_ratio": ratio, "latent_rank": r, "rope_dim": d_r, "k_nope_width": n_k,
               "k_energy_share": totals.pop("k_energy") / totals["energy"],
               **{k: v / totals["energy"] for k, v in totals.items() if k != "energy"}}
        print(row, flush=True)
        rows.append(row)
    return rows


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = [*common.report_head(res, "Joint vs separate K/V latents: key/value output energy left out"),
             f"- calibration (train split): {s['calib_samples']} x {s['calib_seqlen']} tokens, seed 0; uniform ranks; "
             f"K_nope = the key rows care-convert's rope map leaves position-free", "",
             "Share of the layers' summed K_nope + V output energy that the latents leave out (`--objective kv`'s "
             "error; lower is better). Separate: care-convert's latents at its default split, and at the best "
             "split of each layer. Joint: one latent of the same rank for both.", "",
             common.md_table(["model", "KV ratio", "latent rank (+ rope)", "K_nope share of the energy",
                              "separate, default split", "separate, best split per layer", "joint",
                              "joint / best separate"],
                             [[r["model"], f"{r['kv_ratio']:g}", f"{r['latent_rank']} (+ {r['rope_dim']})",
                               f"{r['k_energy_share']:.2f}",
                               f"{r['separate_default']:.4f}", f"{r['separate_best']:.4f}", f"**{r['joint']:.4f}**",
                               f"{r['joint'] / r['separate_best']:.2f}x"] for r in res["rows"]]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data = common.data_dir(args.data)
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "settings": {"calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                        "calib_chars_per_file": args.calib_chars, "ratios": common.csv_list(args.ratios)},
           "rows": []}
    save = common.report_saver(res, args.out, render_md)
    for name in common.csv_list(args.models):
        res["rows"] += model_rows(name, data, [float(x) for x in common.csv_list(args.ratios)], args)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
