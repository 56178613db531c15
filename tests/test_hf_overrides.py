"""`--hf-overrides` (converter/source_rope.py): the rope settings a user would give `vllm serve SRC --hf-overrides`
for the original (Qwen3's long-context yarn switch) are given to care-convert instead, since the converted
model's rope is fixed (the plugin refuses such overrides at serve time: tests/test_vllm_plugin.py).

Reference: the same tiny Qwen3 (same seed, same weights) written with yarn in its own config.json. Converting
the plain one with the overrides must give that one's conversion exactly, and the tools that load the
original again (care-eval compare, care-heal's teacher) must load it with the overrides the conversion recorded.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from converter import eval_cli
from converter import heal as heal_mod
from converter.pipeline import convert
from tests.test_converter_errors import assert_refused, run_convert
from tests.tiny_models import QWEN3_YARN, make_tiny_original

YARN = {k: v for k, v in QWEN3_YARN.items() if k != "rope_theta"}   # the source's theta is kept (merged)
OVERRIDES = {"rope_scaling": YARN, "max_position_embeddings": 2048}
TEXT = "The ships were loading grain for the winter, and the clerk walked to the harbour to read the letter. " * 30


@pytest.fixture(scope="module")
def pair(tmp_path_factory, calib_file):
    """(root, plain source, yarn source, conversion of plain + OVERRIDES, conversion of the yarn source)."""
    root = tmp_path_factory.mktemp("overrides")
    kw = dict(num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=0)
    plain = make_tiny_original(root / "plain", "qwen3", **kw)
    yarn = make_tiny_original(root / "yarn", "qwen3", **kw, rope=QWEN3_YARN, max_positions=2048)
    opts = dict(calib_files=[calib_file], kv_ratio=0.5, rope_dim=8, calib_samples=8, calib_seqlen=64)
    convert(plain, root / "conv_overridden", hf_overrides=OVERRIDES, **opts)
    convert(yarn, root / "conv_yarn", **opts)
    (root / "text.txt").write_text(TEXT)
    return root, plain, yarn, root / "conv_overridden", root / "conv_yarn"


def test_overrides_convert_as_the_source_with_them_in_its_config(pair):
    _, plain, yarn, overridden, reference = pair
    a, b = load_file(overridden / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (overridden, reference))
    assert ca.pop("source_hf_overrides") == OVERRIDES
    for key in ("source_model", "care"):
        ca.pop(key), cb.pop(key)
    assert ca == cb and ca["max_position_embeddings"] == 2048
    assert ca["source_rope_parameters"]["rope_type"] == "yarn" and ca["softmax_scale"] > 16 ** -0.5


def test_compare_loads_the_original_with_the_recorded_overrides(pair, capsys):
    """care-eval compare PLAIN OVERRIDDEN measures against the yarn original (as COMPARE YARN REFERENCE does),
    unless --hf-overrides says otherwise."""
    root, plain, yarn, overridden, reference = pair
    common = ["--text", str(root / "text.txt"), "--seqlen", "32", "--max-tokens", "128"]

    def run(*args):
        assert eval_cli.main(["compare", *map(str, args), *common]) == 0
        return json.loads(capsys.readouterr().out)

    want = run(yarn, reference)
    got = run(plain, overridden)
    assert got["original"] == want["original"] and got["kl"] == want["kl"]
    plain_rope = run(plain, overridden, "--hf-overrides", json.dumps({"rope_theta": 1e6}))
    assert plain_rope["original"]["ppl"] != want["original"]["ppl"]


def test_heal_teacher_is_the_original_with_the_recorded_overrides(pair):
    """Two optimizer steps of care-heal from each conversion, each with its own source as teacher: the same
    losses and weights, so the teacher of the overridden conversion ran with yarn."""
    root, plain, yarn, overridden, reference = pair
    logs = []
    for conv, teacher in ((overridden, plain), (reference, yarn)):
        out = root / f"healed_{conv.name}"
        assert heal_mod.main([str(conv), str(out), "--teacher", str(teacher), "--text", str(root / "text.txt"),
                              "--tokens", "128", "--seqlen", "32", "--batch-size", "2", "--grad-accum", "1",
                              "--lr", "2e-3", "--warmup-ratio", "0", "--no-progress"]) == 0
        logs.append(json.loads((out / "heal_log.json").read_text())["steps"])
    assert logs[0] == logs[1] and logs[0]


def test_care_bench_serves_and_measures_the_original_with_the_recorded_overrides(pair):
    """care-bench's original server gets the conversion's --hf-overrides (vllm serve's own flag, same JSON), and
    its held-out perplexity is the yarn original's."""
    import argparse

    from care_vllm.loadtest import quality
    from care_vllm.loadtest.cli import recorded_overrides, server_args

    root, plain, yarn, overridden, reference = pair
    assert recorded_overrides(overridden) == OVERRIDES and recorded_overrides(reference) is None
    args = argparse.Namespace(dtype="float32", kv_cache_memory_bytes="1G", max_model_len=None, serve_args="")
    given = server_args(args, OVERRIDES)
    assert json.loads(given[given.index("--hf-overrides") + 1]) == OVERRIDES
    assert "--hf-overrides" not in server_args(args)
    texts = [TEXT]
    got = quality.perplexities({"original": str(plain)}, texts, 32, 128, {"original": OVERRIDES})
    assert got == quality.perplexities({"original": str(yarn)}, texts, 32, 128)


@pytest.mark.parametrize("value,needle", [
    ("{not json", "--hf-overrides is not valid JSON"),
    ('["rope_scaling"]', "--hf-overrides must be a JSON object"),
    ('{"num_hidden_layers": 1}', "can set rope_scaling, rope_parameters, rope_theta, max_position_embeddings"),
    ('{"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}', "rope_type 'dynamic' is not supported"),
    # values transformers takes as given: a traceback (int("x")), or a failed rope map after calibrating (-1)
    ('{"rope_theta": "abc"}', "rope_theta must be a positive number, got 'abc'"),
    ('{"rope_theta": -1}', "rope_theta must be a positive number, got -1"),
    ('{"max_position_embeddings": "x"}', "max_position_embeddings must be a positive integer, got 'x'"),
    ('{"max_position_embeddings": 100.5}', "max_position_embeddings must be a positive integer, got 100.5"),
    ('{"rope_scaling": {"rope_type": "yarn", "factor": 0}}', "rope_scaling.factor must be a positive number"),
    ('{"rope_parameters": {"rope_type": "llama3", "factor": 8, "low_freq_factor": "1"}}',
     "rope_parameters.low_freq_factor must be a number"),
])
def test_bad_overrides_are_refused(pair, tmp_path, calib_file, value, needle):
    _, plain, _, _, _ = pair
    out = tmp_path / "out"
    assert_refused(run_convert(plain, out, "--calib", calib_file, "--hf-overrides", value), out, needle)
