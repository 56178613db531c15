"""Host memory and disk of `care-convert` on a checkpoint of real shapes, per output `--dtype`.

    python benchmarks/convert_memory.py                                  # Llama-3.1-8B shapes, auto and float32
    python benchmarks/convert_memory.py --layers 8 --dtypes auto,float32  # quicker, same per-layer picture

What a user converting a real 8B model meets first is RAM and disk, not seconds: the source is a
bf16 checkpoint, and what the converter keeps in memory and writes depends on the output dtype.
This writes a random-weight bf16 source folder of the shape (write_source: tensor by tensor, in the
layout transformers' save_pretrained writes, tokenizer of ../shared/models/llama3-small), then runs the real CLI
(`python -m converter.cli`, i.e. `care-convert`: load from disk, calibrate, factorize, write) once per
--dtypes entry in a fresh process, and records that process's peak resident memory: in total
(ru_maxrss) and its anonymous part (RssAnon, sampled every 50 ms). The difference is mostly the
memory-mapped source's pages: clean file pages the kernel can drop and re-read under memory pressure,
so the anonymous peak is what must fit in RAM. Also recorded: the checkpoint's size on disk, the exit
code and care_report.json's seconds per stage. A run the kernel kills for memory is recorded as such
(exit -9), not retried.
Writes benchmarks/results/convert_memory_<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "gpu"))
import common  # noqa: E402
import shapes  # noqa: E402
from correctness import calibration_text  # noqa: E402  (seeded pseudo-text, the same on every machine)


def run_measured(cmd: list[str]) -> tuple[int, float, float]:
    """Run cmd; (exit code, peak RSS GiB from wait4's ru_maxrss, peak RssAnon GiB sampled every 50 ms)."""
    proc = subprocess.Popen(cmd, cwd=common.REPO)
    peak_anon_kib = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            text = Path(f"/proc/{proc.pid}/status").read_text()
            peak_anon_kib = max(peak_anon_kib, int(re.search(r"RssAnon:\s+(\d+)", text).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 2**20, peak_anon_kib / 2**20


def write_source(cfg: dict, folder: Path, tokenizer_dir: Path, shard_bytes: int = 5 * 10**9) -> int:
    """Random bf16 source checkpoint (as real Llama/Qwen3 checkpoints are stored); returns #params.

    Written tensor by tensor into <= 5 GB shards, never as a whole model in RAM (a 24-layer
    Qwen3-30B-A3B is 30 GB): shapes from the architecture built on the meta device, RMSNorm weights 1,
    the rest N(0, 0.02) (convert_speed.random_model's init), MoE experts under the Hub's per-expert names
    (mlp.experts.{e}.gate_proj/up_proj/down_proj.weight, what transformers' save_pretrained writes too)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from converter.experts import PARTS, is_expert_key

    hf = shapes.hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    names = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if hf.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[str] = []
    n_params = shard_size = 0

    def flush():
        if shard:
            files.append(f"part-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(folder / files[-1]), metadata={"format": "pt"})
            weight_map.update({k: files[-1] for k in shard})
            shard.clear()

    for name, shape in names.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        n_params += t.numel()
        prefix, leaf = name.rsplit(".", 1)
        if is_expert_key(name):   # fused [E, rows, cols] -> each expert's parts, one under the other
            parts = PARTS[leaf]
            rows = shape[1] // len(parts)
            pieces = {f"{prefix}.{e}.{part}.weight": t[e, i * rows:(i + 1) * rows].clone()
                      for e in range(shape[0]) for i, part in enumerate(parts)}
        else:
            pieces = {name: t}
        del t
        size = sum(x.numel() * 2 for x in pieces.values())
        if shard_size + size > shard_bytes:
            flush()
            shard_size = 0
        shard.update(pieces)
        shard_size += size
    flush()
    final = {}
    for i, f in enumerate(files):   # transformers' shard names
        final[f] = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / f).rename(folder / final[f])
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": {k: final[f] for k, f in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf.dtype = torch.bfloat16
    hf.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, folder / f)
    return n_params


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def convert_once(src: Path, out: Path, calib: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "converter.cli", str(src), str(out), "--calib", str(calib),
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
           "--kv-ratio", str(args.kv_ratio), "--ranks", args.ranks, "--dtype", dtype,
           "--calib-dtype", args.calib_dtype, "--overwrite"]
    t0 = time.perf_counter()
    rc, peak_rss, peak_anon = run_measured(cmd)  # rc -9: killed (e.g. by the OOM killer)
    wall = time.perf_counter() - t0
    row = {"dtype": dtype, "exit": rc, "peak_rss_gib": round(peak_rss, 2), "peak_anon_gib": round(peak_anon, 2),
           "wall_s": round(wall, 1), "command": " ".join(cmd)}
    if rc == 0:
        report = json.loads((out / "care_report.json").read_text())
        config = json.loads((out / "config.json").read_text())
        row.update(checkpoint_gb=round(folder_bytes(out) / 1e9, 2), written_dtype=config["dtype"],
                   seconds=report["seconds"], cache_values_per_token=report["cache_values_per_token"])
    shutil.rmtree(out, ignore_errors=True)
    return row


def render_md(res: dict) -> str:
    s = res["settings"]
    lines = [*common.report_head(res, f"care-convert host memory and disk: {s['shape']} shapes, "
                                      f"{s['layers']} layers, bf16 source"),
             f"- source: random weights, {s['params'] / 1e9:.2f} B params, bf16 safetensors "
             f"({s['source_gb']:.2f} GB on disk; MoE experts stored per expert, as on the Hub)",
             f"- every conversion: the real CLI in a fresh process, calibration {s['calib_samples']} x "
             f"{s['calib_seqlen']} tokens (layers run in {s.get('calib_dtype', 'float32')}), KV ratio "
             f"{s['kv_ratio']} {s['ranks']}, --device cpu",
             "- peak RSS: the conversion process's ru_maxrss, which includes the memory-mapped source pages it "
             "touched; anonymous: its peak RssAnon (sampled every 50 ms), the part that must fit in RAM",
             ""]
    header = ["--dtype", "written as", "exit", "peak RSS (GiB)", "peak anonymous (GiB)", "checkpoint (GB)", "wall (s)",
              "seconds per stage"]
    rows = []
    for r in res["rows"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("seconds", {}).items() if k != "total")
        rows.append([r["dtype"], r.get("written_dtype", "—"), r["exit"], f"{r['peak_rss_gib']:.2f}",
                     f"{r['peak_anon_gib']:.2f}",
                     f"{r['checkpoint_gb']:.2f}" if "checkpoint_gb" in r else "—", f"{r['wall_s']:.0f}",
                     stages or "—"])
    lines += [common.md_table(header, rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(shapes.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has")
    p.add_argument("--dtypes", default="auto,float32", help="care-convert --dtype values, one conversion each")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--calib-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="care-convert --calib-dtype (bfloat16: no fp32 working copy of a bf16 layer)")
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--ranks", default="uniform", choices=["uniform", "adjusted"])
    p.add_argument("--work", default=None, help="source + outputs (default DATA/bench/convert_memory)")
    p.add_argument("--tag", default=None, help="results file suffix (default: shape and layers)")
    args = p.parse_args(argv)

    tokenizer_dir = common.shared_dir() / "models" / "llama3-small"
    if not tokenizer_dir.is_dir():
        raise SystemExit(f"needs the tokenizer in {tokenizer_dir}")
    cfg = shapes.source_config(args.shape, args.layers)
    work = Path(args.work) if args.work else common.data_dir() / "bench" / "convert_memory"
    src = work / f"{args.shape}-{cfg['num_hidden_layers']}l-bf16"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    calib = calibration_text(work / "calib.txt")
    tag = args.tag or f"{args.shape}-{cfg['num_hidden_layers']}layers"
    stem = common.RESULTS / f"convert_memory_{tag}"
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "settings": {"shape": args.shape, "layers": cfg["num_hidden_layers"], "calib_samples": args.calib_samples,
                        "calib_seqlen": args.calib_seqlen, "calib_dtype": args.calib_dtype,
                        "kv_ratio": args.kv_ratio, "ranks": args.ranks},
           "rows": []}
    save = common.report_saver(res, stem, render_md)
    try:
        print(f"[convert_memory] writing the bf16 source to {src}", flush=True)
        res["settings"]["params"] = write_source(cfg, src, tokenizer_dir)
        res["settings"]["source_gb"] = round(folder_bytes(src) / 1e9, 2)
        for dtype in common.csv_list(args.dtypes):
            print(f"[convert_memory] care-convert --dtype {dtype}", flush=True)
            res["rows"].append(convert_once(src, work / f"out-{dtype}", calib, dtype, args))
            save()
    finally:
        shutil.rmtree(src, ignore_errors=True)
    save()
    print(Path(f"{stem}.md").read_text())
    return 0 if all(r["exit"] == 0 for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
