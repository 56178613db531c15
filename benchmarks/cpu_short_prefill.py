"""Prefill time of short prompts on CPU, fresh and after a cached prefix (vLLM's `LLM`, engine in-process):
the original against converted checkpoints with the plugin's latent prefill at several thresholds.

Why: a request's new tokens over a cached prefix (a chat's next turn, a shared system prompt) go, in
vLLM's MLA prefill, through the "chunked context" path: every cached token of the prefix is gathered and
up-projected by kv_b_proj (n_h x (d_nope + d_v) values per token, at every such step and layer) and
attended to with a log-sum-exp merge. The plugin's CPU backend can instead treat requests with at most
`CARE_VLLM_CPU_LATENT_PREFILL_TOKENS` new tokens as decodes: absorbed attention straight over the cached
latent rows (care_vllm/backends/cpu.py, "Short prefills"). This measures both, and the original GQA model
for reference, on the shapes that decide the default.

Each variant runs in its own interpreter (VLLM_ENABLE_V1_MULTIPROCESSING=0, float32, --enforce-eager
unless --compiled). Per case: `--batch` prompts of N random new token ids (fresh per repeat, so nothing of
them is cached), either alone ("fresh") or after a `--prefix-len`-token prefix the same for all and put
into the prefix cache first ("cached prefix"); the time of one generate() with one output token, best of
`--repeats`; `--rounds` interleaves the variants and keeps each case's best.

    python benchmarks/cpu_short_prefill.py original=data/smollm2-135m kv0.5=out/smollm2-care-kv0.5 \\
        --latent-prefill-tokens 1,128
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import common

ENV = "CARE_VLLM_CPU_LATENT_PREFILL_TOKENS"


def run_variant(path: str, args) -> dict:
    """Runs in a fresh interpreter (see main): load, warm up, time every case."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    new_lens = [int(x) for x in common.csv_list(args.new_tokens)]
    llm = LLM(path, dtype="float32", enforce_eager=not args.compiled, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              max_model_len=args.prefix_len + max(new_lens) + 16, seed=0, enable_prefix_caching=True)
    rng = random.Random(0)
    prefix = [rng.randrange(100, 30000) for _ in range(args.prefix_len)]
    one = SamplingParams(max_tokens=1, temperature=0)

    def timed(head: list[int], n: int) -> float:
        prompts = [{"prompt_token_ids": head + [rng.randrange(100, 30000) for _ in range(n)]}
                   for _ in range(args.batch)]
        t = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        return time.perf_counter() - t

    timed(prefix, max(new_lens))                       # warm-up; the prefix into the cache
    cases = {}
    for n in new_lens:
        for label, head in (("fresh", []), ("cached prefix", prefix)):
            cases[f"{label}/{n}"] = round(min(timed(head, n) for _ in range(args.repeats)) * 1e3, 1)
    return {"ms": cases}


def render(res: dict) -> str:
    variants = res["variants"]
    names = list(variants)
    cases = list(next(iter(variants.values()))["ms"]) if variants else []
    base = names[0] if names else None
    header = ["case (prompts x new tokens)", *[f"{n} (ms)" for n in names], *[f"{n} vs {base}" for n in names[1:]]]
    rows = []
    for case in cases:
        label, n = case.split("/")
        ms = [variants[v]["ms"][case] for v in names]
        rows.append([f"{label}: {res['workload']['batch']} x {n}", *ms, *[f"{m / ms[0]:.2f}x" for m in ms[1:]]])
    specs = [f"- `{n}`: {v['spec']}" + (f", {ENV}={v['threshold']}" if v.get("threshold") else "")
             for n, v in variants.items()]
    return "\n".join([*common.report_head(res, "Short-prompt prefill on CPU (vLLM LLM, in-process)"),
                      f"- workload: {res['workload']}", *specs, "",
                      "Best generate() time with one output token, of all repeats and rounds.", "",
                      common.md_table(header, rows), ""])


def is_care_checkpoint(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "care_mla"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=PATH")
    ap.add_argument("--latent-prefill-tokens", default="1,128",
                    help=f"{ENV} values: each care_mla variant runs once per value (NAME@tT)")
    ap.add_argument("--new-tokens", default="16,64,128,256", help="new tokens per prompt, one case each")
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile mode instead of --enforce-eager")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_short_prefill"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        print("RESULT " + json.dumps(run_variant(args._child, args)), flush=True)
        return 0

    runs = []                                            # (name, path, threshold or None)
    for spec in args.variants:
        name, _, path = spec.partition("=")
        if is_care_checkpoint(path):
            runs += [(f"{name}@t{t}", path, t) for t in common.csv_list(args.latent_prefill_tokens)]
        else:
            runs.append((name, path, None))
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "workload": {"batch": args.batch, "new_tokens": args.new_tokens, "prefix_len": args.prefix_len,
                        "repeats": args.repeats, "rounds": args.rounds, "dtype": "float32",
                        "enforce_eager": not args.compiled, "kv_cache_mib": args.kv_cache_mib}, "variants": {}}
    save = common.report_saver(res, args.out, render)
    fwd = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in args.variants]
    children = [(name, [*fwd, "--_child", path, f"{name}={path}"],
                 {**os.environ, **({ENV: threshold} if threshold else {})}, {"spec": path, "threshold": threshold})
                for name, path, threshold in runs]

    def best(v, got):                                                     # each case's best round
        v["ms"] = {case: min(r["ms"][case] for r in v["rounds"]) for case in got["ms"]}

    if not common.child_rounds(__file__, args.rounds, children, res, save, best):
        return 1
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
