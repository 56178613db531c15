"""Data parallelism: `vllm serve OUT --data-parallel-size 2` on a converted tiny Qwen3 with per-layer ranks.

Two engine cores (one CPU core each), behind vLLM's DP coordinator and one API server, each load the whole model
and allocate their own cache. What could go wrong for a converted checkpoint: an engine that falls back to a
uniform cache or to another backend, or the front end sending all requests to one engine. Checked: both engines'
workers bind KV tensors of exactly the checkpoint's per-layer widths, 8 concurrent greedy requests return
model_defs' tokens (fp32, one process) with prompt and generated-token logprobs within 1e-3, and vLLM's own
per-engine counters (`/metrics`, `vllm:request_success_total{engine=...}`, summed over finish reasons) show that
both engines served some.
"""
from __future__ import annotations

import pytest

from care_vllm.loadtest.server import scrape_metric_by
from tests.served_reference import compare_concurrent, mixed_rank_conversion, random_prompts, reference_model, serve_args
from tests.vllm_server import VLLMServer, one_core_per_rank, worker_kv_shapes

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


def test_dp2_engines_serve_model_defs_tokens_with_per_layer_caches(tmp_path, calib_file):
    _, out, cfg = mixed_rank_conversion(tmp_path, "qwen3", calib_file)
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    model, _ = reference_model(out)
    prompts = random_prompts(cfg["vocab_size"], n=8)

    with VLLMServer(out, *serve_args("--enforce-eager", "--data-parallel-size", "2"),
                    log_path=tmp_path / "dp2.log", env=one_core_per_rank()) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        diff = compare_concurrent(client, model, prompts, 16)
        served = scrape_metric_by(server.base_url, "vllm:request_success_total", "engine", timeout=30)
        log = server.log_text()

    bound = {pid: [shapes[layer][-1] for layer in sorted(shapes)] for pid, shapes in worker_kv_shapes(log, None).items()}
    print(f"DP=2: greedy identical on {len(prompts)} concurrent prompts; max |logprob diff| prompt "
          f"{diff['prompt']:.2e}, generated {diff['generated']:.2e}; requests per engine {served}; "
          f"per-worker widths {bound}")
    assert len(bound) == 2, f"two DP engines' workers must bind KV tensors, got {bound}"
    assert all(w == widths for w in bound.values()), f"{bound} != {widths} in every engine"
    assert sorted(served) == ["0", "1"] and sum(served.values()) == len(prompts), served
    assert all(n > 0 for n in served.values()), f"one engine served every request: {served}"
    assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, diff
    assert len(diff["distinct"]) >= 16, f"degenerate generations: {diff['distinct']}"
