"""care-convert streams the checkpoint out in shards (converter/write.py: ShardWriter) as it assembles
the layers; the result must be the layout transformers and vLLM load, holding exactly the tensors a
single-file write holds.

Reference: the same conversion written as one file (the default size limit), compared tensor for tensor,
and the two loaded with transformers (through model_defs) giving the same logits.
"""
from __future__ import annotations

import json
import os
import stat

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from converter.pipeline import convert
from tests.tiny_models import make_tiny_original

LIMIT = 300_000  # bytes: several shards for the tiny model (its embedding alone is ~2 MB: a shard of its own)


def test_sharded_checkpoint_equals_the_single_file_one(tmp_path, calib_file):
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from transformers import AutoModelForCausalLM

    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=3)
    kw = dict(calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=32,
              stats_cache=str(tmp_path / "stats.pt"))
    convert(src, tmp_path / "single", **kw)
    convert(src, tmp_path / "sharded", max_shard_size=f"{LIMIT // 1000}KB", **kw)

    single = load_file(tmp_path / "single" / "model.safetensors")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == files

    seen = {}
    for name in files:
        with safe_open(tmp_path / "sharded" / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= LIMIT or len(tensors) == 1, (name, size)   # only a lone oversized tensor may exceed it
        assert all(index["weight_map"][k] == name for k in tensors)
        assert not seen.keys() & tensors.keys()
        seen.update(tensors)
    assert seen.keys() == single.keys() == index["weight_map"].keys()
    for k, t in single.items():
        assert torch.equal(seen[k], t), k
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())

    ids = torch.randint(0, 16384, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval()(ids).logits
              for d in ("single", "sharded")]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_the_checkpoint_gets_the_modes_the_umask_gives(tmp_path, calib_file):
    """OUT is written in a tempfile.mkdtemp folder (mode 0700) and safetensors writes its files 0600: renamed into
    place as they were, a checkpoint was readable by its owner only, not by the account `vllm serve` runs as.
    It gets the modes any new folder and file get from the umask (here 027: 0750 and 0640)."""
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    previous = os.umask(0o027)
    try:
        convert(src, tmp_path / "out", calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=32,
                max_shard_size="300KB")
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert any(name.endswith(".safetensors") for name in modes) and len(modes) > 5, modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (tmp_path / name).is_dir() else 0o640)}
    assert not wrong, wrong
