"""Time the plugin's CPU latent decode (`paged_latent_decode`) alone, against its code at another revision.

Why: end-to-end CPU serving runs on this shared 2-core machine vary by ~10 % between runs, more than a
change to one attention kernel moves the whole decode step, so kernel changes are measured here, in
isolation and interleaved with the baseline (same process, same random cache, best of 5 timing rounds).
Each kernel is timed as the plugin at that revision runs it per layer (see `as_served`).
Shapes default to SmolLM2-135M at KV 0.5 as the quickstart converts it (9 query heads, latent 128 =
c_K 51 + c_V 77, rope key 64, block size 16); each (batch, context) runs the joint decode (a healed
layer whose kv_b_proj blocks were trained) and the key/value split (as converted).

    python benchmarks/cpu_decode_kernel.py --baseline c493417
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)

import torch

from care_vllm.backends import cpu as current


def load_at_revision(rev: str, module: str = "care_vllm.backends.cpu"):
    """`module` (a care_vllm module) as of git `rev`, imported standalone: its relative imports are
    made absolute, so it uses the working tree's versions of the other modules."""
    package, _, name = module.rpartition(".")
    src = subprocess.run(["git", "show", f"{rev}:{module.replace('.', '/')}.py"], cwd=common.REPO,
                         capture_output=True, text=True, check=True).stdout
    src = re.sub(r"^(\s*)from \.", rf"\1from {package}.", src, flags=re.M)
    path = Path(tempfile.mkdtemp()) / f"{name}_at_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod          # dataclasses look their module up there while it executes
    spec.loader.exec_module(mod)
    return mod


def as_served(mod):
    """A maker of one layer's decode call as the plugin at `mod` runs it inside vLLM: since the plan
    (blocks to gather, mask) is built once per step for all layers, it is built outside the timed
    call, and the query comes as vLLM's (ql_nope, q_pe) pair. Older revisions without a plan built
    everything per layer (`paged_latent_decode`, concatenated query)."""
    def make(q, cache, block_table, seq_lens, scale, r, k_rank):
        if not hasattr(mod, "plan_latent_decode"):
            return lambda: mod.paged_latent_decode(q, cache, block_table, seq_lens, scale, r, k_rank)
        plan = mod.plan_latent_decode(block_table, seq_lens, cache.shape[1])
        nope = r if k_rank is None else k_rank
        pair = (q[..., :nope], q[..., nope:])
        return lambda: mod.latent_decode(pair, cache, plan, scale, r, k_rank)
    return make


def case_contexts(case: str) -> list[int]:
    """"4x576" -> [576] * 4; "2048/128/128" -> [2048, 128, 128] (each request's context)."""
    if "x" in case:
        batch, context = (int(x) for x in case.split("x"))
        return [context] * batch
    return [int(c) for c in case.split("/")]


def best_ms(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(10):
        fn()
    per_round = max(1, calls // rounds)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        times.append((time.perf_counter() - t) / per_round * 1e3)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, metavar="REV", help="git revision to compare with")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--k-rank", type=int, default=51)
    ap.add_argument("--v-rank", type=int, default=77)
    ap.add_argument("--rope-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cases", default="1x300,4x576,8x576,16x576,4x1536",
                    help="BATCHxCONTEXT or per-request contexts C1/C2/..., comma-separated "
                         "(e.g. 2048/128/128/128: one long context beside three short ones)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; vLLM's CPU worker on this 2-core machine runs one)")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_decode_kernel"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernels = {"current": as_served(current)}
    if args.baseline:
        kernels = {args.baseline: as_served(load_at_revision(args.baseline)), **kernels}
    r, d_r, bs = args.k_rank + args.v_rank, args.rope_dim, args.block_size
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "shape": {"heads": args.heads, "k_rank": args.k_rank, "v_rank": args.v_rank, "rope_dim": d_r,
                     "block_size": bs, "dtype": "float32"}, "rows": []}

    def render(res):
        names = list(kernels)
        header = ["batch", "context", "path", *[f"{n} (ms)" for n in names]]
        if len(names) == 2:
            header.append("speed-up")
        rows = []
        for row in res["rows"]:
            ms = [row["ms"][n] for n in names]
            rows.append([row["batch"], row["context"], row["path"], *[f"{m:.3f}" for m in ms]]
                        + ([f"{ms[0] / ms[1]:.2f}x"] if len(ms) == 2 else []))
        return "\n".join([*common.report_head(res, "CPU latent decode kernel (paged_latent_decode), one layer"),
                          f"- shape: {res['shape']}", "", common.md_table(header, rows), ""])

    save = common.report_saver(res, args.out, render)
    for case in common.csv_list(args.cases):
        contexts = case_contexts(case)
        batch = len(contexts)
        context = str(contexts[0]) if len(set(contexts)) == 1 else "/".join(str(c) for c in contexts)
        nb = -(-max(contexts) // bs)
        cache = torch.randn(batch * nb + 8, bs, r + d_r)
        block_table = torch.randperm(batch * nb + 8)[: batch * nb].view(batch, nb).to(torch.int32)
        seq_lens = torch.tensor(contexts, dtype=torch.int32) - torch.randint(0, bs, (batch,), dtype=torch.int32)
        for path, k_rank in (("joint", None), ("key/value split", args.k_rank)):
            q = torch.randn(batch, args.heads, (r if k_rank is None else k_rank) + d_r)
            outs, ms = {}, {}
            for name, make in kernels.items():
                fn = make(q, cache, block_table, seq_lens, 0.125, r, k_rank)
                outs[name] = fn()[..., -(r if k_rank is None else args.v_rank):]   # split: c_V part
                ms[name] = round(best_ms(fn, args.calls), 4)
            ref = next(iter(outs.values()))
            diff = max(float((o - ref).abs().max()) for o in outs.values())
            res["rows"].append({"batch": batch, "context": context, "path": path, "ms": ms, "max_abs_diff": diff})
            print(res["rows"][-1], flush=True)
            save()
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
