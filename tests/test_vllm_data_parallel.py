"""Data parallelism: `vllm serve OUT --data-parallel-size 2` on a converted tiny Qwen3 with per-layer ranks.

Two engine cores (one CPU core each), behind vLLM's DP coordinator and one API server, each load the whole model
and allocate their own cache. What could go wrong for a converted checkpoint: an engine that falls back to a
uniform cache or to another backend, or the front end sending all requests to one engine. Checked: both engines'
workers bind KV tensors of exactly the checkpoint's per-layer widths, 8 concurrent greedy requests return
model_defs' tokens (fp32, one process) with prompt and generated-token logprobs within 1e-3, and vLLM's own
per-engine counters (`/metrics`, `vllm:request_success_total{engine=...}`) show that both engines served some.
"""
from __future__ import annotations

import re
import urllib.request

import pytest

from tests.served_reference import compare_concurrent, mixed_rank_conversion, random_prompts, reference_model, serve_args
from tests.vllm_server import VLLMServer, one_core_per_rank

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

pytestmark = pytest.mark.slow


def requests_served_per_engine(metrics_text: str) -> dict[str, float]:
    """{engine index: requests finished, any reason} from a vLLM `/metrics` page."""
    served: dict[str, float] = {}
    for family in prometheus_parser.text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "vllm:request_success_total":
                engine = sample.labels["engine"]
                served[engine] = served.get(engine, 0.0) + sample.value
    return served


def kv_widths_per_worker(log: str) -> dict[int, list[int]]:
    """{worker pid: the last dim of each layer's KV tensor, in layer order} from the line care_vllm logs as each
    layer's cache is bound (DP workers are each rank 0 of their own world, so they are told apart by pid)."""
    line = re.compile(r"\(Worker pid=(\d+)\).*care_mla KV cache model\.layers\.(\d+)\.self_attn\.attn: "
                      r"shape \(\d+, \d+, (\d+)\)")
    layers: dict[int, dict[int, int]] = {}
    for m in line.finditer(log):
        layers.setdefault(int(m.group(1)), {})[int(m.group(2))] = int(m.group(3))
    return {pid: [by_layer[i] for i in sorted(by_layer)] for pid, by_layer in layers.items()}


def test_dp2_engines_serve_model_defs_tokens_with_per_layer_caches(tmp_path, calib_file):
    _, out, cfg = mixed_rank_conversion(tmp_path, "qwen3", calib_file)
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    model, _ = reference_model(out)
    prompts = random_prompts(cfg["vocab_size"], n=8)

    with VLLMServer(out, *serve_args("--enforce-eager", "--data-parallel-size", "2"),
                    log_path=tmp_path / "dp2.log", env=one_core_per_rank()) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        diff = compare_concurrent(client, model, prompts, 16)
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as page:
            served = requests_served_per_engine(page.read().decode())
        log = server.log_text()

    bound = kv_widths_per_worker(log)
    print(f"DP=2: greedy identical on {len(prompts)} concurrent prompts; max |logprob diff| prompt "
          f"{diff['prompt']:.2e}, generated {diff['generated']:.2e}; requests per engine {served}; "
          f"per-worker widths {bound}")
    assert len(bound) == 2, f"two DP engines' workers must bind KV tensors, got {bound}"
    assert all(w == widths for w in bound.values()), f"{bound} != {widths} in every engine"
    assert sorted(served) == ["0", "1"] and sum(served.values()) == len(prompts), served
    assert all(n > 0 for n in served.values()), f"one engine served every request: {served}"
    assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
    assert len(diff["distinct"]) >= 16, f"degenerate generations: {diff['distinct']}"
