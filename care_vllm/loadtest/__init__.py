"""care-bench: load-test a converted checkpoint against its GQA original on the same hardware.

Kept out of the plugin's import path: `care_vllm.register()` never imports this package.
Workloads are driven by `vllm bench serve` (its datasets and metrics), servers by `vllm serve`.
"""
