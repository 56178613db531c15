"""A Qwen3-MoE GGUF source (llama.cpp's `qwen3moe`: every layer sparse, each projection's experts stacked in
one tensor). The independent reference is the transformers folder the file was written from: loaded as the
converter loads it (experts streamed from the cached folder), the source has that folder's weights and
logits exactly, and converting the GGUF gives the same checkpoint (tensors and config: the expert width
transformers does not read from a GGUF included) as converting the folder."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from converter.load import load_source
from converter.pipeline import convert
from tests.gguf_files import write_gguf
from tests.tiny_models import checkpoint_tensors, make_tiny_original


@pytest.mark.parametrize("caching", ["on", "off"])
def test_qwen3_moe_gguf_loads_and_converts_as_its_folder(tmp_path, monkeypatch, calib_file, caching):
    if caching == "off":
        monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    # every layer sparse: a GGUF cannot express Qwen3-MoE's dense layers (mlp_only_layers)
    folder = make_tiny_original(tmp_path / "orig", "qwen3_moe", num_layers=2, seed=3, mlp_only_layers=[])
    gguf = write_gguf(folder, tmp_path / "tiny-moe.F32.gguf")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    source = load_source(gguf, stream_experts=True)
    assert source.arch == "qwen3" and source.config.num_experts == 4 and source.config.mlp_only_layers == []
    x = torch.randint(0, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits
        if source.experts is None:   # read directly: the whole model in memory
            got = source.model(x).logits
        else:                        # the converter's path: experts read from the cached folder per layer
            with source.layer_in_memory(0), source.layer_in_memory(1):
                got = source.model(x).logits
    assert torch.equal(got, want)

    kw = dict(calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=64)
    convert(gguf, tmp_path / "from-gguf", **kw)
    convert(folder, tmp_path / "from-folder", **kw)
    a, b = checkpoint_tensors(tmp_path / "from-gguf"), checkpoint_tensors(tmp_path / "from-folder")
    assert a.keys() == b.keys() and any(".mlp.experts." in k for k in a)
    for k, v in b.items():
        assert torch.equal(a[k], v), k
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("from-gguf", "from-folder")]
    for c in configs:
        c.pop("source_model")   # the path each was converted from
    eps = [c.pop("rms_norm_eps") for c in configs]   # GGUF metadata holds it as a float32
    assert eps[0] == pytest.approx(eps[1], rel=1e-7)
    assert configs[0] == configs[1] and configs[0]["moe_intermediate_size"] == 64


def test_mixtral_gguf_is_refused_by_name(tmp_path):
    """llama.cpp stores Mixtral as arch "llama" with `llama.expert_count`, which transformers' GGUF reader takes
    for a dense Llama: refused before loading, pointing to the safetensors folder (a Llama GGUF's tensors with
    the count in the metadata are enough to show it)."""
    from converter.errors import ConversionError

    folder = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    gguf = write_gguf(folder, tmp_path / "tiny-mixtral.F32.gguf", expert_count=4)
    with pytest.raises(ConversionError, match="a Mixtral GGUF .llama with 4 experts. is not supported"):
        load_source(gguf)
