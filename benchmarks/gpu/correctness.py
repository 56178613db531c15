"""GPU correctness of the care_vllm plugin in bf16: vLLM's output against model_defs, per attention path.

    python benchmarks/gpu/correctness.py --work /tmp/corr --out-json $OUT/correctness.json   # on the GPU
    python benchmarks/gpu/correctness.py --small --device cpu --dtype float32 --jobs 2 ...   # CPU dry run

What runs (issue 4, "Correctness in bf16 on GPU"):
  * two random ORIGINAL models with head_dim 128 (Llama-3 with llama3 rope scaling, Qwen3 with
    q_norm/k_norm; tests/tiny_models.py, 8 query / 4 KV heads, so the GQA cache is 1024 values per
    token per layer; initialised so that bf16 rounding is about as harmless as in a real LM, see
    LOGIT_STD), each converted twice by care-convert:
      - `w576`: --kv-width 576 --ranks uniform: every layer caches 512 + 64, vLLM's own MLA backend
        (FLASH_ATTN_MLA / FlashMLA) and its own context-gather kernel;
      - `mixed`: --kv-ratio 0.5 --ranks adjusted: different widths per layer, the plugin's
        TRITON_MLA subclass and the gather fallback (care_vllm/backends/gpu.py);
      - `rope96`: the same with --rope-dim 96: prefill head dims (128, 96, 128), which no vLLM
        prefill backend lists, go through the plugin's FlashAttention prefill with v padded to
        the qk head dim 224 (care_vllm/backends/gpu_prefill.py; `prefill_backend` in the report);
  * every model (the originals too) answers, through the `LLM` API in a subprocess:
      - 6 prompts of 40-300 tokens: greedy 32 tokens with logprobs + prompt logprobs;
      - long: a 9000-token prompt, then a second prompt sharing its first 8192 tokens, with prefix
        caching on and max_num_batched_tokens 2048 (chunked prefill): the second request's
        prefill reads 8192 cached tokens back through the chunked-context gather;
  * the reference is model_defs (converted) / transformers (original) in fp32 on the same device,
    teacher-forced on exactly the tokens vLLM saw and produced.
Reported per model: max/mean |prompt logprob diff|, |generated-token logprob diff|, greedy exact
match, "worst gap" (how far below the reference's best token vLLM's greedy pick scores, over all
steps: 0 when greedy is identical, small for bf16 near-ties), the backend each layer got. The bf16
noise floor is the ORIGINAL model's own vLLM-vs-transformers difference: a converted model passes
when its mean prompt-logprob diff is at most 3x its original's + 0.01 and its worst gap at most 2x
the original's worst gap or largest generated-token logprob error, whichever is larger, + 0.05 (a
greedy flip within the original's own bf16 error is a near-tie, not a fault; the original itself may
have no flip). With the init below, the originals' floors are 0.08-0.11 nats on CPU
(benchmarks/results/correctness_cpu_bf16*.md).
Exit code 1 when a model fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from care_vllm.loadtest.server import CARE_KV_LAYER  # noqa: E402  (the plugin's per-layer log line)
from perf import device_name, run_logged, stopping_cleanly  # noqa: E402  (same env, own process group: no engine core left on the GPU)

GEN_TOKENS = 32
WORKER_TIMEOUT_S = 3600   # far beyond a device call; the timeout only guarantees the group is killed
SHORT_LENS = (40, 77, 128, 150, 211, 300)
LONG_LEN, SHARED_PREFIX = 9000, 8192
# The random originals' init: logits of std ~5 (a top-1 probability ~0.5-0.7: greedy mostly stable)
# and attention scores of std ~1.7 at any width. tests/tiny_models' defaults (made for exactness tests
# of hidden 64) give hidden 1024 logits of std 10 and near one-hot attention, whose bf16 rounding
# alone moves prompt logprobs by 1.5-2.6 nats: a noise floor (and a 3x tolerance) that would hide real
# errors. With this init transformers' own bf16-vs-fp32 difference is ~0.08-0.13 nats (2000 tokens).
LOGIT_STD, QK_GAIN = 5.0, 1.3
CPU_KV_CACHE_BYTES = 1 << 30   # CPU dry runs: room for the long prompts of the full-size shapes (16 KB/token)


def prompts(vocab: int, long: bool, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in SHORT_LENS]
    if long:
        a = torch.randint(3, vocab, (LONG_LEN,), generator=g).tolist()
        b = a[:SHARED_PREFIX] + torch.randint(3, vocab, (LONG_LEN - SHARED_PREFIX,), generator=g).tolist()
        out += [a, b]
    return out


# ------------------------------------------------------------------------------------------------
# worker: one vLLM engine, run in its own process so that GPU memory is returned between models

def worker(args) -> int:
    spec = json.loads(Path(args.worker).read_text())
    engine = {}
    if spec.get("device") == "cpu":
        # CPU dry runs: engine core and model runner in this process (vLLM's defaults start two more
        # Python processes, ~10 s of imports each, and wait 5 s to kill them at exit) and a KV cache
        # sized for the prompts instead of 30 % of the machine's RAM (6 GiB, zeroed at start-up).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine = dict(distributed_executor_backend="uni", kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=not spec["compiled"],
              max_model_len=LONG_LEN + GEN_TOKENS + 16, gpu_memory_utilization=spec["gpu_mem"],
              enable_prefix_caching=True, max_num_batched_tokens=2048, max_num_seqs=16, seed=0, **engine)
    sp = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    results = []
    short = [p for p in spec["prompts"] if len(p) < SHARED_PREFIX]
    long = [p for p in spec["prompts"] if len(p) >= SHARED_PREFIX]
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in short], sp, use_tqdm=False)
    # Long prompts one at a time. The first (with prompt logprobs, which vLLM computes without reading
    # the prefix cache) is prefilled in 2048-token chunks: every chunk after the first reads its
    # context back through the chunked-context gather. The second asks for no prompt logprobs, so
    # it reads the first's 8192 shared tokens from the prefix cache (num_cached_tokens says so).
    sp_cached = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, logprobs=0, ignore_eos=True)
    for i, p in enumerate(long):
        outs += llm.generate([TokensPrompt(prompt_token_ids=p)], sp if i == 0 else sp_cached, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        plp = (None if o.prompt_logprobs is None else
               [None if e is None else e[tok].logprob for e, tok in zip(o.prompt_logprobs, o.prompt_token_ids)])
        glp = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        results.append({"prompt": list(o.prompt_token_ids), "prompt_logprobs": plp,
                        "generated": list(c.token_ids), "generated_logprobs": glp,
                        "cached_tokens": getattr(o, "num_cached_tokens", None)})
    Path(spec["out"]).write_text(json.dumps({"results": results, "seconds": time.time() - t0}))
    return 0


def run_vllm(model: Path, prompts_: list[list[int]], work: Path, args, compiled: bool) -> dict:
    tag = f"{model.name}{'-compiled' if compiled else ''}"
    spec = {"model": str(model), "dtype": args.dtype, "compiled": compiled, "gpu_mem": args.gpu_mem,
            "device": args.device,
            "prompts": prompts_, "out": str(work / f"{tag}.vllm.json")}
    (work / f"{tag}.spec.json").write_text(json.dumps(spec))
    log = work / f"{tag}.vllm.log"
    t0 = time.time()
    rc = run_logged([sys.executable, __file__, "--worker", str(work / f"{tag}.spec.json")], log, WORKER_TIMEOUT_S)
    text = log.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"vLLM worker for {tag} failed (rc {rc}):\n" + "\n".join(text.splitlines()[-40:]))
    out = json.loads(Path(spec["out"]).read_text())
    backends = sorted(set(re.findall(r"care_mla KV cache .*?backend (\w+)", text)))
    widths = [int(w) for w in re.findall(r"care_mla KV cache .*?, (\d+) values/token", text)]
    selected = sorted(set(re.findall(r"Using (\w+) (?:attention )?backend", text)))
    prefill = (sorted(set([m.group(4) for m in CARE_KV_LAYER.finditer(text) if m.group(4)]   # each layer's
                          or re.findall(r"Using (\w+) MLA prefill backend", text)))    # (GQA: vLLM's choice)
               + re.findall(r"care_vllm: (no fast MLA prefill at head dims .*)", text))  # and why not faster
    return {**out, "tag": tag, "backends": backends or selected, "selected_backend_lines": selected,
            "prefill_backend": prefill,
            "layer_widths": widths, "wall_s": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------
# reference: fp32 on the device, teacher-forced on the tokens vLLM saw and produced

def reference_logprobs(model_dir: Path, seqs: list[list[int]], device: str):
    import torch
    import model_defs  # noqa: F401  (registers care_mla with transformers' Auto classes)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device=device)
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            out.append(logp.cpu())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def compare(v: dict, refs) -> dict:
    import torch

    p_diffs, g_diffs, exact, gaps = [], [], 0, []
    per_prompt = []
    for r, logp in zip(v["results"], refs):
        n = len(r["prompt"])
        full = r["prompt"] + r["generated"]
        tgt = torch.tensor(full[1:])
        ref_tok = logp[:-1].gather(1, tgt[:, None])[:, 0]                # logprob of token t+1 given <= t
        if r["prompt_logprobs"] is not None:
            vp = torch.tensor([x for x in r["prompt_logprobs"][1:]], dtype=torch.float64)
            pd = (vp - ref_tok[: n - 1].double()).abs()
        else:                                      # a prefix-cache hit: only the generated tokens are compared
            pd = torch.zeros(0, dtype=torch.float64)
        vg = torch.tensor(r["generated_logprobs"], dtype=torch.float64)
        gd = (vg - ref_tok[n - 1:].double()).abs()
        best = logp[n - 1: n - 1 + len(r["generated"])].max(-1).values
        gap = (best - ref_tok[n - 1:]).max().item()                     # how far vLLM's pick is from ref's best
        ref_greedy = logp[n - 1: n - 1 + len(r["generated"])].argmax(-1).tolist()
        exact += int(ref_greedy == r["generated"])
        gaps.append(gap)
        p_diffs.append(pd)
        g_diffs.append(gd)
        per_prompt.append({"len": n, "prompt_max": round(pd.max().item(), 4) if len(pd) else None,
                           "prompt_mean": round(pd.mean().item(), 5) if len(pd) else None,
                           "gen_max": round(gd.max().item(), 4), "worst_gap": round(gap, 4),
                           "cached_tokens": r.get("cached_tokens")})
    p_all, g_all = torch.cat(p_diffs), torch.cat(g_diffs)
    return {"prompt_logprob_max_diff": round(p_all.max().item(), 4),
            "prompt_logprob_mean_diff": round(p_all.mean().item(), 5),
            "generated_logprob_max_diff": round(g_all.max().item(), 4),
            "generated_logprob_mean_diff": round(g_all.mean().item(), 5),
            "greedy_exact": f"{exact}/{len(refs)}", "worst_gap": round(max(gaps), 4),
            "per_prompt": per_prompt}


# ------------------------------------------------------------------------------------------------

def calibration_text(path: Path, words: int = 60_000) -> Path:
    """Seeded pseudo-text (Zipf-distributed made-up words): the same on every machine and at every
    revision. (It once was this repository's own files, whose edits changed the calibration and, with
    two layers, sometimes made the `mixed` conversion's widths equal.)"""
    import random

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "ne", "vi", "dur", "pa", "quo", "the", "an", "is", "or"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    drawn = rng.choices(vocab, weights=[1.0 / (i + 1) for i in range(len(vocab))], k=words)
    text = []
    for i, word in enumerate(drawn):
        text.append(word)
        if i % 13 == 12:
            text.append(rng.choice([".", ",", ";", ".\n"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(text))
    return path


def build_models(work: Path, args) -> dict[str, dict[str, Path]]:
    from converter.pipeline import convert
    from tiny_models import make_tiny_original

    calib = [calibration_text(work / "calib.txt")]
    shape = (dict(num_layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64) if args.small else
             dict(num_layers=4, hidden=1024, heads=8, kv_heads=4, head_dim=128))
    k_width = shape["kv_heads"] * shape["head_dim"]
    w576 = 576 if k_width >= 320 else k_width + 64     # dry runs: a uniform width that fits
    models = {}
    for arch in args.archs.split(","):
        orig = work / f"{arch}-orig"
        if not orig.is_dir():
            make_tiny_original(orig, arch, seed=1, max_positions=16384, embed_std=LOGIT_STD / shape["hidden"] ** 0.5,
                               qk_gain=QK_GAIN, **shape)
        models[arch] = {"orig": orig}
        variants = {"w576": dict(kv_width=w576, ranks="uniform"),
                    "mixed": dict(kv_ratio=0.5, ranks="adjusted"),
                    "rope96": dict(kv_ratio=0.5, ranks="adjusted", rope_dim=96)}
        for name in args.variants.split(","):
            kw = variants[name]
            out = work / f"{arch}-{name}"
            if not out.is_dir():
                convert(orig, out, calib_files=calib, calib_samples=64, calib_seqlen=256,
                        device=args.device, **kw)
            models[arch][name] = out
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/care-correctness")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None, help="also write the report as markdown (the command line in it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--archs", default="llama,qwen3")
    ap.add_argument("--small", action="store_true", help="CPU dry run: small shapes, no 576 width")
    ap.add_argument("--no-long", dest="long", action="store_false")
    ap.add_argument("--variants", default="w576,mixed,rope96",
                    help="conversions of each original to serve (default all three; see the module docstring)")
    ap.add_argument("--compiled", default="llama-mixed",
                    help="comma list of models also run with torch.compile + CUDA graphs (default llama-mixed)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="vLLM workers started at once (default 1; each takes --gpu-mem of the GPU). CPU dry "
                         "runs: 2, since a worker spends most of its ~40 s in single-threaded start-up")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = build_models(work, args)
    report = {"command": shlex.join(["python", *sys.argv]) if argv is None else f"correctness.main({argv})",
              "dtype": args.dtype, "device": args.device, "device_name": device_name() if args.device != "cpu" else "cpu",
              "archs": args.archs, "models": {}, "build_s": round(time.time() - t0, 1)}
    failed = []
    vocab = 16384
    ps = prompts(vocab, args.long)
    runs = [(arch, name, path, compiled) for arch, group in models.items() for name, path in group.items()
            for compiled in ([False, True] if f"{arch}-{name}" in args.compiled.split(",") else [False])]
    # The workers are started in this order, --jobs at a time; results are compared in the same order
    # (each arch's original first: it sets the noise floor), each as soon as its worker is done.
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    pending = [pool.submit(run_vllm, path, ps, work, args, compiled) for _, _, path, compiled in runs]
    floor = floor_gap = None

    def save_so_far() -> None:   # after every model: a call killed at its time limit keeps what finished
        if args.out_json:
            Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out_json).write_text(json.dumps(dict(report, complete=False, failed=failed), indent=1))

    try:
        for (arch, name, path, compiled), future in zip(runs, pending):
            try:
                v = future.result()
            except RuntimeError as e:   # one model's failure is its result: the others still run (blind GPU runs)
                key = f"{arch}-{name}{'-compiled' if compiled else ''}"
                failed.append(key)
                report["models"][key] = {"pass": False, "error": str(e)[-4000:]}
                print(f"FAILED {key}: {str(e).splitlines()[0]}", flush=True)
                save_so_far()
                continue
            refs = reference_logprobs(path, [r["prompt"] + r["generated"] for r in v["results"]], args.device)
            m = compare(v, refs)
            m.update(backends=v["backends"], prefill_backend=v["prefill_backend"],
                     layer_widths=v["layer_widths"], vllm_wall_s=v["wall_s"],
                     generate_s=round(v["seconds"], 2))
            if name == "orig":
                # a greedy flip is bf16 noise when its gap is within the original's own worst gap
                # or its largest generated-token logprob error (the original may have no flip at all)
                floor, floor_gap = m["prompt_logprob_mean_diff"], max(m["worst_gap"], m["generated_logprob_max_diff"])
                m["role"] = "bf16 noise floor (GQA original on stock vLLM vs transformers fp32)"
            else:
                limit = 3 * (floor or 0.0) + 0.01
                gap_limit = 2 * (floor_gap or 0.0) + 0.05
                m["limit_prompt_mean"], m["limit_worst_gap"] = round(limit, 5), round(gap_limit, 4)
                m["pass"] = bool(m["prompt_logprob_mean_diff"] <= limit and m["worst_gap"] <= gap_limit)
            if args.long:   # the second long prompt must really have been served from the prefix cache
                m["prefix_cache_hit_tokens"] = m["per_prompt"][-1]["cached_tokens"]
                if name != "orig" and not (m["prefix_cache_hit_tokens"] or 0) >= SHARED_PREFIX // 2:
                    m["pass"] = False
            if name != "orig" and not m["pass"]:
                failed.append(v["tag"])
            report["models"][f"{arch}-{v['tag'].split('-', 1)[1]}"] = m
            print(json.dumps({k: m[k] for k in m if k != "per_prompt"}), flush=True)
            save_so_far()
    finally:   # (an interrupted run: the queued workers are not started)
        pool.shutdown(wait=True, cancel_futures=True)
    report["failed"] = failed
    report["complete"] = True
    report["total_s"] = round(time.time() - t0, 1)
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(report, indent=1))
    if args.out_md:
        from collect import correctness_md

        Path(args.out_md).write_text(f"- command: `{report['command']}`\n- {report['total_s']:.0f} s in all; "
                                     f"device {report['device_name']}\n\n{correctness_md(report)}\n")
    print("FAILED: " + ", ".join(failed) if failed else "all models pass", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(stopping_cleanly(main, "correctness.py")())
