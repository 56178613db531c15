"""Conversion speed: seconds per stage of `care-convert` on a random-weight model of real shapes.

    python benchmarks/convert_speed.py --shape llama3-8b --device cuda          # the GPU target (< 3 min)
    python benchmarks/convert_speed.py --shape llama3-8b --layers 2 --calib-samples 16 --calib-seqlen 512  # CPU dry run

The model is built in memory with random weights (N(0, 0.02), norms 1) in fp32, as a checkpoint
loaded from disk would be; calibration uses random token windows (content does not matter for
timing). The pipeline is the one behind `care-convert` (converter.pipeline.convert_source), so
every stage (calibrate, rope_map, factorize, allocate, assemble, refit (the o_proj refit, on by
default), report, write) is timed as a user
would see it; "build" (random init) replaces loading and is reported separately.
Writes benchmarks/results/convert_speed_<tag>.{json,md} (or --out-json).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import shapes  # noqa: E402

from converter import architectures, cli, load, pipeline  # noqa: E402


def random_model(cfg: dict, seed: int, dtype: torch.dtype = torch.float32, draw_on: str = "cpu"):
    """A transformers *ForCausalLM with the source shapes and random weights in `dtype`, built fast
    (meta init, then one randn per tensor) instead of transformers' per-module init. The model lives
    on the CPU, as a loaded checkpoint does; `draw_on="cuda"` draws the numbers on the GPU (an 8B
    model's 8e9 normal draws take about a minute on the CPU, a minute of a short GPU lease).
    The rotary inverse frequencies are fp32 whatever `dtype` is, as loading a checkpoint gives them."""
    from transformers import AutoModelForCausalLM

    hf = shapes.hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
    model.to_empty(device="cpu")
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)           # RMSNorm weights
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=draw_on, dtype=dtype).mul_(0.02))
    with torch.device("cpu"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    if hf.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(shapes.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers (CPU dry runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--ranks", default="adjusted", choices=["uniform", "adjusted"])
    p.add_argument("--objective", default="kv", choices=["kv", "attention"])
    p.add_argument("--k-share", type=cli.auto_or_number, default=None,
                   help="as care-convert's (a fraction, or auto: times its scoring)")
    p.add_argument("--latent", default="separate", choices=["separate", "joint"], help="care-convert --latent")
    p.add_argument("--joint-key-weight", type=cli.auto_or_number, default=None, help="care-convert --joint-key-weight")
    p.add_argument("--no-o-proj-refit", dest="o_proj_refit", action="store_false", help="skip the refit stage")
    p.add_argument("--dtype", default="bfloat16", help="output dtype")
    p.add_argument("--tag", default=None, help="results file suffix (default: shape and device)")
    p.add_argument("--out-json", default=None, help="write the JSON here instead of benchmarks/results/")
    p.add_argument("--keep", default=None, help="keep the converted checkpoint in this folder")
    args = p.parse_args(argv)

    cfg = shapes.source_config(args.shape, args.layers)
    t0 = time.perf_counter()
    model = random_model(cfg, seed=0, draw_on="cuda" if args.device.startswith("cuda") else "cpu")
    build_s = time.perf_counter() - t0
    n_params = sum(t.numel() for t in model.parameters())
    source = load.Source(model=model, tokenizer=None, arch=architectures.SUPPORTED[cfg["architectures"][0]],
                         name=f"random-{args.shape}", src_dir=None)
    windows = torch.randint(3, cfg["vocab_size"], (args.calib_samples, args.calib_seqlen),
                            generator=torch.Generator().manual_seed(0))
    opts = pipeline.Options(kv_ratio=args.kv_ratio, ranks=args.ranks, objective=args.objective, k_share=args.k_share,
                            latent=args.latent, joint_key_weight=args.joint_key_weight,
                            o_proj_refit=args.o_proj_refit, device=args.device, dtype=args.dtype,
                            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                            calib_batch=args.calib_batch, calib_dtype=args.calib_dtype, overwrite=True)
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="care-speed-")) / "out"
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    report = pipeline.convert_source(source, windows, out, opts)
    wall = time.perf_counter() - t1
    if not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)

    seconds = {k: v for k, v in report["seconds"].items() if k != "total"}
    res = {
        "command": common.command_line(), "when": common.now_utc(), "machine": common.machine(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "shape": args.shape, "layers": cfg["num_hidden_layers"], "params": n_params,
        "calibration_tokens": args.calib_samples * args.calib_seqlen, "calib_dtype": args.calib_dtype,
        "kv_ratio": report["kv_ratio"], "ranks": args.ranks, "objective": args.objective, "k_share": args.k_share,
        "o_proj_refit": args.o_proj_refit, "k_share_auto": report.get("k_share_auto"), "output_dtype": args.dtype,
        **({"latent": "joint", "joint_key_weight": args.joint_key_weight,
            "joint_key_weight_auto": report.get("joint_key_weight_auto")} if args.latent == "joint" else {}),
        "cache_values_per_token": report["cache_values_per_token"],
        "build_random_model_s": round(build_s, 2), "seconds": seconds, "convert_total_s": round(wall, 2),
        "peak_gpu_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                             if args.device.startswith("cuda") else None),
    }
    rows = [[k, f"{v:.2f}"] for k, v in seconds.items()] + [["total (convert_source)", f"{wall:.2f}"]]
    md = (f"# care-convert speed: {args.shape} ({cfg['num_hidden_layers']} layers, {n_params / 1e9:.2f} B params, "
          f"random weights) on {res['device_name']}\n\n"
          f"calibration {args.calib_samples} x {args.calib_seqlen} tokens ({args.calib_dtype}), KV ratio "
          f"{report['kv_ratio']:.3f} {args.ranks}, objective {args.objective}, "
          + (f"joint K/V latent (key weight {args.joint_key_weight or 'default'}), " if args.latent == "joint"
             else f"K share {args.k_share or 'default'}, ") +
          f"o_proj refit {'on' if args.o_proj_refit else 'off'}, output {args.dtype}; random init {build_s:.1f} s "
          f"(not counted)\n\n"
          + common.md_table(["stage", "seconds"], rows) + f"\n\nCommand: `{res['command']}`\n")
    print(md)
    tag = args.tag or f"{args.shape}_{'gpu' if args.device.startswith('cuda') else 'cpu'}"
    dest = Path(args.out_json) if args.out_json else common.RESULTS / f"convert_speed_{tag}.json"
    common.write_json(dest, res)
    dest.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
