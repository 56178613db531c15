"""What a converted folder carries for publishing it: the source's licence files (byte for byte), a model
card (README.md) whose metadata keeps the source's licence and whose KV numbers are those of the
checkpoint, computed here from the source's and the output's config.json (independent of the report)."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from converter.pipeline import convert
from tests.tiny_models import make_tiny_original

SOURCE_CARD = """---
license: llama3.1
language:
- en
- de
base_model: meta-llama/Llama-3.1-8B
---
# The tiny source's own card
"""
LICENCE_FILES = {"LICENSE": "TINY COMMUNITY LICENSE AGREEMENT\n", "USE_POLICY.md": "# Acceptable use\n",
                 "NOTICE.txt": "Copyright the tiny authors\n"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("card")
    src = make_tiny_original(root / "orig", "llama", num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    (src / "README.md").write_text(SOURCE_CARD)
    for name, text in LICENCE_FILES.items():
        (src / name).write_text(text)
    out = root / "tiny-care-kv0.5"
    convert(src, out, calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=32)
    return src, out


def test_licence_files_are_copied_verbatim(converted):
    src, out = converted
    for name in LICENCE_FILES:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_card_keeps_the_source_licence_and_states_the_cache(converted):
    src, out = converted
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "llama3.1" and card.data.language == ["en", "de"]
    # a local source: no Hub id to name (the source's own base_model is its parent, not ours)
    assert card.data.base_model is None
    assert {"care-mla", "vllm"} <= set(card.data.tags) and card.data.library_name == "transformers"
    cfg, src_cfg = (json.loads((d / "config.json").read_text()) for d in (out, src))
    original = src_cfg["num_hidden_layers"] * 2 * src_cfg["num_key_value_heads"] * 16
    ours = sum(cfg["k_ranks"]) + sum(cfg["v_ranks"]) + cfg["num_hidden_layers"] * cfg["qk_rope_head_dim"]
    assert ours <= original // 2
    assert f"| {original:,} values | {ours:,} values ({ours / original:.2f}x) |" in card.text
    assert card.text.lstrip().startswith(f"# {out.name}\n")
    assert f"vllm serve path/to/{out.name}" in card.text
    for name in LICENCE_FILES:
        assert f"`{name}`" in card.text
    assert str(src.parent) not in card.text          # no local paths in a card meant for publishing


def test_the_output_names_the_software_that_wrote_it(converted):
    """config.json, care_report.json and the card name the care-vllm that wrote the checkpoint (for a bug report on
    a checkpoint made elsewhere), and the report the torch and transformers it ran with. References: the version
    pyproject.toml declares and the modules' own __version__."""
    import tomllib

    import torch
    import transformers

    from tests.vllm_server import ROOT

    _, out = converted
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    cfg, report = (json.loads((out / name).read_text()) for name in ("config.json", "care_report.json"))
    assert cfg["care_vllm_version"] == declared
    assert report["versions"] == {"care-vllm": declared, "torch": torch.__version__,
                                  "transformers": transformers.__version__}
    assert f"with care-vllm {declared}." in " ".join(ModelCard.load(out / "README.md").text.split())


def test_source_readme_without_metadata_gives_a_card_without_licence(tmp_path, calib_file):
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=2)
    (src / "README.md").write_text("# Just prose, no YAML header\n")
    convert(src, tmp_path / "out", calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=32)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license is None
    assert not list((tmp_path / "out").glob("LICENSE*"))
