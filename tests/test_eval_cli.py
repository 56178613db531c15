"""care-eval ppl: the printed perplexity equals exp(mean CE) computed here independently with the
plain transformers model, for original and converted (care_mla) folders; bad inputs exit 2 with a
message and no traceback."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from converter.eval_cli import main, perplexity
from tests.cli_run import run_main_alone
from tests.gguf_files import write_gguf
from tests.tiny_models import TOKENIZER_FILES, TOKENIZER_SRC, damaged_copy, make_tiny_original, require_shared

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model cache attention key value rope layer latent rank token query head of and to in a "
         "is that for it as was with be by on not this are or from").split()


def _prose(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return make_tiny_original(tmp_path_factory.mktemp("eval") / "orig", "llama", num_layers=2)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    (d / "a.txt").write_text(_prose(0, 400))
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": _prose(s, 60)}) for s in (1, 2)) + "\n")
    (d / "empty.txt").write_text("  \n")
    (d / "bad.jsonl").write_text('{"body": "no text field"}\n')
    return {p.stem if p.suffix == ".txt" else p.name: p for p in d.iterdir()}


def independent_ppl(folder: Path, docs: list[str], seqlen: int, max_tokens: int | None) -> tuple[float, int]:
    """exp(mean CE) with the plain transformers model, windows built by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens] if max_tokens else ids
    n = max(1, len(ids) // seqlen)
    windows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]
    losses = []
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            losses.append(F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="none"))
    return math.exp(torch.cat(losses).mean().item()), n


def run_main(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_ppl_of_original_model_matches_independent_computation(original, texts, capsys):
    code, res, _ = run_main(capsys, "ppl", str(original), "--text", str(texts["a"]), "--seqlen", "64",
                            "--max-tokens", "300", "--batch-size", "2")
    assert code == 0
    ref, n = independent_ppl(original, [texts["a"].read_text()], 64, 300)
    assert res["windows"] == n == 300 // 64 and res["seqlen"] == 64
    assert res["input_tokens"] == n * 64 and res["tokens"] == n * 63  # tokens = scored tokens
    assert res["model"] == str(original)
    assert math.isclose(res["ppl"], ref, rel_tol=1e-5)


def test_txt_and_jsonl_documents_are_joined(original, texts, capsys):
    code, res, _ = run_main(capsys, "ppl", str(original), "--text", str(texts["a"]), str(texts["b.jsonl"]),
                            "--seqlen", "128")
    assert code == 0
    docs = [texts["a"].read_text()] + [json.loads(l)["text"] for l in texts["b.jsonl"].read_text().splitlines()]
    ref, n = independent_ppl(original, docs, 128, None)
    assert res["windows"] == n and math.isclose(res["ppl"], ref, rel_tol=1e-5)


def test_short_text_is_one_partial_window(original, texts, capsys):
    code, res, _ = run_main(capsys, "ppl", str(original), "--text", str(texts["a"]), "--seqlen", "1024",
                            "--max-tokens", "50")
    assert code == 0 and res["windows"] == 1 and res["tokens"] == 49
    ref, _ = independent_ppl(original, [texts["a"].read_text()], 1024, 50)
    assert math.isclose(res["ppl"], ref, rel_tol=1e-5)


def test_converted_care_mla_folder_and_python_api(tmp_path, texts):
    """A care_mla folder resolves through model_defs; perplexity() agrees with a hand computation."""
    from tests.test_model_defs import tiny_model

    require_shared(TOKENIZER_SRC)
    model = tiny_model("qwen3", seed=2, vocab_size=16384)
    model.save_pretrained(tmp_path / "mla")
    for f in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SRC / f, tmp_path / "mla" / f)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "mla")
    res = perplexity(model, tok, [texts["a"].read_text()], seqlen=32, max_tokens=100, device="cpu", batch_size=3)
    ref, n = independent_ppl(tmp_path / "mla", [texts["a"].read_text()], 32, 100)
    assert res["windows"] == n == 3 and math.isclose(res["ppl"], ref, rel_tol=1e-5)


def test_console_script_prints_only_json_on_stdout(original, texts):
    res = subprocess.run([sys.executable, "-m", "converter.eval_cli", "ppl", str(original), "--text",
                          str(texts["a"]), "--seqlen", "32", "--max-tokens", "96"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert set(out) >= {"ppl", "tokens", "seqlen", "windows", "model"} and out["windows"] == 3


def _unknown_model(tmp_path: Path) -> Path:
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    return d


@pytest.mark.parametrize("how, needle", [
    ("missing_tensor", "no tensor in its files for model.layers.1."),
    ("wrong_shape", "cannot load the model"),
    ("truncated", "cannot load the model"),
])
def test_a_damaged_checkpoint_is_refused_not_measured(how, needle, original, converted_half, texts, tmp_path, capsys):
    """transformers fills a tensor the files lack with random values and only logs it: care-eval reported a
    perplexity and a KL for such a partly random model, exit 0. Unreadable files gave a traceback. Both are one
    line and exit 2 now, for the original (ppl) and the converted model (compare)."""
    bad_original = damaged_copy(original, tmp_path / "orig", how)
    code, _, err = run_main(capsys, "ppl", str(bad_original), "--text", str(texts["a"]), "--max-tokens", "64")
    assert code == 2 and needle in err and "Traceback" not in err, err
    bad_converted = damaged_copy(converted_half, tmp_path / "conv", how)
    code, _, err = run_main(capsys, "compare", str(original), str(bad_converted), "--text", str(texts["a"]),
                            "--max-tokens", "64", "--seqlen", "32")
    assert code == 2 and needle in err and str(bad_converted) in err and "Traceback" not in err, err


@pytest.mark.parametrize("case, needle", [
    ("missing_text", "text file not found"),
    ("empty_text", "text is empty"),
    ("bad_jsonl", "\"text\" field"),
    ("missing_model", "no config.json"),
    ("missing_gguf", "GGUF file not found"),
    ("unknown_model_type", "no_such_model_type"),
])
def test_errors_exit_2_with_a_message(case, needle, original, texts, tmp_path, capsys):
    model, text = str(original), str(texts["a"])
    if case == "missing_text":
        text = str(tmp_path / "nope.txt")
    elif case == "empty_text":
        text = str(texts["empty"])
    elif case == "bad_jsonl":
        text = str(texts["bad.jsonl"])
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "missing_gguf":
        model = str(tmp_path / "m.Q8_0.gguf")
    elif case == "unknown_model_type":
        model = str(_unknown_model(tmp_path))
    code, _, err = run_main(capsys, "ppl", model, "--text", text)
    assert code == 2
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["ppl", "compare"])
def test_a_mistyped_model_is_refused_before_torch_is_imported(command, original, texts, tmp_path):
    """Models are located (eval_cli.locate_model) before anything loads: a mistyped path, here `compare`'s ORIGINAL
    named after a valid CONVERTED, is answered at once by a process that never imported torch."""
    missing = str(tmp_path / "no_model")
    models = [missing] if command == "ppl" else [missing, str(original)]
    proc, torch_imported = run_main_alone("converter.eval_cli", command, *models, "--text", texts["a"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        f"care-eval: error: not a model folder (no config.json) or .gguf file: {missing}"
    assert not torch_imported


def test_a_bad_seqlen_is_refused_before_torch_is_imported(original, texts):
    """(It was refused by make_windows, once the model had loaded.)"""
    proc, torch_imported = run_main_alone("converter.eval_cli", "ppl", str(original), "--text", texts["a"],
                                          "--seqlen", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "care-eval: error: --seqlen must be >= 2, got 1"
    assert not torch_imported


@pytest.mark.parametrize("caching", ["on", "off"])
def test_gguf_file_gives_the_same_ppl_as_its_source(tmp_path, texts, capsys, monkeypatch, caching):
    """Read through its dequantized cache folder (converter/gguf_cache.py) or directly."""
    if caching == "off":
        monkeypatch.setenv("CARE_VLLM_CACHE", "off")
    # head_dim 32: transformers' Qwen3 GGUF reader takes Qwen3's 128; converter/gguf_meta.py reads the file's
    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32)
    write_gguf(src, tmp_path / "tiny.F32.gguf")
    args = ["--text", str(texts["a"]), "--seqlen", "48", "--max-tokens", "150"]
    code, from_gguf, err = run_main(capsys, "ppl", str(tmp_path / "tiny.F32.gguf"), *args)
    assert code == 0, err
    code, from_folder, _ = run_main(capsys, "ppl", str(src), *args)
    assert code == 0
    assert from_gguf["windows"] == from_folder["windows"] == 3
    assert math.isclose(from_gguf["nll"], from_folder["nll"], rel_tol=1e-5)


# ---------------------------------------------------------------- care-eval compare

def independent_comparison(original: Path, converted: Path, docs: list[str], seqlen: int,
                           max_tokens: int) -> dict:
    """Both perplexities, mean KL(original || converted) and top-1 agreement over the scored tokens,
    with the plain transformers models and windows built by hand."""
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(original)
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(len(ids) // seqlen)]
    x = torch.tensor(windows)
    with torch.no_grad():
        p, q = (torch.log_softmax(AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()(x).logits[:, :-1]
                                  .double(), -1) for f in (original, converted))
    target = x[:, 1:, None]
    return {"original": math.exp(-p.gather(-1, target).mean().item()),
            "converted": math.exp(-q.gather(-1, target).mean().item()),
            "kl": (p.exp() * (p - q)).sum(-1).mean().item(),
            "top1": (p.argmax(-1) == q.argmax(-1)).double().mean().item(), "tokens": target.numel()}


@pytest.fixture(scope="module")
def converted_half(original, tmp_path_factory, calib_file) -> Path:
    from converter.pipeline import convert

    out = tmp_path_factory.mktemp("eval_conv") / "kv0.5"
    convert(original, out, calib_files=[calib_file], kv_ratio=0.5, calib_samples=4, calib_seqlen=32)
    return out


def test_compare_matches_independent_computation(original, converted_half, texts, capsys):
    code, res, _ = run_main(capsys, "compare", str(original), str(converted_half), "--text", str(texts["a"]),
                            "--seqlen", "64", "--max-tokens", "300", "--batch-size", "2")
    assert code == 0
    ref = independent_comparison(original, converted_half, [texts["a"].read_text()], 64, 300)
    assert res["windows"] == 300 // 64 and res["tokens"] == ref["tokens"] == res["windows"] * 63
    assert math.isclose(res["original"]["ppl"], ref["original"], rel_tol=1e-5)
    assert math.isclose(res["converted"]["ppl"], ref["converted"], rel_tol=1e-5)
    assert math.isclose(res["kl"], ref["kl"], rel_tol=1e-4) and res["kl"] > 1e-3   # KV 0.5 is not exact
    assert math.isclose(res["top1_agreement"], ref["top1"], abs_tol=1e-9)
    assert math.isclose(res["ppl_ratio"], ref["converted"] / ref["original"], rel_tol=1e-5)
    # and the same perplexities as `care-eval ppl` of each model alone
    for key, folder in (("original", original), ("converted", converted_half)):
        code, alone, _ = run_main(capsys, "ppl", str(folder), "--text", str(texts["a"]), "--seqlen", "64",
                                  "--max-tokens", "300")
        assert math.isclose(alone["ppl"], res[key]["ppl"], rel_tol=1e-5), key


def test_compare_a_model_with_itself_is_zero_kl_full_agreement(original, texts, capsys):
    code, res, _ = run_main(capsys, "compare", str(original), str(original), "--text", str(texts["a"]),
                            "--seqlen", "64", "--max-tokens", "200")
    assert code == 0 and abs(res["kl"]) < 1e-9 and res["top1_agreement"] == 1.0 and res["ppl_ratio"] == 1.0


def test_compare_refuses_a_model_of_another_vocabulary(original, texts, tmp_path, capsys):
    """A care_mla checkpoint converted from another model is refused by the shape its config.json records for its
    source (tests/test_source_match.py has the rest); two models that are not conversions, by their vocabularies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_model_defs import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", seed=3, vocab_size=8192).save_pretrained(other)
    plain = tmp_path / "plain"
    LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(plain)
    for folder in (other, plain):
        for f in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_SRC / f, folder / f)
    code, _, err = run_main(capsys, "compare", str(original), str(other), "--text", str(texts["a"]))
    assert code == 2 and "Traceback" not in err
    assert f"ORIGINAL {original} is not the model {other} was converted from: " in err
    assert "vocab_size 16384 where the source's was 8192" in err
    code, _, err = run_main(capsys, "compare", str(original), str(plain), "--text", str(texts["a"]))
    assert code == 2 and "vocabulary sizes differ" in err and "Traceback" not in err
