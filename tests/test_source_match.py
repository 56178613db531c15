"""The original a converted checkpoint is healed towards (care-heal --teacher) or measured against (care-eval
compare, care-bench ORIGINAL) must be the model it was converted from (converter/source_match.py). A model of the
same family and vocabulary but another size is refused by each tool, from the files before torch is imported
(or a GGUF dequantized, or a server started), and, where those cannot be read up front, from the loaded config.
The shapes compared are checked against transformers' own configs of the originals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from converter.pipeline import convert
from converter.source_checks import gguf_config
from converter.source_match import FIELDS, recorded_source, shape_of_config, shape_of_json, stored_mismatch
from tests.cli_run import run_main_alone
from tests.tiny_models import make_tiny_original

ARCHS = ["llama", "mistral", "phi3", "granite", "mixtral", "qwen2", "qwen3", "qwen3_moe"]
PLAIN_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _convert(src: Path, out: Path, calib: Path) -> dict:
    convert(src, out, calib_files=[calib], kv_ratio=0.5, calib_samples=4, calib_seqlen=32, o_proj_refit=False)
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_conversion_records_its_sources_shape(tmp_path, calib_file, arch):
    """What the converted config.json records is the loaded original's shape (transformers' config), and what the
    original's config.json gives (every field: the tiny models store them all)."""
    src = make_tiny_original(tmp_path / "orig", arch, num_layers=2, hidden=96, heads=6, kv_heads=2, head_dim=16)
    recorded = recorded_source(_convert(src, tmp_path / "conv", calib_file))
    loaded = shape_of_config(AutoConfig.from_pretrained(src))
    assert recorded == loaded == shape_of_json(json.loads((src / "config.json").read_text()))
    assert loaded == {"num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
                      "head_dim": 16, "vocab_size": loaded["vocab_size"], "architecture": loaded["architecture"]}
    assert loaded["architecture"] == json.loads((src / "config.json").read_text())["architectures"][0]


def test_a_gguf_sources_metadata_gives_the_recorded_shape(tmp_path, calib_file):
    from tests.gguf_files import write_gguf

    folder = make_tiny_original(tmp_path / "orig", "llama", num_layers=2, rope=PLAIN_ROPE)
    gguf = write_gguf(folder, tmp_path / "orig.gguf")
    metadata = shape_of_json(gguf_config(gguf))   # read before the conversion builds its cache folder
    recorded = recorded_source(_convert(gguf, tmp_path / "conv", calib_file))
    assert metadata == recorded == shape_of_config(AutoConfig.from_pretrained(folder))


def test_gguf_metadata_is_read_again_when_the_file_changes(tmp_path):
    """gguf_config remembers a file's metadata (care-heal reads its teacher's twice): a file rewritten in place
    with another model is read anew, and the dict returned is the caller's own."""
    from tests.gguf_files import write_gguf

    gguf = tmp_path / "model.gguf"
    write_gguf(make_tiny_original(tmp_path / "two", "llama", num_layers=2, rope=PLAIN_ROPE), gguf)
    first = gguf_config(gguf)
    first["num_hidden_layers"] = None   # (a caller's edit must not reach the remembered copy)
    assert gguf_config(gguf)["num_hidden_layers"] == 2
    write_gguf(make_tiny_original(tmp_path / "three", "llama", num_layers=3, rope=PLAIN_ROPE), gguf)
    assert gguf_config(gguf)["num_hidden_layers"] == 3


@pytest.mark.parametrize("model_type", ARCHS)
def test_fields_a_config_json_leaves_out_are_not_compared(tmp_path, model_type):
    """A field config.json leaves to the config class's default is None (not compared before loading); every
    field read equals transformers' value."""
    raw = {"model_type": model_type, "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
           "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    read, loaded = shape_of_json(raw), shape_of_config(AutoConfig.from_pretrained(tmp_path))
    assert read["num_key_value_heads"] is None and read["head_dim"] is None   # (no num_key_value_heads stored)
    assert all(read[f] == loaded[f] for f in FIELDS if read[f] is not None)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama, its conversion, and models of the same vocabulary that it was not converted from: one more
    layer; wider; another KV-head count at the same width; also as a GGUF."""
    from tests.gguf_files import write_gguf

    root = tmp_path_factory.mktemp("family")
    calib = root / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    orig = make_tiny_original(root / "orig", "llama", num_layers=2, rope=PLAIN_ROPE)
    conv = root / "conv"
    _convert(orig, conv, calib)
    others = {"deeper": make_tiny_original(root / "deeper", "llama", num_layers=3, rope=PLAIN_ROPE),
              "wider": make_tiny_original(root / "wider", "llama", num_layers=2, hidden=96, heads=6,
                                          rope=PLAIN_ROPE),
              "kv_heads": make_tiny_original(root / "kv_heads", "llama", num_layers=2, kv_heads=4, rope=PLAIN_ROPE)}
    others["gguf"] = write_gguf(others["deeper"], root / "deeper.gguf")
    # (same shape, other attention: was accepted, care-eval compare reporting KL 5.9 against it)
    others["qwen3"] = make_tiny_original(root / "qwen3", "qwen3", num_layers=2, rope=PLAIN_ROPE)
    return root, orig, conv, calib, others


EXPECTED = {"deeper": "num_hidden_layers 3 where the source's was 2",
            "wider": "hidden_size 96 where the source's was 64; num_attention_heads 6 where the source's was 4",
            "kv_heads": "num_key_value_heads 4 where the source's was 2",
            "qwen3": "architecture Qwen3ForCausalLM (qwen3 attention) where the source's was LlamaForCausalLM (llama "
                     "attention)",
            "gguf": "num_hidden_layers 3 where the source's was 2"}


def test_only_the_source_matches(family):
    root, orig, conv, _, others = family
    cfg = json.loads((conv / "config.json").read_text())
    assert stored_mismatch(cfg, orig, role="ORIGINAL", converted_name="c") is None
    for name, path in others.items():
        problem = stored_mismatch(cfg, path, role="ORIGINAL", converted_name="c")
        assert problem == f"ORIGINAL {path} is not the model c was converted from: {EXPECTED[name]}", problem
    # a GQA checkpoint named as CONVERTED records no source: nothing to compare (care-eval compares any two)
    assert stored_mismatch(json.loads((orig / "config.json").read_text()), others["deeper"], role="ORIGINAL",
                           converted_name="c") is None


@pytest.mark.parametrize("other", ["deeper", "kv_heads", "gguf", "qwen3"])
def test_each_tool_refuses_another_original_before_importing_torch(family, tmp_path, other):
    """care-heal, care-eval compare and care-bench, each in a process of its own: exit 2, one line naming the
    model and the fields, torch never imported, nothing written (a GGUF not dequantized into the cache)."""
    from converter import gguf_cache

    root, _, conv, calib, others = family
    bad = others[other]
    expected = f"is not the model {conv} was converted from: {EXPECTED[other]}"
    runs = {"care-heal": ("converter.heal_cli", conv, tmp_path / "healed", "--teacher", bad, "--text", calib,
                          "--tokens", "64"),
            "care-eval": ("converter.eval_cli", "compare", bad, conv, "--text", calib),
            "care-bench": ("care_vllm.loadtest.cli", bad, conv, tmp_path / "report")}
    role = {"care-heal": "teacher", "care-eval": "ORIGINAL", "care-bench": "ORIGINAL"}
    for prog, (module, *args) in runs.items():
        proc, torch_imported = run_main_alone(module, *args)
        assert proc.returncode == 2, (prog, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1] == f"{prog}: error: {role[prog]} {bad} {expected}", prog
        assert not torch_imported, prog
    assert not (tmp_path / "healed").exists() and not (tmp_path / "report").exists()
    if other == "gguf":
        assert not gguf_cache.folder_for(bad, gguf_cache.cache_root()).exists()


def test_the_original_and_the_conversion_given_the_other_way_round_are_refused(family, tmp_path):
    """care-eval compare and care-bench with CONVERTED first: refused before torch is imported. Two conversions (a
    checkpoint and its healed copy) may still be compared."""
    root, orig, conv, calib, _ = family
    for prog, module, extra in (("care-eval", "converter.eval_cli", ("--text", calib)),
                                ("care-bench", "care_vllm.loadtest.cli", (tmp_path / "report",))):
        args = ("compare", conv, orig, *extra) if prog == "care-eval" else (conv, orig, *extra)
        proc, torch_imported = run_main_alone(module, *args)
        assert proc.returncode == 2 and not torch_imported, (prog, proc.stderr[-2000:])
        assert proc.stderr.strip().splitlines()[-1] == (f"{prog}: error: ORIGINAL {conv} is a converted care_mla "
                                                        f"checkpoint and {orig} is not: the GQA original comes first")
    assert not (tmp_path / "report").exists()
    cfg = json.loads((conv / "config.json").read_text())
    assert stored_mismatch(cfg, conv, role="ORIGINAL", converted_name="c") is None


def test_the_loaded_original_is_checked_where_its_files_cannot_be_read_first(family, tmp_path, monkeypatch, capsys):
    """As for a repo id not in the local cache: the refusal comes once the original has loaded, with the same
    message, before care-heal trains or care-eval compares anything."""
    from converter import eval_cli, heal_cli, source_checks, source_match

    root, _, conv, calib, others = family
    monkeypatch.setattr(source_match, "source_config", lambda *a, **k: None)
    monkeypatch.setattr(source_checks, "source_config", lambda *a, **k: None)
    bad = others["kv_heads"]
    expected = f"is not the model {conv} was converted from: {EXPECTED['kv_heads']}"
    out = tmp_path / "healed"
    assert heal_cli.main([str(conv), str(out), "--teacher", str(bad), "--text", str(calib), "--tokens", "64",
                          "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"care-heal: error: teacher {bad} {expected}"
    assert not out.exists() and not (tmp_path / "healed.partial").exists()
    assert eval_cli.main(["compare", str(bad), str(conv), "--text", str(calib)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"care-eval: error: ORIGINAL {bad} {expected}"
