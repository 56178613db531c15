"""Offline generation speed on CPU (vLLM's `LLM`, engine in-process): the original vs converted checkpoints,
and the plugin's CPU backend against its code at another revision.

Why: `serve_cpu.py` measures through `vllm serve` + `vllm bench serve`, where the API server shares the
2 cores with the engine and runs of the same variant differ by ~10 % on this shared machine. Here the
engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), fixed token-id prompts, greedy with
ignore_eos, each variant in its own subprocess, best of `--repeats` timed generate() calls after a
warm-up call. Prefill: a generate with one output token after emptying the prefix cache
(`LLM.reset_prefix_cache`). Decode: (output tokens - batch) / (full generate time - one-token generate
time), both with the prompts in the prefix cache, so that the difference is the decode steps and not two
prefills' noise (with the cache off the 4-8 s prefill-bearing timings spread by ~0.3 s, and the decode rates
derived from them by +-10 %: a run at f1e7895 put the converted model's decode at 0.67x with the cache off
and 0.83x with it on). Before 42d7f11 the prefill column, too, ran with the prompts cached (0.4-0.5 s:
cache hits); the decode rates of those runs stand.

`NAME=PATH` variants; `NAME=PATH@REV` loads the plugin's CPU backends and model classes
(care_vllm/backends/cpu.py, cpu_prefill.py where REV has it, care_vllm/models.py) as of git REV instead of the working tree's (the
plugin imports both lazily, so modules put into sys.modules first win). `--rounds K` runs the variants
K times, interleaved, and keeps each variant's best round: the machine's load drifts over minutes.

    python benchmarks/cpu_generate.py original=data/smollm2-135m kv0.5=out/smollm2-care-kv0.5 \\
        kv0.5-c493417=out/smollm2-care-kv0.5@c493417
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common


def module_at_revision(rev: str, module: str) -> bool:
    """Whether `module` exists at git `rev` (cpu_prefill.py came after the first measured revisions)."""
    path = module.replace(".", "/") + ".py"
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=common.REPO).returncode == 0


def run_variant(path: str, rev: str | None, args) -> dict:
    """Runs in a fresh interpreter (see main): load, warm up, time prefill and full generates."""
    import os
    import random

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if rev:
        from cpu_decode_kernel import load_at_revision

        for module in ("care_vllm.backends.cpu", "care_vllm.backends.cpu_prefill", "care_vllm.models"):
            if module_at_revision(rev, module):           # models last: it imports the other two
                sys.modules[module] = load_at_revision(rev, module)
    from vllm import LLM, SamplingParams

    lens = prompt_lengths(args)
    llm = LLM(path, dtype="float32", enforce_eager=not args.compiled, kv_cache_memory_bytes=args.kv_cache_mib << 20,
              max_model_len=max(lens) + args.output_len + 16, seed=0, enable_prefix_caching=True)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(n)]} for n in lens]

    def timed(max_tokens: int) -> float:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return dt

    def uncached(max_tokens: int) -> float:
        assert llm.reset_prefix_cache(), "vLLM did not empty the prefix cache"
        return timed(max_tokens)

    timed(args.output_len)                                   # warm-up (and the prompts into the prefix cache)
    first = min(timed(1) for _ in range(args.repeats))       # prompts cached: the first token's step only
    full = min(timed(args.output_len) for _ in range(args.repeats))
    prefill = min(uncached(1) for _ in range(args.repeats))
    decode_tokens = len(lens) * (args.output_len - 1)
    return {"prefill_s": round(prefill, 3), "cached_first_s": round(first, 3), "generate_s": round(full, 3),
            "decode_tok_s": round(decode_tokens / (full - first), 2)}


def prompt_lengths(args) -> list[int]:
    return [int(x) for x in common.csv_list(args.input_lens)] if args.input_lens else [args.input_len] * args.batch


def render(res: dict) -> str:
    """The markdown report: each variant's fastest prefill and best decode round, and every round's."""
    rows, first = [], None

    def per_round(v, key):
        return [r[key] for r in v.get("rounds", [v])]

    for name, v in res["variants"].items():
        first = first or v
        prefill, prefill0 = min(per_round(v, "prefill_s")), min(per_round(first, "prefill_s"))
        rows.append([name, v["spec"], prefill, f"{prefill / prefill0:.2f}x",
                     " / ".join(f"{x:.2f}" for x in per_round(v, "prefill_s")), v["generate_s"],
                     v["decode_tok_s"], f"{v['decode_tok_s'] / first['decode_tok_s']:.2f}x",
                     " / ".join(f"{x:.1f}" for x in per_round(v, "decode_tok_s"))])
    header = ["variant", "checkpoint[@plugin rev]", "prefill (s)", "vs first", "prefill (s) per round",
              "generate, prompts cached (s)", "decode tok/s", "vs first", "decode tok/s per round"]
    return "\n".join([*common.report_head(res, "Offline generation on CPU (vLLM LLM, in-process)"),
                      f"- workload: {res['workload']}", "", common.md_table(header, rows), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", metavar="NAME=PATH[@REV]")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=576)
    ap.add_argument("--input-lens", default=None, metavar="L1,L2,...",
                    help="one prompt per length instead of --batch prompts of --input-len tokens (requests of "
                         "different context lengths decoding together)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's default torch.compile mode (compiled in the warm-up call) instead of --enforce-eager")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_generate"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:                                          # NAME=PATH[@REV] in this process
        path, _, rev = args._child.partition("=")[2].partition("@")
        print("RESULT " + json.dumps(run_variant(path, rev or None, args)), flush=True)
        return 0

    lens = prompt_lengths(args)
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "workload": {"batch": len(lens), **({"input_lens": lens} if args.input_lens else {"input_len": args.input_len}),
                        "output_len": args.output_len,
                        "repeats": args.repeats, "rounds": args.rounds, "dtype": "float32",
                        "enforce_eager": not args.compiled,
                        "timing": "prefill from an empty prefix cache; decode over cached prompts",
                        "kv_cache_mib": args.kv_cache_mib}, "variants": {}}

    save = common.report_saver(res, args.out, render)
    fwd = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in args.variants]
    runs = [(spec.partition("=")[0], [*fwd, "--_child", spec, spec], None, {"spec": spec.partition("=")[2]})
            for spec in args.variants]

    def best(v, _got):                                                    # the best round
        v.update(max(v["rounds"], key=lambda x: x["decode_tok_s"]))

    if not common.child_rounds(__file__, args.rounds, runs, res, save, best):
        return 1
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
