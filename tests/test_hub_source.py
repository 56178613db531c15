"""Hugging Face Hub repo ids as model arguments (converter/hub.py), read from a local HF cache.

No network: the cache is built here in huggingface_hub's layout (models--NS--NAME/snapshots/<commit>,
refs/main) and every command runs with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at it. The cache
holds two commits of one repo: OLD, a tiny Llama, and NEW (what `main` points to), the same model
with a vocabulary entry more in its config, so its embedding no longer matches its config. Checked:

* `care-convert NS/NAME --revision OLD` writes exactly the tensors that converting the OLD folder by
  path writes, and records the repo id and commit in config.json and care_report.json;
* `care-convert NS/NAME` (no revision) reads `main`, i.e. NEW, and is refused for NEW's shape mismatch;
* a budget above parity is refused from the cached commit's config.json, before torch is imported;
* `care-eval ppl NS/NAME --revision OLD` equals `care-eval ppl <OLD folder>`;
* `care-heal --teacher NS/NAME` loads the commit the checkpoint was converted from (OLD), not `main`, and refuses
  `main` (NEW's config) for a checkpoint converted from OLD's folder, before torch is imported;
* a repo id absent from the cache, an unknown revision, --revision with a local path, and a missing
  relative path exit 2 with one line naming the problem, and write nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import make_tiny_original

ROOT = Path(__file__).resolve().parents[1]
REPO = "care-tests/tiny-llama"
OLD = "0123456789abcdef0123456789abcdef01234567"
NEW = "89abcdef0123456789abcdef0123456789abcdef"
CONVERT_FLAGS = ["--kv-ratio", "0.5", "--rope-dim", "8", "--calib-samples", "4", "--calib-seqlen", "32"]


def _repo_folder(cache: Path) -> Path:
    """huggingface_hub's cache folder of REPO: models--NS--NAME."""
    return cache / f"models--{REPO.replace('/', '--')}"


def _snapshot(cache: Path, folder: Path, commit: str) -> Path:
    snap = _repo_folder(cache) / "snapshots" / commit
    shutil.copytree(folder, snap)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    orig = make_tiny_original(root / "orig", "llama", num_layers=2)
    (orig / "LICENSE").write_text("TINY MODEL LICENSE\n")
    (orig / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\n# tiny\n")
    cache = root / "cache"
    _snapshot(cache, orig, OLD)
    new = _snapshot(cache, orig, NEW)
    cfg = json.loads((new / "config.json").read_text())
    cfg["vocab_size"] += 1
    (new / "config.json").write_text(json.dumps(cfg))
    refs = _repo_folder(cache) / "refs"
    refs.mkdir()
    (refs / "main").write_text(NEW)
    calib = root / "calib.txt"
    calib.write_text("the cache holds one latent vector per token and layer. " * 200)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return root, orig, calib, env


def run(env, module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def refused(proc, tool: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{tool}: error:") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in last, last
    return last


@pytest.fixture(scope="module")
def converted(hub):
    root, orig, calib, env = hub
    by_path, by_id = root / "by_path", root / "by_id"
    for src, out, extra in ((orig, by_path, []), (REPO, by_id, ["--revision", OLD])):
        proc = run(env, "converter.cli", src, out, "--calib", calib, *CONVERT_FLAGS, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return by_path, by_id


def test_convert_by_repo_id_equals_convert_by_path(converted):
    by_path, by_id = converted
    a, b = load_file(by_path / "model.safetensors"), load_file(by_id / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg_id, cfg_path = (json.loads((d / "config.json").read_text()) for d in (by_id, by_path))
    assert (cfg_id["source_model"], cfg_id["source_revision"]) == (REPO, OLD)
    assert cfg_path["source_revision"] is None
    assert {k: v for k, v in cfg_id.items() if not k.startswith("source_")} == \
           {k: v for k, v in cfg_path.items() if not k.startswith("source_")}
    report = json.loads((by_id / "care_report.json").read_text())
    assert (report["source"], report["source_revision"]) == (REPO, OLD)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "LICENSE"):
        assert (by_id / f).read_bytes() == (by_path / f).read_bytes(), f
    # the model card names the repo as base_model only when the source was given as a repo id
    from huggingface_hub import ModelCard

    card_id, card_path = (ModelCard.load(d / "README.md").data for d in (by_id, by_path))
    assert card_id.base_model == REPO and card_path.base_model is None
    assert (card_id.license, card_id.license_name) == (card_path.license, card_path.license_name) \
        == ("other", "tiny-license")


def test_repo_id_without_revision_reads_main(hub, tmp_path):
    root, _, calib, env = hub
    out = tmp_path / "out"
    refused(run(env, "converter.cli", REPO, out, "--calib", calib, *CONVERT_FLAGS),
            "care-convert", "model.embed_tokens.weight")      # NEW's config no longer fits its weights
    assert not out.exists()


def test_a_cached_repo_id_is_checked_from_its_config_before_torch_is_imported(hub, tmp_path):
    """The commit's config.json is read from the local cache (converter/source_checks.py): a budget above the
    source's parity is refused before torch is imported and the model loaded."""
    from tests.cli_run import run_main_alone

    root, _, calib, env = hub
    out = tmp_path / "out"
    proc, torch_imported = run_main_alone("converter.cli", REPO, out, "--calib", calib, "--revision", OLD,
                                          "--kv-width", "65", env=env)
    refused(proc, "care-convert", "--kv-width 65 is above parity", "64 values per token per layer")
    assert not torch_imported and not out.exists()


def test_care_eval_by_repo_id(hub):
    root, orig, calib, env = hub
    results = []
    for spec, extra in ((orig, []), (REPO, ["--revision", OLD])):
        proc = run(env, "converter.eval_cli", "ppl", spec, "--text", calib, "--seqlen", "64",
                   "--max-tokens", "256", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout))
    assert results[0]["ppl"] == results[1]["ppl"] and results[0]["tokens"] == results[1]["tokens"]


def test_heal_teacher_by_repo_id_uses_the_converted_commit(hub, converted, tmp_path):
    root, _, calib, env = hub
    _, by_id = converted
    out = tmp_path / "healed"
    proc = run(env, "converter.heal_cli", by_id, out, "--teacher", REPO, "--text", calib, "--tokens", "256",
               "--seqlen", "32", "--batch-size", "2", "--grad-accum", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]       # `main` (NEW) would be refused
    assert (out / "config.json").is_file()
    missing = tmp_path / "healed_by_missing_teacher"        # the message names the teacher as the missing model
    proc = run(env, "converter.heal_cli", by_id, missing, "--teacher", "care-tests/not-there", "--text", calib,
               "--tokens", "256", "--seqlen", "32", "--no-progress")
    refused(proc, "care-heal", "teacher care-tests/not-there", "local Hugging Face cache")
    assert not missing.exists()


def test_heal_teacher_by_repo_id_at_another_commit_is_refused_before_torch_is_imported(hub, converted, tmp_path):
    """The checkpoint converted from the OLD folder by path records no commit, so `--teacher NS/NAME` means `main`
    (NEW), whose cached config.json has a vocabulary entry more: refused from that file (converter/source_match.py)."""
    from tests.cli_run import run_main_alone

    root, orig, calib, env = hub
    by_path, _ = converted
    vocab = json.loads((orig / "config.json").read_text())["vocab_size"]
    out = tmp_path / "healed"
    proc, torch_imported = run_main_alone("converter.heal_cli", by_path, out, "--teacher", REPO, "--text", calib,
                                          "--tokens", "256", env=env)
    assert refused(proc, "care-heal") == (f"care-heal: error: teacher {REPO} is not the model {by_path} was "
                                          f"converted from: vocab_size {vocab + 1} where the source's was {vocab}")
    assert not torch_imported and not out.exists()


@pytest.mark.parametrize("case", ["not_cached", "unknown_revision", "revision_with_local_path",
                                  "missing_relative_path"])
def test_bad_model_arguments_exit_2(hub, tmp_path, case):
    root, orig, calib, env = hub
    out = tmp_path / "out"
    src, extra, needles = {
        "not_cached": ("care-tests/not-there", [], ["care-tests/not-there", "local Hugging Face cache",
                                                   "HF_HUB_OFFLINE"]),
        "unknown_revision": (REPO, ["--revision", "v9"], [f"{REPO}@v9"]),
        "revision_with_local_path": (orig, ["--revision", OLD], ["local path", "--revision"]),
        "missing_relative_path": ("./no/such-model", [], ["./no/such-model", "no such file or folder"]),
    }[case]
    refused(run(env, "converter.cli", src, out, "--calib", calib, *extra), "care-convert", *needles)
    assert not out.exists()
    refused(run(env, "converter.eval_cli", "ppl", src, "--text", calib, *extra), "care-eval", *needles[:1])
