"""bf16 serving through the plugin is as accurate as the GQA original's own bf16 serving.

The other serving tests compare in fp32 (to 1e-3); GPU users serve bf16. This runs the GPU runbook's
correctness check (benchmarks/gpu/correctness.py, so the script the first GPU session depends on is
exercised in every CI run too) on CPU with its small shapes: random Llama-3 and Qwen3 originals, each
converted at one uniform width and with mixed per-layer widths, all served by vLLM in bf16 (the
originals by stock vLLM, the conversions by the plugin's CPU MLA backend) and compared, teacher-forced,
with fp32 transformers / model_defs. The reference for "accurate enough" is independent of the
plugin: the original's own bf16-vs-fp32 difference. A conversion passes when its mean prompt-logprob
difference is at most 3x its original's + 0.01 and its worst greedy gap at most 2x + 0.05.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.tiny_models import TOKENIZER_SRC, require_shared

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

GPU_SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"


def test_bf16_serving_stays_within_the_originals_bf16_noise(tmp_path):
    require_shared(TOKENIZER_SRC)
    sys.path.insert(0, str(GPU_SCRIPTS))
    import correctness

    out = tmp_path / "correctness.json"
    rc = correctness.main(["--small", "--device", "cpu", "--dtype", "bfloat16", "--no-long", "--compiled", "", "--jobs", "2",
                           "--variants", "w576,mixed",
                           "--work", str(tmp_path), "--out-json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["complete"]
    for name, m in rep["models"].items():
        print(name, {k: m.get(k) for k in ("prompt_logprob_mean_diff", "limit_prompt_mean", "worst_gap",
                                           "limit_worst_gap", "layer_widths", "backends")})
    assert rc == 0, f"failed: {rep['failed']}"
    converted = {n: m for n, m in rep["models"].items() if not n.endswith("-orig")}
    assert len(converted) == 4
    for name, m in converted.items():
        assert m["pass"] and m["backends"] == ["CareCPUMLABackend"], name
    mixed = rep["models"]["llama-mixed"]["layer_widths"]
    assert len(set(mixed)) > 1, f"the mixed conversion should have per-layer widths, got {mixed}"
