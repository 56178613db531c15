"""Pieces shared by the CPU and GPU backends: MLA metadata without vLLM's global head-size check.

`MLACommonMetadata.__post_init__` checks the *global* `model_config.get_head_size()` (the widest
layer) against `MLACommonBackend.get_supported_head_sizes()` = {320, 512, 576}, whatever backend a
layer uses. care_mla layers have arbitrary widths, and our backends handle any width, so their
metadata builders build `CareMLAMetadata`, the same dataclass without that check.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.model_executor.layers.attention.mla_attention import MLACommonMetadata


@dataclass
class CareMLAMetadata(MLACommonMetadata):
    def __post_init__(self):  # no global head-size whitelist: our impls take any width
        pass


class RelaxedHeadSizeBuilderMixin:
    """Mix into an MLACommonMetadataBuilder subclass (before it in the MRO)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata_cls = CareMLAMetadata
