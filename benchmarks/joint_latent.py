"""Would one latent shared by K and V (DeepSeek's MLA, TransMLA) keep more than CARE's separate K and V latents
at the same cache? Measured without a conversion: the key/value output energy each leaves out, and perplexity.

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

Perplexity (oneshot.py's test texts and windows): the latents' effect without building a checkpoint. The best
`--objective kv` latent of rank r reproduces its outputs projected onto the top r eigenvectors of their second
moment, so the original model with each layer's [K_nope; V] replaced by that projection (forward hooks; the rope
rows of the key kept exact) is the converted model with `--objective kv`, uniform ranks and no o_proj refit, up to
the converter's damping. The separate-default column checks that against care-convert's own conversion
(benchmarks/results/kshare.md, "uniform | k-share default"). A joint latent is not implemented in care-convert
(format, model_defs, the plugin's split decode and the attention objective would change), nor is its decode cost
measured (its scores and values both run over all r dims).

    .venv/bin/python benchmarks/joint_latent.py     # the three models, KV 0.5 and 0.25, ~2.5 min

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

import oneshot  # noqa: E402

from converter import attention_weights, calib_data, calibrate, factorize, joint_latent, load, pipeline  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2-135m,qwen3-small,llama3-small")
    p.add_argument("--ratios", default="0.5,0.25")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512000)
    p.add_argument("--attention-key-weights", default=None, metavar="W,...",
                   help="also the attention objective (care-convert --objective attention's weightings): separate "
                        "latents at the default split, and a joint latent fitted to W x (key logit error / its total) "
                        "+ (value output error / its total) for each W")
    p.add_argument("--eval-tokens", default="smollm2-135m=2048,4096", help="as oneshot.py")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=str(common.RESULTS / "joint_latent"))
    return p


def key_module(attn, arch: str):
    """The module whose output is the key the latent is fitted to: Qwen3's k_norm (per head), else k_proj."""
    return attn.k_norm if arch == "qwen3" else attn.k_proj


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
        handles += [key_module(a, arch).register_forward_hook(hook(l, "k")), a.v_proj.register_forward_hook(hook(l, "v"))]
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


def top(moment: torch.Tensor, r: int) -> torch.Tensor:
    """The projection onto the top r eigenvectors of a second moment."""
    _, vecs = torch.linalg.eigh(moment)
    u = vecs[:, vecs.shape[1] - r:]
    return u @ u.T


def weighted_top(moment: torch.Tensor, weight: torch.Tensor, r: int) -> torch.Tensor:
    """What the best rank-r latent under output weighting M reproduces, y -> M^-1/2 U U^T M^1/2 y (U: the top r
    eigenvectors of M^1/2 C M^1/2; M damped as care-convert damps it), as the matrix that multiplies row vectors."""
    root, inv_root = factorize._sqrt_and_inverse(weight, factorize.DAMPING)
    _, vecs = torch.linalg.eigh(root @ moment @ root)
    u = vecs[:, vecs.shape[1] - r:]
    return (inv_root @ u @ u.T @ root).T


class Converted:
    """The original model computing as a conversion with these latents does (`--objective kv`, no o_proj refit),
    while in a `with` block: forward hooks replace each layer's [K_nope; V] (`lifts[l]` [k; v], K_nope = Q_N k) by
    its projection `projections[l]` (what the best latent of that rank reproduces), and the rope function scores
    the key's two parts as the converted attention does: the rope rows (Q_S k) rotated with the query, the
    position-free rows (Q_N^T K_nope) against the unrotated query (RoRoPE drops their rotation). Keys and
    queries are widened to [rotated | unrotated] halves; the softmax scale stays the original's."""

    def __init__(self, model, arch: str, lifts: list[torch.Tensor], q_s: list[torch.Tensor],
                 projections: list[torch.Tensor]):
        self.model, self.arch, self.lifts, self.q_s, self.projections = model, arch, lifts, q_s, projections
        self.modeling = sys.modules[type(model).__module__]
        self.head_dim = pipeline.head_dim(model.config)
        self.keys: dict[int, torch.Tensor] = {}
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        self.rope = self.modeling.apply_rotary_pos_emb
        self.modeling.apply_rotary_pos_emb = self.score_parts
        self.handles = []
        for l, layer in enumerate(self.model.model.layers):
            a = layer.self_attn
            self.handles += [key_module(a, self.arch).register_forward_hook(self.on_key(l)),
                             a.v_proj.register_forward_hook(self.on_value(l))]
        return self

    def __exit__(self, *exc):
        self.modeling.apply_rotary_pos_emb = self.rope
        for h in self.handles:
            h.remove()

    def on_key(self, l: int):
        def record(_module, _inputs, out):
            self.keys[l] = out
        return record

    def on_value(self, l: int):
        def replace(_module, _inputs, out):
            lift, p, q_s = self.lifts[l], self.projections[l], self.q_s[l]
            n_v = out.shape[-1]
            n_k, kv_width = lift.shape[0] - n_v, lift.shape[1] - n_v
            batch, tokens = out.shape[:2]
            k = self.keys.pop(l).reshape(-1, kv_width).double()
            y = torch.cat([k, out.reshape(-1, n_v).double()], 1) @ lift.T @ p   # [K_nope; V], projected
            heads = kv_width // self.head_dim

            def per_head(flat):   # [tokens, g*d_h] -> the attention's key layout [batch, g, tokens, d_h]
                return flat.reshape(batch, tokens, heads, -1).transpose(1, 2).to(out.dtype)
            self.pending.append((per_head(k @ q_s.T @ q_s), per_head(y[:, :n_k] @ lift[:n_k, :kv_width])))
            return y[:, n_k:].reshape(out.shape).to(out.dtype)
        return replace

    def score_parts(self, q, _k, cos, sin, unsqueeze_dim=1):
        k_rope, k_nope = self.pending.pop(0)
        q_embed, k_embed = self.rope(q, k_rope, cos, sin, unsqueeze_dim)
        return torch.cat([q_embed, q], -1), torch.cat([k_embed, k_nope], -1)


def model_rows(name: str, data: Path, ratios: list[float], args) -> list[dict]:
    ppl_fn, _ = common.perplexity_fn()
    eval_tokens = oneshot.parse_eval_tokens(args.eval_tokens)
    n_tok = eval_tokens.get(name, eval_tokens.get("*", 8192))
    per_file = n_tok // len(common.DOMAINS)
    source = load.load_source(common.model_path(name, data))
    model, cfg = source.model.float().eval(), source.config
    windows = calib_data.token_windows(source.tokenizer,
                                       calib_data.read_texts(common.calib_subset(data, args.calib_chars)),
                                       args.calib_samples, args.calib_seqlen, 0)
    stats = calibrate.collect_stats(model, windows, source.arch, "cpu", 8)
    moments = output_moments(model, source.arch, windows)
    g, d_h = cfg.num_key_value_heads, pipeline.head_dim(cfg)
    inv_freq = model.model.rotary_emb.inv_freq.detach().float().cpu()
    texts = common.eval_texts(data, source.tokenizer, per_file)

    def ppl(lifts=None, q_s=None, projections=None) -> float:
        if lifts is None:
            return oneshot.evaluate(model, source.tokenizer, texts, per_file, args, ppl_fn)["ppl"]
        with Converted(model, source.arch, lifts, q_s, projections):
            return oneshot.evaluate(model, source.tokenizer, texts, per_file, args, ppl_fn)["ppl"]

    original = ppl()
    rows = []
    for ratio in ratios:
        opts = pipeline.Options(kv_ratio=ratio, ranks="uniform")
        budget, d_r = pipeline.cache_shape(opts, cfg)
        per_layer = budget // cfg.num_hidden_layers
        r = per_layer - d_r
        _, maps = pipeline._rope_maps(stats, opts, inv_freq, d_r, g, d_h)
        totals = {"energy": 0.0, "k_energy": 0.0, "separate_default": 0.0, "separate_best": 0.0, "joint": 0.0}
        key_weights = [float(w) for w in common.csv_list(args.attention_key_weights or "")]
        lifts, q_s, proj = [], [], {"separate_default": [], "separate_best": [], "joint": []}
        if key_weights:
            proj.update({"attention_separate_default": [], **{f"attention_joint_k{w:g}": [] for w in key_weights}})
        for l, m in enumerate(moments):
            q_n = maps[l].q_n.double()
            n_k, n_v = q_n.shape[0], g * d_h
            lift = torch.block_diag(q_n, torch.eye(n_v, dtype=torch.float64))   # [K_nope; V] from [K; V]
            joint = lift @ m @ lift.T
            ek, ev, ej = (torch.linalg.eigvalsh(c).flip(0).clamp(min=0)
                          for c in (joint[:n_k, :n_k], joint[n_k:, n_k:], joint))
            r_k = round(r * n_k / (n_k + n_v))
            lifts.append(lift)
            q_s.append(maps[l].q_s.double())
            proj["separate_default"].append(torch.block_diag(top(joint[:n_k, :n_k], r_k), top(joint[n_k:, n_k:], r - r_k)))
            proj["joint"].append(top(joint, r))
            totals["energy"] += ej.sum().item()
            totals["k_energy"] += ek.sum().item()
            totals["separate_default"] += left_out(ek, r_k) + left_out(ev, r - r_k)
            best_k = min(range(0, min(r, n_k) + 1), key=lambda a: left_out(ek, a) + left_out(ev, r - a))
            totals["separate_best"] += left_out(ek, best_k) + left_out(ev, r - best_k)
            proj["separate_best"].append(torch.block_diag(top(joint[:n_k, :n_k], best_k),
                                                          top(joint[n_k:, n_k:], r - best_k)))
            totals["joint"] += left_out(ej, r)
            if key_weights:   # care-convert --objective attention's M_K (query side) and M_V (o_proj side)
                ck, cv = joint[:n_k, :n_k], joint[n_k:, n_k:]
                mk = attention_weights.key_weight(stats.layers[l].qc.double(), q_n, g)
                mv = attention_weights.value_weight(model.model.layers[l].self_attn.o_proj.weight.detach().double(),
                                                    cfg.num_attention_heads, g)
                proj["attention_separate_default"].append(
                    torch.block_diag(weighted_top(ck, mk, r_k), weighted_top(cv, mv, r - r_k)))
                for w in key_weights:   # (care-convert --latent joint --joint-key-weight w's weighting)
                    proj[f"attention_joint_k{w:g}"].append(
                        weighted_top(joint, joint_latent.weighting(joint, mk, mv, w), r))
        row = {"model": name, "kv_ratio": ratio, "latent_rank": r, "rope_dim": d_r, "k_nope_width": n_k,
               "k_energy_share": totals.pop("k_energy") / totals["energy"],
               **{k: v / totals["energy"] for k, v in totals.items() if k != "energy"},
               "ppl_original": original, **{f"ppl_{k}": ppl(lifts, q_s, p) for k, p in proj.items()}}
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
                               f"{r['joint'] / r['separate_best']:.2f}x"] for r in res["rows"]]), "",
             "Perplexity on the test split (oneshot.py's texts and windows) of the original computing as the conversion "
             "does (`--objective kv`, uniform ranks, no o_proj refit; care-convert's own conversion at the default "
             "split: `benchmarks/results/oneshot.md`, care uniform rows, within the damping's 0.3 %):", "",
             common.md_table(["model (original ppl)", "KV ratio", "separate latents, default split",
                              "separate, best split per layer (by energy)", "joint latent", "joint vs default split"],
                             [[f"{r['model']} ({r['ppl_original']:.2f})", f"{r['kv_ratio']:g}",
                               f"{r['ppl_separate_default']:.2f}", f"{r['ppl_separate_best']:.2f}",
                               f"**{r['ppl_joint']:.2f}**",
                               f"{100 * (r['ppl_joint'] / r['ppl_separate_default'] - 1):+.1f} %"]
                              for r in res["rows"]]), ""]
    attention = [k for k in res["rows"][0] if k.startswith("ppl_attention_")] if res["rows"] else []
    if attention:
        lines += ["With `--objective attention`'s weightings (no refit): the separate latents at the default split "
                  "(care-convert's own: `kshare_attention_norefit.md`, default column), and joint latents fitted to "
                  "W x (key logit error / its total) + (value output error / its total):", "",
                  common.md_table(["model (original ppl)", "KV ratio",
                                   *(k.removeprefix("ppl_attention_").replace("_", " ").replace("joint k", "joint, W = ")
                                     for k in attention)],
                                  [[f"{r['model']} ({r['ppl_original']:.2f})", f"{r['kv_ratio']:g}",
                                    *(f"{r[k]:.2f}" for k in attention)] for r in res["rows"]]), ""]
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
