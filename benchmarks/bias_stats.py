"""Qwen2's key biases and the rope map: calibration statistics with the biases against without them.

Why this exists: a Qwen2 key is W_K x + b_K. Its NoPE part's bias leaves the attention exactly (softmax
cancels it), so the K latent is fitted to W_K x alone; but RoPE rotates the whole key, bias included, so the
rope map (which key components keep RoPE: converter/rope_map.py) ranks them by the moments of W_K x + b_K,
and the queries' moments include b_Q (converter/calibrate.py). Real Qwen2/2.5 checkpoints have a few very
large key-bias entries; none are available offline, so this measures tiny random Qwen2 models, plain and
with such an outlier (+-B on one frequency pair of every KV head), converted with the biases in the
statistics (what care-convert does) and without (the ablation: calibrate._with_bias replaced by identity).

Each cell: KL(original || converted) per token on random token windows, full latent ranks (kv 1.0) and
half the key dims with RoPE (so the rope map alone decides), uniform ranks, no o_proj refit.

    .venv/bin/python benchmarks/bias_stats.py                    # outliers 0 and 4, seeds 0-3
    .venv/bin/python benchmarks/bias_stats.py --outliers 0,4,8 --seeds 0,1

Writes benchmarks/results/bias_stats.json and bias_stats.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from converter import calibrate, load, pipeline  # noqa: E402

HEAD_DIM, KV_HEADS = 32, 2


def tiny_qwen2(seed: int, outlier: float):
    """A random Qwen2 (4 layers, hidden 128, 4 query / 2 KV heads of 32, biases ~ 0.5 N(0,1)) with key bias
    +-`outlier` on frequency pair 6 of each KV head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for layer in model.model.layers:
            b = layer.self_attn.k_proj.bias
            for a in range(KV_HEADS):
                b[a * HEAD_DIM + 6], b[a * HEAD_DIM + 6 + HEAD_DIM // 2] = outlier, -outlier
    return model.eval()


def kl_after_conversion(model, windows: torch.Tensor, test: torch.Tensor, bias_in_stats: bool) -> float:
    """Convert `model` (calibrated on `windows`) and return mean KL(original || converted) on `test`."""
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM

    real = calibrate._with_bias
    if not bias_in_stats:
        calibrate._with_bias = lambda moment, *_: moment
    out = Path(tempfile.mkdtemp(prefix="care-bias-")) / "out"
    try:
        source = load.Source(model=model, tokenizer=None, arch="llama", name="tiny-qwen2", src_dir=None)
        opts = pipeline.Options(kv_ratio=1.0, rope_dim=KV_HEADS * HEAD_DIM // 2, ranks="uniform",
                                o_proj_refit=False, calib_samples=windows.shape[0], calib_seqlen=windows.shape[1],
                                dtype="float32")
        pipeline.convert_source(source, windows, out, opts)
        converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
        with torch.no_grad():
            lp = F.log_softmax(model.double()(test).logits, -1)
            lq = F.log_softmax(converted(test).logits, -1)
        model.float()
        return (lp.exp() * (lp - lq)).sum(-1).mean().item()
    finally:
        calibrate._with_bias = real
        shutil.rmtree(out.parent, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outliers", default="0,4", help="comma list of outlier key-bias magnitudes")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bias_stats"))
    args = p.parse_args(argv)
    windows = torch.randint(3, 4096, (16, 128), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 4096, (4, 128), generator=torch.Generator().manual_seed(1))
    rows = []
    for outlier in (float(x) for x in args.outliers.split(",")):
        for seed in (int(x) for x in args.seeds.split(",")):
            row = {"outlier": outlier, "seed": seed}
            for with_bias in (False, True):
                row["kl_with_bias" if with_bias else "kl_without_bias"] = round(
                    kl_after_conversion(tiny_qwen2(seed, outlier), windows, test, with_bias), 4)
            rows.append(row)
            print(row, flush=True)
    lines = ["| key-bias outlier | seed | KL, statistics without biases | KL, with biases (care-convert) |",
             "|---|---|---|---|"]
    lines += [f"| {r['outlier']:g} | {r['seed']} | {r['kl_without_bias']:.4f} | {r['kl_with_bias']:.4f} |" for r in rows]
    for outlier in sorted({r["outlier"] for r in rows}):
        sel = [r for r in rows if r["outlier"] == outlier]
        lines.append(f"| {outlier:g} | mean | {sum(r['kl_without_bias'] for r in sel) / len(sel):.4f} | "
                     f"{sum(r['kl_with_bias'] for r in sel) / len(sel):.4f} |")
    table = "\n".join(lines)
    print(table)
    res = {"command": common.command_line(), "when": common.now_utc(), "machine": common.machine(), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"# Qwen2 key biases in the calibration statistics\n\n`{res['command']}` "
                                      f"({res['when']})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
