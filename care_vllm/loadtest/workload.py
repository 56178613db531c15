"""One load level = one `vllm bench serve` run, with /metrics scraped in the background.

We do not write a client: vLLM's own benchmark sends the requests and computes throughput, TTFT,
TPOT and ITL; we only add a timeline of the server's KV-cache usage and queue lengths, which
`vllm bench serve` does not record.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .server import (prefix_cache_counters, prefix_cache_use, scrape_metrics, spec_decode_counters, spec_decode_use,
                     vllm_command)

SCRAPED = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")


@dataclass
class Workload:
    """`prefix_len` 0: vLLM's random dataset, `input_len` tokens a prompt. `prefix_len` > 0: its
    prefix_repetition dataset, each prompt = one of `num_prefixes` shared prefixes of `prefix_len`
    tokens + `input_len` tokens of its own (a system prompt / few-shot header: prefix caching).
    `dataset_path`: vLLM's custom dataset instead, your own prompts (JSONL, one `{"prompt": ...}`
    per line, sent through the model's chat template; `input_len` is then unused). `range_ratio` r > 0
    (random dataset only): each request's prompt and output lengths are drawn from [L (1 - r), L (1 + r)]
    (vLLM's --random-range-ratio): contexts of different lengths decode side by side, as in real traffic."""
    num_prompts: int = 32
    input_len: int = 256
    output_len: int = 64
    request_rate: str = "inf"
    seed: int = 0
    prefix_len: int = 0
    num_prefixes: int = 1
    dataset_path: str = ""
    temperature: float | None = None   # None: the server's default (the model's generation_config, else 1.0)
    range_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.output_len < 1 or (self.input_len < 1 and not self.dataset_path):
            raise ValueError(f"--input-len and --output-len must be >= 1 (got {self.input_len}, {self.output_len})")
        try:
            rate = float(self.request_rate)
        except ValueError:
            rate = float("nan")
        if not rate > 0:
            raise ValueError(f"--request-rate must be a positive number of requests/s or inf (got {self.request_rate!r})")
        if self.range_ratio and (not 0 <= self.range_ratio < 1 or self.prefix_len or self.dataset_path):
            raise ValueError(f"--random-range-ratio {self.range_ratio}: expected 0 <= R < 1, for random prompts "
                             f"only (not with a shared prefix or your own dataset)")

    def dataset_args(self) -> list[str]:
        """The `vllm bench serve` dataset flags of this workload."""
        if self.dataset_path:
            return ["--dataset-name", "custom", "--dataset-path", self.dataset_path,
                    "--custom-output-len", str(self.output_len)]
        if not self.prefix_len:
            return ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                    "--random-output-len", str(self.output_len),
                    *(["--random-range-ratio", str(self.range_ratio)] if self.range_ratio else [])]
        return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(self.prefix_len),
                "--prefix-repetition-suffix-len", str(self.input_len),
                "--prefix-repetition-num-prefixes", str(self.num_prefixes),
                "--prefix-repetition-output-len", str(self.output_len)]

    def describe(self) -> str:
        """E.g. 'random dataset, 256 in / 64 out tokens'."""
        sampling = "" if self.temperature is None else f", temperature {self.temperature:g}"
        if self.dataset_path:
            return (f"custom dataset {Path(self.dataset_path).name} (chat template), {self.output_len} out tokens"
                    f"{sampling}")
        tokens = f"{self.input_len} in / {self.output_len} out tokens"
        if not self.prefix_len:   # (the spread is the lengths', so it follows them, before the temperature)
            spread = f" (each drawn from +-{100 * self.range_ratio:.0f} %)" if self.range_ratio else ""
            return f"random dataset, {tokens}{spread}{sampling}"
        return (f"prefix_repetition dataset, {self.prefix_len} shared (one of {self.num_prefixes} prefixes) "
                f"+ {tokens}{sampling}")


class MetricsScraper(threading.Thread):
    """Poll /metrics every `interval` s until stopped; samples are (seconds since start, {metric: v})."""

    def __init__(self, base_url: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.base_url, self.interval = base_url, interval
        self.samples: list[dict] = []
        self._stop_evt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._stop_evt.is_set():
            try:
                m = scrape_metrics(self.base_url)
                self.samples.append({"t": round(time.monotonic() - t0, 3),
                                     **{k: m.get(k) for k in SCRAPED}})
            except OSError:
                pass
            self._stop_evt.wait(self.interval)

    def stop(self) -> list[dict]:
        """Stop and return the samples of the busy span only (`vllm bench serve` spends its first
        seconds importing vLLM: that idle lead-in would dwarf a short run in the plots)."""
        self._stop_evt.set()
        self.join(timeout=10)
        busy = [i for i, s in enumerate(self.samples)
                if (s.get("vllm:num_requests_running") or 0) + (s.get("vllm:num_requests_waiting") or 0) > 0]
        if not busy:
            return self.samples
        lo, hi = max(0, busy[0] - 1), min(len(self.samples), busy[-1] + 2)
        t0 = self.samples[lo]["t"]
        return [{**s, "t": round(s["t"] - t0, 3)} for s in self.samples[lo:hi]]


def bench_command(base_url: str, served_name: str, tokenizer: str, wl: Workload, concurrency: int,
                  result_dir: Path, result_file: str) -> list[str]:
    return [*vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", base_url,
            "--endpoint", "/v1/completions", "--model", served_name, "--tokenizer", tokenizer,
            *wl.dataset_args(), "--num-prompts", str(wl.num_prompts),
            "--request-rate", wl.request_rate, "--max-concurrency", str(concurrency), "--seed", str(wl.seed),
            *(["--temperature", str(wl.temperature)] if wl.temperature is not None else []),
            "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file, "--disable-tqdm"]


def run_level(base_url: str, served_name: str, tokenizer: str, wl: Workload, concurrency: int,
              result_dir: Path, tag: str, timeout: float = 3600) -> dict:
    """Run one `vllm bench serve` level; returns its saved JSON, the scraped timeline, the
    prefix-cache lookups during the level (tokens queried, found) and, with --speculative-config,
    the drafts proposed and accepted."""
    result_dir.mkdir(parents=True, exist_ok=True)
    fname = f"{tag}_c{concurrency}.json"
    cmd = bench_command(base_url, served_name, tokenizer, wl, concurrency, result_dir, fname)
    cached_before, spec_before = prefix_cache_counters(base_url), spec_decode_counters(base_url)
    scraper = MetricsScraper(base_url)
    scraper.start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:   # (run() has killed it)
        raise RuntimeError(f"vllm bench serve at concurrency {concurrency} ran past {timeout:g} s "
                           f"(--level-timeout)") from None
    finally:
        timeline = scraper.stop()
    (result_dir / f"{tag}_c{concurrency}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads((result_dir / fname).read_text())
    if result.get("completed") != wl.num_prompts:
        raise RuntimeError(f"vllm bench serve: only {result.get('completed')} of {wl.num_prompts} requests "
                           f"completed at concurrency {concurrency} (see the server log)")
    return {"concurrency": concurrency, "command": cmd, "result": result, "metrics_timeline": timeline,
            "prefix_cache": prefix_cache_use(cached_before, prefix_cache_counters(base_url)),
            "spec_decode": spec_decode_use(spec_before, spec_decode_counters(base_url))}
