"""GQA original vs converted (care_mla) under `vllm bench throughput` / `vllm bench serve`, random weights.

    python benchmarks/gpu/perf.py --tokenizer TOKDIR --work /tmp/perf --out-json $OUT/perf.json \
        --plan 'llama3-8b:gqa,care576,mixed,parity,mla576@16384' --budget-s 540
    python benchmarks/gpu/perf.py ... --mode serve --plan 'llama3-8b:gqa,care576@1024,8192,16384'

Models (config-only folders, `--load-format dummy`; benchmarks/shapes.py):
  gqa      the original (Llama-3.1-8B / Qwen3-4B shapes; FA3 on H100)
  care576  converted, every layer 512 + 64 (stock FLASH_ATTN_MLA / FlashMLA + stock gather kernel)
  parity   converted at KV parity: every layer 1984 + 64 = 2048 values/token (TRITON_MLA subclass)
  mixed    converted at KV 0.5 with adjusted (per-layer) ranks: widths from 576 to 1600 (TRITON_MLA subclass)
  uniform1024  converted at KV 0.5, every layer 960 + 64
  mla576   a DeepSeek-V2-style dense MLA at width 576 (../shared/gpu/mk_models.py's reference)
Each (model, input length) is one `vllm bench throughput` run (or, with --mode serve, one server per
model and one `vllm bench serve` per length). Same --gpu-memory-utilization and max-model-len for
every model, output length 512. Results are appended to --out-json after every run, so a call that
hits --budget-s (or the device's 10-minute limit) keeps what finished; a later call with the same
--work skips finished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shapes  # noqa: E402

OUTPUT_LEN = 512
STOP_GRACE_S = 20   # an interrupted run's group: from SIGTERM to SIGKILL (vLLM stops its engine core in seconds)
PROMPTS = {1024: 256, 8192: 160, 16384: 96}   # anchors: 160 @ 8K, 96 @ 16K (../shared/gpu/README.md)


def mixed_ranks(cfg: dict, rope_dim: int = 64) -> tuple[list[int], list[int]]:
    """KV 0.5 with a per-layer profile like the adjusted allocations of real models (first and last
    layers low, middle high): latent widths from 0.6x to 1.4x the uniform one, summing to exactly
    half the GQA cache (with the rope keys)."""
    n = cfg["num_hidden_layers"]
    per = cfg["num_key_value_heads"] * cfg["head_dim"] - rope_dim          # uniform latent at KV 0.5
    lat = [int(per * (0.6 + 0.8 * (1 - abs(2 * (l + 0.5) / n - 1)))) // 16 * 16 for l in range(n)]
    diff = n * per - sum(lat)
    for i in range(abs(diff)):                                             # spend the rounding remainder
        lat[i % n] += 1 if diff > 0 else -1
    k = [x // 2 for x in lat]
    return k, [x - kk for x, kk in zip(lat, k)]


def model_configs(shape: str, layers: int | None = None, hidden: int | None = None) -> dict[str, dict]:
    """Every benchmarked model kind for a shape (fewer layers / narrower for CPU dry runs)."""
    src = shapes.source_config(shape, layers, hidden)
    n = src["num_hidden_layers"]
    d = 2 * src["num_key_value_heads"] * src["head_dim"]       # 2048 for both shapes
    out = {"gqa": src,
           "care576": shapes.care_config(src, *shapes.uniform_ranks(src, 576)),
           "uniform1024": shapes.care_config(src, *shapes.uniform_ranks(src, d // 2)),
           "mixed": shapes.care_config(src, *mixed_ranks(src))}
    kp, vp = [src["num_key_value_heads"] * src["head_dim"] - 64] * n, [src["num_key_value_heads"] * src["head_dim"]] * n
    out["parity"] = shapes.care_config(src, kp, vp)
    if shape == "llama3-8b":
        out["mla576"] = dict(
            {k: src[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")},
            architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", num_key_value_heads=32,
            q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=256, first_k_dense_replace=n,
            hidden_act="silu", rope_theta=500000.0, topk_method="greedy", n_group=1, topk_group=1,
            num_experts_per_tok=2, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
            routed_scaling_factor=1.0, aux_loss_alpha=0.0, seq_aux=False, attention_bias=False,
            torch_dtype="bfloat16")
    return out


def kv_values_per_token(cfg: dict) -> int:
    if cfg["model_type"] == "care_mla":
        return sum(cfg["k_ranks"]) + sum(cfg["v_ranks"]) + cfg["num_hidden_layers"] * cfg["qk_rope_head_dim"]
    if cfg["model_type"] == "deepseek_v2":
        return cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"]


def run_key(shape: str, model: str, input_len: int, mode: str) -> str:
    """How a run is keyed in the results (and in benchmarks/gpu/backlog.py): 'llama3-8b/gqa/16384/throughput'."""
    return f"{shape}/{model}/{input_len}/{mode}"


def parse_plan(plan: str) -> list[tuple[str, str, int]]:
    """'llama3-8b:gqa,care576@16384,8192;qwen3-4b:gqa@16384' -> [(shape, model, input_len), ...] in order."""
    runs = []
    for part in filter(None, (p.strip() for p in plan.split(";"))):
        shape, rest = part.split(":")
        models, lens = rest.split("@")
        for n_in in (int(x) for x in lens.split(",")):
            for m in models.split(","):
                runs.append((shape, m, n_in))
    return runs


def log_facts(text: str) -> dict:
    facts = {}
    m = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    if m:
        facts["kv_cache_tokens"] = int(m[-1].replace(",", ""))
    m = re.findall(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", text)
    if m:
        facts["max_concurrency"] = float(m[-1])
    m = re.search(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", text)
    if m:
        facts.update(requests_per_s=float(m.group(1)), total_tok_s=float(m.group(2)), output_tok_s=float(m.group(3)))
    facts["backends"] = sorted(set(re.findall(r"care_mla KV cache .*?backend (\w+)", text))
                               | set(re.findall(r"Using (\w+) (?:attention )?backend", text)))
    errs = [ln for ln in text.splitlines()
            if re.search(r"Traceback|\b[A-Za-z]*Error\b:| ERROR ", ln) and " WARNING " not in ln][-5:]
    if errs:
        facts["errors"] = errs
    return facts


def run_logged(cmd: list[str], log: Path, timeout: float) -> int:
    """Run `cmd` in its own process group with output to `log`; past `timeout` the whole group is
    killed, and the groups of its descendants in sessions of their own (vLLM's engine-core child, or a worker of a
    runner inside, must not keep the GPU for the next run). rc -9 = timed out.
    Interrupted itself (Ctrl-C, or SIGTERM under main()'s stops_cleanly), it stops the group before it
    returns: SIGTERM first, so that a child that is itself a runner (backlog.py runs perf.py) stops its own
    groups, then SIGKILL. The device machine keeps a process of a session of its own running after the
    command that started it has ended (the device README), on the GPU, into the next call."""
    from care_vllm.loadtest.server import end_group, stop_group

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=bench_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            end_group(proc.pid, STOP_GRACE_S)   # (an engine core that outlives the command holds the GPU)
            return rc
        except subprocess.TimeoutExpired:
            nested = _descendant_groups(proc.pid)   # (before the kill: orphans are no longer its descendants)
            for group in (proc.pid, *nested):   # SIGKILL at once, but to Python's resource tracker: see end_group
                end_group(group, 0)
            proc.wait()
            f.write(f"\nKILLED by perf.py after {timeout:.0f} s\n")
            return -9
        except BaseException:
            stop_group(proc, STOP_GRACE_S)   # (SIGTERM first, so that a runner inside stops its own groups)
            raise


def _descendant_groups(pid: int) -> list[int]:
    """The process groups of `pid`'s descendants other than its own and ours: a runner inside (correctness.py)
    starts its workers in sessions of their own, which killing the runner's group alone left running on the GPU."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    groups = set()
    for child in children:
        try:
            groups.add(os.getpgid(child.pid))
        except OSError:   # (gone since the listing)
            continue
    return sorted(groups - {pid, os.getpgrp()})


def device_name() -> str:
    """The accelerator the numbers were measured on (the lent kind has changed between sessions)."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001  (a name is a label, never a reason to fail a run)
        return "unknown"


def vllm_cli() -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def run_throughput(model_dir: Path, n_in: int, args, log: Path, out_json: Path) -> dict:
    n = args.num_prompts or PROMPTS.get(n_in, 128)
    cmd = [*vllm_cli(), "bench", "throughput", "--model", str(model_dir), "--load-format", "dummy",
           "--dataset-name", "random", "--random-input-len", str(n_in // args.len_divisor),
           "--random-output-len", str(args.output_len),
           "--num-prompts", str(n), "--max-model-len", str(args.max_model_len),
           "--gpu-memory-utilization", str(args.gpu_mem), "--output-json", str(out_json), "--seed", "0",
           *(["--dtype", args.dtype] if args.dtype else []), *args.extra]
    t0 = time.time()
    rc = run_logged(cmd, log, min(args.run_timeout, args.deadline - time.time()))
    facts = log_facts(log.read_text(errors="replace"))
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "num_prompts": n, "command": " ".join(cmd[2:]), **facts}


def bench_env() -> dict:
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}


def run_serve(model_dir: Path, lens: list[int], args, work: Path, tag: str) -> dict[int, dict]:
    """One `vllm serve` for the model, one `vllm bench serve` per input length (all requests at once), each
    from an empty prefix cache: with one seed vLLM's random prompts of every length start with the same
    tokens (prompt i runs on from the same random offset), so the 8K run would find the 1K run's prompts
    cached and the 16K run half of each of its prompts (care_vllm/loadtest/server.reset_prefix_cache)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from care_vllm.loadtest.server import VllmServer, reset_prefix_cache

    res = {}
    t_start = time.time()
    extra = ["--load-format", "dummy", "--max-model-len", str(args.max_model_len),
             "--gpu-memory-utilization", str(args.gpu_mem), *(["--dtype", args.dtype] if args.dtype else [])]
    with VllmServer(model_dir, work / f"{tag}.serve.log", extra_args=extra, served_name=tag,
                    env={**bench_env(), "VLLM_SERVER_DEV_MODE": "1"},
                    startup_timeout=min(args.run_timeout, args.deadline - time.time())) as srv:
        start_s = round(time.time() - t_start, 1)
        for n_in in lens:
            n = args.num_prompts or PROMPTS.get(n_in, 128)
            out = work / f"{tag}_{n_in}.serve.json"
            cmd = [*vllm_cli(), "bench", "serve", "--backend", "vllm", "--base-url", srv.base_url,
                   "--model", tag, "--tokenizer", str(model_dir), "--dataset-name", "random",
                   "--random-input-len", str(n_in // args.len_divisor), "--random-output-len", str(args.output_len),
                   "--num-prompts", str(n), "--ignore-eos", "--seed", "0", "--save-result",
                   "--result-dir", str(work), "--result-filename", out.name]
            reset = reset_prefix_cache(srv.base_url)
            t0 = time.time()
            log = work / f"{tag}_{n_in}.bench_serve.log"
            rc = run_logged(cmd, log, min(args.run_timeout, args.deadline - time.time()))
            r = json.loads(out.read_text()) if out.is_file() else {}
            res[n_in] = {"rc": rc, "wall_s": round(time.time() - t0, 1), "server_start_s": start_s, "num_prompts": n,
                         "prefix_cache_reset": reset,
                         **{k: r.get(k) for k in ("output_throughput", "total_token_throughput", "mean_ttft_ms",
                                                  "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                                                  "p99_tpot_ms", "completed")},
                         **log_facts(srv.log_text() if hasattr(srv, "log_text") else "")}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer files (vocab >= 16384)")
    ap.add_argument("--work", default="/tmp/care-perf")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--mode", choices=["throughput", "serve"], default="throughput")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no new run after this many seconds")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="kill one run after this many seconds")
    ap.add_argument("--hard-stop-s", type=float, default=None,
                    help="kill a run still going this many seconds after the start (default: budget + 150)")
    ap.add_argument("--gpu-mem", type=float, default=0.90)
    ap.add_argument("--max-model-len", type=int, default=16384 + OUTPUT_LEN + 64)
    ap.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    ap.add_argument("--num-prompts", type=int, default=None, help="override the per-length prompt counts")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--len-divisor", type=int, default=1,
                    help="run each planned input length divided by this (CPU dry runs; results keep the planned key)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (CPU dry runs)")
    ap.add_argument("--hidden", type=int, default=None, help="narrower (CPU dry runs)")
    ap.add_argument("extra", nargs="*", help="extra args for vllm bench throughput (after --)")
    args = ap.parse_args(argv)

    t_start = time.time()
    args.deadline = t_start + (args.hard_stop_s if args.hard_stop_s is not None else args.budget_s + 150)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out_json)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": []}
    done_file = work / f"done_{args.mode}.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    results["runs"] = list(done.values())

    def model_dir(shape: str, name: str) -> Path:
        d = work / f"{shape}-{name}"
        if not (d / "config.json").is_file():
            shapes.write_model_dir(d, model_configs(shape, args.layers, args.hidden)[name], Path(args.tokenizer))
        return d

    def save() -> None:  # after every run: a call killed at its time limit still brings back what finished
        results["runs"] = list(done.values())
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
        done_file.write_text(json.dumps(done, indent=1))

    runs = parse_plan(args.plan)
    gpu = device_name()

    def record(r: dict, shape: str, name: str, n_in: int, cfg: dict) -> dict:
        """A run's result with what identifies it (both modes)."""
        r.update(key=run_key(shape, name, n_in, args.mode), shape=shape, model=name, input_len=n_in,
                 output_len=args.output_len, kv_values_per_token=kv_values_per_token(cfg), device_name=gpu,
                 **({"len_divisor": args.len_divisor} if args.len_divisor != 1 else {}))
        done[r["key"]] = r
        return r
    if args.mode == "throughput":
        for shape, name, n_in in runs:
            key = run_key(shape, name, n_in, "throughput")
            if key in done:
                continue
            if time.time() - t_start > args.budget_s:
                print(f"budget reached: skipping {key}", flush=True)
                continue
            d = model_dir(shape, name)
            cfg = json.loads((d / "config.json").read_text())
            r = record(run_throughput(d, n_in, args, work / f"{shape}-{name}-{n_in}.log",
                                      work / f"{shape}-{name}-{n_in}.json"), shape, name, n_in, cfg)
            save()
            print(json.dumps({k: r.get(k) for k in ("key", "rc", "wall_s", "kv_cache_tokens", "output_tok_s",
                                                    "total_tok_s", "backends", "errors")}), flush=True)
    else:
        by_model: dict[tuple[str, str], list[int]] = {}
        for shape, name, n_in in runs:
            by_model.setdefault((shape, name), []).append(n_in)
        for (shape, name), lens in by_model.items():
            lens = [n for n in lens if run_key(shape, name, n, "serve") not in done]
            if not lens or time.time() - t_start > args.budget_s:
                continue
            d = model_dir(shape, name)
            cfg = json.loads((d / "config.json").read_text())
            try:
                rs = run_serve(d, lens, args, work, f"{shape}-{name}")
            except Exception as e:  # noqa: BLE001  (a server that does not come up is a result too)
                rs = {n: {"rc": -1, "errors": [str(e)[-2000:]]} for n in lens}
            for n_in, r in rs.items():
                record(r, shape, name, n_in, cfg)
                print(json.dumps({k: r.get(k) for k in ("key", "rc", "output_throughput", "mean_ttft_ms",
                                                        "mean_tpot_ms", "errors")}), flush=True)
            save()
    save()
    return 0


def stopping_cleanly(main, prog: str):
    """`main` under converter/interrupts.py's stops_cleanly (SIGTERM unwinds it like Ctrl-C: run_logged then
    stops its groups); the repository root goes on the path for it, as bench_env() gives it to the children."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from converter.interrupts import stops_cleanly

    return stops_cleanly(prog)(main)


if __name__ == "__main__":
    sys.exit(stopping_cleanly(main, "perf.py")())
