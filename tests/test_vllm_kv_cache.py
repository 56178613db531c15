"""The KV cache configuration an offline vLLM engine builds for a care_mla checkpoint whose layers
have different ranks: one KV-cache group holding a UniformTypeKVCacheSpecs with one MLA spec per
layer, each `r_K[l] + r_V[l] + d_r` wide, and per-layer cache tensors of exactly that width.

The engine runs in a subprocess, in that process (no engine-core or worker processes; the cache layout does not
depend on where the engine runs, and tests/test_vllm_serve.py checks it through `vllm serve`'s own processes): ~15 s
less than a `vllm serve` start on 2 cores. It reads the worker's `kv_cache_config` with `collective_rpc` and prints
it as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_original

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KV_BYTES = 16 << 20

SCRIPT = textwrap.dedent('''
    import json, sys

    def inspect(self):
        cfg = self.model_runner.kv_cache_config
        groups = []
        for g in cfg.kv_cache_groups:
            spec = g.kv_cache_spec
            per_layer = getattr(spec, "kv_cache_specs", None) or {n: spec for n in g.layer_names}
            groups.append({
                "spec_type": type(spec).__name__,
                "layers": {n: {"type": type(s).__name__, "head_size": s.head_size, "block_size": s.block_size,
                               "num_kv_heads": s.num_kv_heads, "page_size_bytes": s.page_size_bytes}
                           for n, s in per_layer.items()},
            })
        ctx = self.model_runner.vllm_config.compilation_config.static_forward_context
        tensors = {n: list(layer.kv_cache.shape) for n, layer in ctx.items() if hasattr(layer, "kv_cache")}
        return {"num_blocks": cfg.num_blocks, "groups": groups, "tensors": tensors}

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
                  kv_cache_memory_bytes=int(sys.argv[2]), max_num_seqs=4, distributed_executor_backend="uni",
                  kv_cache_dtype=sys.argv[3])
        out = llm.generate(["a b c d"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) >= 1
        print("KVJSON" + json.dumps(llm.collective_rpc(inspect)[0]), flush=True)
''')


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from converter.pipeline import convert

    root = tmp_path_factory.mktemp("kvcache")
    calib = root / "calib.txt"
    calib.write_text(" ".join(["the latent cache keeps a key and a value for every token"] * 400))
    src = make_tiny_original(root / "orig", "qwen3", num_layers=4, seed=3)
    out = root / "mla"
    report = convert(src, out, calib_files=[calib], kv_ratio=0.6, rope_dim=8, calib_samples=8, calib_seqlen=64)
    return out, report


def run_engine(out: Path, tmp_path: Path, kv_cache_dtype: str = "auto") -> subprocess.CompletedProcess:
    """SCRIPT on the checkpoint `out`, engine core and worker in the script's process."""
    script = tmp_path / "inspect_kv.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TMPDIR": str(tmp_path),   # (vLLM's file store, which it leaves; eager: no compile cache to keep warm)
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, str(script), str(out), str(KV_BYTES), kv_cache_dtype], capture_output=True,
                          text=True, timeout=420, env=env, cwd=str(ROOT))


def test_engine_kv_cache_config_has_one_width_per_layer(converted, tmp_path):
    out, report = converted
    cfg = json.loads((out / "config.json").read_text())
    d_r = cfg["qk_rope_head_dim"]
    widths = [k + v + d_r for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert len(set(widths)) > 1, widths

    proc = run_engine(out, tmp_path)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("KVJSON")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = json.loads(lines[-1][len("KVJSON"):])

    assert len(info["groups"]) == 1, info["groups"]
    group = info["groups"][0]
    assert group["spec_type"] == "UniformTypeKVCacheSpecs"
    layers = group["layers"]
    names = [f"model.layers.{l}.self_attn.attn" for l in range(len(widths))]
    assert sorted(layers) == sorted(names)
    block = layers[names[0]]["block_size"]
    for name, w in zip(names, widths):
        s = layers[name]
        assert s["type"] == "MLAAttentionSpec" and s["num_kv_heads"] == 1
        assert s["head_size"] == w and s["block_size"] == block
        assert s["page_size_bytes"] == block * w * 4
        assert info["tensors"][name] == [info["num_blocks"], block, w]
    per_token = sum(layers[n]["page_size_bytes"] for n in names) / block
    assert per_token == sum(widths) * 4 == report["cache_values_per_token"] * 4
    assert info["num_blocks"] == KV_BYTES // (per_token * block)


def test_unsupported_kv_cache_dtype_is_refused_at_start(converted, tmp_path):
    """The plugin picks its backend itself, bypassing vLLM's selector and its cache-dtype check; the
    CPU latent backend stores only the model dtype. Before the check, `--kv-cache-dtype fp8` started
    and generated token 0 forever; now the engine stops at start-up naming the problem (`vllm serve` exits with
    it: its engine core raises the same error, and a start the plugin refuses ends `vllm serve` as
    tests/test_vllm_quantized.py::test_a_quantized_weight_map_is_refused checks)."""
    out, _ = converted
    proc = run_engine(out, tmp_path, kv_cache_dtype="fp8")
    assert proc.returncode != 0 and "KVJSON" not in proc.stdout, proc.stdout[-3000:]
    assert "care_vllm: --kv-cache-dtype fp8 is not supported by the CPU_MLA latent-attention backend" in \
        proc.stdout + proc.stderr, proc.stderr[-5000:]
