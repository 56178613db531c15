"""Bad input -> one clear line naming the problem, exit code 2, and no OUT on disk.

Runs `care-convert`'s entry point, converter.cli.main, with its argv: in this process (each subprocess
would pay ~8 s of importing torch and transformers), except where the process boundary is what is
tested (what is refused before torch is imported: tests/cli_run.py run_main_alone; two separate runs writing
identical bytes; Ctrl-C).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.cli_run import assert_refused_by, frozen, run_main, run_main_alone
from tests.tiny_models import make_tiny_original

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    src = make_tiny_original(root / "orig", "llama", num_layers=2)
    calib = root / "calib.txt"
    calib.write_text("a few words of calibration text, repeated. " * 200)
    return root, src, calib


def run_convert(*args) -> subprocess.CompletedProcess:
    """`care-convert ARGS` in this process (tests/cli_run.py)."""
    from converter.cli import main

    return run_main(main, "care-convert", *args)


def run_convert_process(*args) -> subprocess.CompletedProcess:
    """`python -m converter.cli ARGS` as its own process."""
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc, out: Path, *needles: str):
    assert_refused_by("care-convert", proc, out, *needles)


def test_unsupported_architecture(tiny, tmp_path):
    """Refused from config.json before torch is imported (converter/source_checks.py), and by load_source, which
    the Python API and every source whose config.json cannot be read up front go through."""
    from converter.errors import ConversionError
    from converter.load import load_source

    _, src, calib = tiny
    bad = tmp_path / "gpt2"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc, torch_imported = run_main_alone("converter.cli", bad, out, "--calib", calib)
    assert_refused(proc, out, "unsupported architecture", "GPT2LMHeadModel")
    assert not torch_imported
    with pytest.raises(ConversionError, match=f"^{bad}: unsupported architecture 'GPT2LMHeadModel'; care-convert "
                                              "supports LlamaForCausalLM, "):
        load_source(bad)


def test_a_converted_checkpoint_is_not_a_source(tiny, tmp_path):
    from converter.errors import ConversionError
    from converter.load import load_source

    _, src, calib = tiny
    once = tmp_path / "once"
    assert run_convert(src, once, "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "32",
                       "--kv-ratio", "0.5").returncode == 0
    assert json.loads((once / "care_report.json").read_text())["source"] == str(src)
    out = tmp_path / "twice"
    assert_refused(run_convert(once, out, "--calib", calib), out, "already a care-convert output",
                   "care_report.json's \"source\"")
    with pytest.raises(ConversionError, match="already a care-convert output"):   # the Python API's check
        load_source(once)


def test_position_dependent_rope_scaling(tiny, tmp_path):
    """Dynamic NTK changes the frequencies with the sequence length: no fixed rope key can keep them."""
    _, src, calib = tiny
    bad = tmp_path / "dynamic"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib), out, "rope_type 'dynamic' is not supported",
                   "default, linear, llama3, yarn")


@pytest.mark.parametrize("change, needles", [
    ({"sliding_window": 47}, ("sliding-window attention is not supported", "sliding_window=47")),   # Phi-3-*-4k
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
     ("partial rotary embeddings are not supported", "partial_rotary_factor=0.75")),                 # Phi-4-mini
], ids=["sliding_window", "partial_rotary"])
def test_phi3_that_llama_cannot_express(tmp_path, change, needles):
    """Phi-3 converts as the Llama it is (converter/phi3.py) only where a Llama layer computes its forward."""
    src = make_tiny_original(tmp_path / "orig", "phi3", num_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    calib = tmp_path / "calib.txt"
    calib.write_text("a few words of calibration text, repeated. " * 200)
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib), out, *needles)


def test_mlp_activation_other_than_silu(tiny, tmp_path):
    """The converted MLP is SiLU-gated (CareMLAConfig, the plugin's CareMLP): any other source activation is
    refused at load, for every architecture (not after calibration, by the converted config)."""
    _, src, calib = tiny
    bad = tmp_path / "gelu"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_pytorch_tanh"}))
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib), out, "hidden_act 'gelu_pytorch_tanh' is not supported")


def test_mistral_with_a_sliding_window(tmp_path):
    """Mistral-7B-v0.1's 4096-token window (v0.3 and Nemo have none and convert as Llama)."""
    src = make_tiny_original(tmp_path / "orig", "mistral", num_layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = 512
    (src / "config.json").write_text(json.dumps(cfg))
    calib = tmp_path / "calib.txt"
    calib.write_text("a few words of calibration text, repeated. " * 200)
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib), out, "sliding-window attention is not supported",
                   "sliding_window=512")


def test_missing_tensor(tiny, tmp_path):
    _, src, calib = tiny
    bad = tmp_path / "missing"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib), out, "missing tensor",
                   "model.layers.1.self_attn.v_proj.weight")


def test_wrong_shape(tiny, tmp_path):
    _, src, calib = tiny
    bad = tmp_path / "shape"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib), out, "model.layers.0.self_attn.k_proj.weight", "shape")


def test_pickled_weights_are_refused_with_the_way_to_safetensors(tiny, tmp_path):
    """A folder with pytorch_model.bin only (older Hub repos): refused, saying how to re-save it; the re-saved
    folder converts."""
    import torch
    from transformers import AutoModelForCausalLM

    _, src, calib = tiny
    bad = tmp_path / "pickled"
    shutil.copytree(src, bad)
    torch.save(load_file(str(bad / "model.safetensors")), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib), out, "no *.safetensors files", "pytorch_model.bin",
                   "AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(NEW)")
    resaved = tmp_path / "resaved"
    AutoModelForCausalLM.from_pretrained(bad).save_pretrained(resaved)
    for f in src.iterdir():   # (the tokenizer files, as a user would copy them)
        if not (resaved / f.name).exists():
            shutil.copy(f, resaved / f.name)
    proc = run_convert(resaved, out, "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_moe_expert_tensors_checked_per_expert(tiny, tmp_path):
    """A Qwen3-MoE source stores its experts per expert (as on the Hub): one missing or mis-shaped
    expert tensor is named, although transformers would fuse the rest into one 3-D tensor."""
    root, _, calib = tiny
    src = make_tiny_original(tmp_path / "moe", "qwen3_moe", num_layers=2)
    tensors = load_file(str(src / "model.safetensors"))
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in tensors    # the per-expert layout
    del tensors["model.layers.0.mlp.experts.3.down_proj.weight"]
    tensors["model.layers.0.mlp.experts.1.up_proj.weight"] = tensors["model.layers.0.mlp.experts.1.up_proj.weight"][1:]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib), out, "missing tensor",
                   "model.layers.0.mlp.experts.3.down_proj.weight")
    tensors["model.layers.0.mlp.experts.3.down_proj.weight"] = tensors["model.layers.0.mlp.experts.2.down_proj.weight"].clone()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(run_convert(src, out, "--calib", calib), out, "model.layers.0.mlp.experts.1.up_proj.weight",
                   "shape")


def test_mixtral_tensors_are_named_as_its_files_name_them(tmp_path):
    """A Mixtral checkpoint in the Hub's names (block_sparse_moe.experts.{e}.w1/w2/w3): a missing or mis-shaped
    expert tensor, and a missing router, are named as the files name them, not as transformers renames them."""
    from converter.errors import ConversionError
    from converter.load import load_source

    src = make_tiny_original(tmp_path / "mixtral", "mixtral", num_layers=2)
    f = src / "model.safetensors"
    tensors = load_file(str(f))
    save = dict(tensors)
    del save["model.layers.1.block_sparse_moe.experts.2.w3.weight"], save["model.layers.0.block_sparse_moe.gate.weight"]
    save_file(save, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) model\.layers\.0\.block_sparse_moe\.gate\.weight, "
                                              r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight$"):
        load_source(src)
    save = dict(tensors)
    save["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = tensors["model.layers.0.block_sparse_moe.experts.1.w2.weight"][1:]
    save_file(save, str(f), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.0\.block_sparse_moe\.experts\.1\.w2\.weight has shape"):
        load_source(src)


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_calibration_text(tiny, tmp_path, content):
    _, src, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", empty), out, "calibration text is empty")


def test_calibration_files_that_are_not_text_are_refused(tiny, tmp_path):
    """A gzip file or random bytes were calibrated on as replacement characters, with exit 0; a stray Latin-1
    byte in a text still reads (as U+FFFD)."""
    import gzip
    import random

    _, src, calib = tiny
    out = tmp_path / "out"
    packed = tmp_path / "calib.txt.gz"
    packed.write_bytes(gzip.compress(Path(calib).read_bytes()))
    assert_refused(run_convert(src, out, "--calib", packed), out, f"{packed}: not UTF-8 text")
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(4000)))
    assert_refused(run_convert(src, out, "--calib", noise), out, f"{noise}: not UTF-8 text", "bytes that are not")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 " + Path(calib).read_bytes())
    assert run_convert(src, out, "--calib", latin, "--calib-samples", "2", "--calib-seqlen", "32").returncode == 0


@pytest.mark.parametrize("case", ["no_tokenizer", "zero_kv_heads", "heads_not_a_multiple", "seed"])
def test_a_source_or_seed_that_failed_with_a_traceback_is_refused(tiny, tmp_path, case):
    _, src, calib = tiny
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    extra, needle = [], {"no_tokenizer": "cannot load its tokenizer",
                         "zero_kv_heads": "config.json's num_key_value_heads must be a positive integer (got 0)",
                         "heads_not_a_multiple": "is not a multiple of num_key_value_heads 3",
                         "seed": "--seed must be in [0, 2**63)"}[case]
    if case == "no_tokenizer":
        for f in bad.glob("tokenizer*"):
            f.unlink()
    elif case == "zero_kv_heads":
        cfg["num_key_value_heads"] = 0
    elif case == "heads_not_a_multiple":
        cfg["num_key_value_heads"] = 3
    else:
        extra = ["--seed", str(10**20)]
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_refused(run_convert(bad, out, "--calib", calib, *extra), out, needle)


def test_missing_calibration_file(tiny, tmp_path):
    _, src, _ = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", tmp_path / "nope.txt"), out, "not found", "nope.txt")
    assert_refused(run_convert(src, out, "--calib", tmp_path), out, f"{tmp_path} is a folder: name its files")
    assert_refused(run_convert(src, out, "--calib", "/dev/null"), out,
                   "calibration text /dev/null is not a regular file (a device, pipe or socket)")


@pytest.mark.parametrize("case", ["missing_source", "revision_with_local_path", "missing_calib", "calib_folder",
                                  "kv_ratio_above_parity", "k_share_with_joint_latent", "shard_size"])
def test_what_needs_no_model_is_refused_before_torch_is_imported(tiny, tmp_path, case):
    """The paths and the options are checked first (converter/cli.py check_paths, converter/options.py), so a typo
    is answered without the ~5 s of importing torch and transformers: the process that refuses it never imported
    torch."""
    _, src, calib = tiny
    args, needles = {
        "missing_source": ([tmp_path / "no-such-model", "--calib", calib], ["no-such-model", "no such file or folder"]),
        "revision_with_local_path": ([src, "--calib", calib, "--revision", "v1"], ["--revision v1", "local path"]),
        "missing_calib": ([src, "--calib", calib, tmp_path / "nope.txt"], ["not found", "nope.txt"]),
        "calib_folder": ([src, "--calib", tmp_path], [f"{tmp_path} is a folder: name its files"]),
        "kv_ratio_above_parity": ([src, "--calib", calib, "--kv-ratio", "1.5"], ["--kv-ratio", "above parity"]),
        "k_share_with_joint_latent": ([src, "--calib", calib, "--latent", "joint", "--k-share", "0.3"],
                                      ["--k-share", "joint latent"]),
        "shard_size": ([src, "--calib", calib, "--max-shard-size", "0"], ["--max-shard-size"]),
    }[case]
    out = tmp_path / "out"
    proc, torch_imported = run_main_alone("converter.cli", args[0], out, *args[1:])
    assert_refused(proc, out, *needles)
    assert not torch_imported


# the tiny source: 2 layers, 2 kv heads x 16: keys 32 wide, 64 values/token/layer
SOURCE_CACHE_CASES = {
    "kv_width_above_parity": (["--kv-width", "129"], ["--kv-width 129 is above parity", "caches 64 values"]),
    "odd_rope_dim": (["--rope-dim", "7"], ["--rope-dim", "even"]),
    "rope_wider_than_the_keys": (["--rope-dim", "40"], ["--rope-dim 40 exceeds the original key width 2 x 16"]),
    "rope_leaves_no_latent": (["--kv-width", "32", "--rope-dim", "32"], ["leaves 0 for the latents", "--rope-dim"]),
    "rope_not_a_unit": (["--rope-dim", "8", "--rank-multiple", "16"],
                        ["--rank-multiple 16 needs a rope key width that is a multiple of it", "--rope-dim"]),
    "latent_below_a_unit": (["--kv-width", "28", "--rope-dim", "16", "--rank-multiple", "16"],
                            ["--rank-multiple 16: at least 16 per layer", "--rope-dim"]),
}


@pytest.mark.parametrize("case", SOURCE_CACHE_CASES)
def test_a_cache_the_source_cannot_have_is_refused_from_its_config_before_torch_is_imported(tiny, tmp_path, case):
    """A budget above the source's parity or a rope key its keys or the budget cannot hold is seen in config.json
    (converter/source_checks.py): refused before torch is imported and the source loaded."""
    _, src, calib = tiny
    flags, needles = SOURCE_CACHE_CASES[case]
    out = tmp_path / "out"
    proc, torch_imported = run_main_alone("converter.cli", src, out, "--calib", calib, *flags)
    assert_refused(proc, out, *needles)
    assert not torch_imported


@pytest.mark.parametrize("case", SOURCE_CACHE_CASES)
def test_the_python_api_refuses_the_same_caches_from_the_loaded_model_before_calibrating(tiny, tmp_path, case):
    """convert() checks the loaded model's config (converter/pipeline.py cache_shape): what a repo id not in the
    local cache, or a config.json that leaves the shape to its class's defaults, relies on. Same messages, before
    calibration (which would have written the statistics cache)."""
    from converter.cli import build_parser
    from converter.errors import ConversionError
    from converter.pipeline import convert

    _, src, calib = tiny
    flags, needles = SOURCE_CACHE_CASES[case]
    out, stats = tmp_path / "out", tmp_path / "stats.pt"
    args = vars(build_parser().parse_args([str(src), str(out), "--calib", str(calib), *flags]))
    options = {k: v for k, v in args.items() if k not in ("src", "out", "calib")}
    with pytest.raises(ConversionError) as e:
        convert(src, out, calib_files=[calib], **{**options, "stats_cache": str(stats)})
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert not out.exists() and not stats.exists()


@pytest.mark.parametrize("share", ["0", "1", "1.2"])
def test_k_share_outside_unit_interval(tiny, tmp_path, share):
    _, src, calib = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--k-share", share), out, "--k-share", "(0, 1)")


@pytest.mark.parametrize("ridge", ["0", "nan", "1e300", "1e-300"])   # (1e300: every reported error 0.0)
def test_o_proj_refit_ridge_must_be_positive(tiny, tmp_path, ridge):
    _, src, calib = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--o-proj-refit-ridge", ridge), out,
                   "--o-proj-refit-ridge", "positive")


@pytest.mark.parametrize("flags,needles", [
    (["--calib-batch", "0"], ["--calib-batch", ">= 1"]),            # was a ValueError traceback from range()
    (["--calib-batch", "-2"], ["--calib-batch", ">= 1"]),           # was a crash after calibrating
    (["--rank-multiple", "0"], ["--rank-multiple", "positive"]),
    (["--min-rank-frac", "-1"], ["--min-rank-frac", "[0, 1]"]),     # these three converted without a word
    (["--min-rank-frac", "3", "--max-rank-frac", "1"], ["--min-rank-frac", "[0, 1]"]),
    (["--max-rank-frac", "0.5"], ["--max-rank-frac", ">= 1"]),
    (["--rope-distance", "0"], ["--rope-distance", "positive"]),
    (["--rope-distance", "-5"], ["--rope-distance", "positive"]),
    (["--calib-seqlen", "1"], ["--calib-seqlen >= 2"]),
    (["--kv-ratio", "0"], ["--kv-ratio must be in (0, 1]: it is the kept share"]),   # (said 'above parity')
    (["--kv-ratio", "nan"], ["--kv-ratio must be in (0, 1]: it is the kept share"]),
    (["--device", "foo"], ["--device", "'foo'"]),                    # were torch tracebacks after loading
    (["--device", "meta"], ["--device", "'meta'"]),
])
def test_option_values_out_of_range_are_refused_before_loading(tiny, tmp_path, flags, needles):
    _, src, calib = tiny
    out, stats = tmp_path / "out", tmp_path / "stats.pt"
    assert_refused(run_convert(src, out, "--calib", calib, "--stats-cache", stats, *flags), out, *needles)
    assert not stats.exists()


@pytest.mark.parametrize("where", ["missing_folder", "a_folder"])
def test_stats_cache_that_cannot_be_written_is_refused_before_calibrating(tiny, tmp_path, where):
    """It used to fail in torch.save after the whole calibration."""
    _, src, calib = tiny
    cache = {"missing_folder": tmp_path / "nowhere" / "stats.pt", "a_folder": tmp_path}[where]
    needle = {"missing_folder": "its folder does not exist", "a_folder": "is a folder"}[where]
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--stats-cache", cache), out, "--stats-cache", needle)


def test_cli_defaults_are_the_python_api_defaults():
    """`care-convert` and `converter.pipeline.convert(...)` must convert alike when given nothing: every
    option the CLI passes through has the default of the Options field it fills."""
    import dataclasses

    from converter.cli import build_parser
    from converter.pipeline import Options

    fields = {f.name: f.default for f in dataclasses.fields(Options)}
    actions = {a.dest: a.default for a in build_parser()._actions if a.dest in fields}
    assert set(actions) == set(fields), set(fields) ^ set(actions)
    assert actions == fields


def test_the_deployment_command_in_help_and_readme_parses():
    """The recommended command that `care-convert --help` and the README print is one care-convert accepts, with
    the deployment settings (a renamed option would otherwise leave them telling users a command that fails)."""
    import re
    import shlex

    from converter.cli import EPILOG, build_parser

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(care-convert [^`]*--joint-key-weight auto)\n```", readme)
    assert block, "README: the deployment command's block"
    helped = next(line for line in EPILOG.splitlines() if line.strip().startswith("care-convert "))
    for command in (helped, block.group(1).replace("\\\n", " ")):
        args = build_parser().parse_args(shlex.split(command)[1:])
        assert (args.kv_ratio, args.ranks, args.objective, args.latent, args.joint_key_weight, args.k_share) == (
            0.5, "uniform", "attention", "joint", "auto", None), command
    assert "the same command for Qwen3 sources" in readme   # (no other setting for them since Qwen3's joint latent)


def test_existing_out_needs_overwrite(tiny, tmp_path):
    """An existing OUT is kept, and refused before torch is imported (converter/cli.py check_paths)."""
    _, src, calib = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc, torch_imported = run_main_alone("converter.cli", src, out, "--calib", calib)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert not torch_imported
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_convert(src, out, "--calib", calib, "--overwrite", "--calib-samples", "4", "--calib-seqlen", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("kind", ["a_file", "a_dangling_link", "dotdot", "under_a_file"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_torch_is_imported(tiny, tmp_path, kind):
    """Each ran the whole conversion first: a file given with --overwrite was replaced but left hidden beside OUT
    (.OUT.old-PID); a dangling symbolic link and '.' or '..' failed at the final rename with a traceback; a path
    under a file failed in mkdtemp with one."""
    _, src, calib = tiny
    target = tmp_path / "target"
    out = {"a_file": tmp_path / "out.txt", "a_dangling_link": tmp_path / "link", "dotdot": tmp_path / "empty" / "..",
           "under_a_file": tmp_path / "out.txt" / "model"}[kind]
    if kind in ("a_file", "under_a_file"):
        (tmp_path / "out.txt").write_text("mine")
    if kind == "a_dangling_link":
        out.symlink_to(target)
    if kind == "dotdot":
        (tmp_path / "empty").mkdir()
    needle = {"a_file": "exists and is not a folder", "a_dangling_link": "is a symbolic link",
              "dotdot": "names no folder of its own", "under_a_file": "parent of the output is not a folder"}[kind]
    proc, torch_imported = run_main_alone("converter.cli", src, out, "--calib", calib, "--overwrite")
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not torch_imported and not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == {"a_file": ["out.txt"], "a_dangling_link": ["link"],
                                                         "dotdot": ["empty"], "under_a_file": ["out.txt"]}[kind]


def test_an_out_that_cannot_fit_is_refused_before_calibrating(tiny, tmp_path, monkeypatch):
    """Less space free on OUT's filesystem than the tensors the checkpoint copies from the source (a lower bound of
    its size) is refused once the model is loaded, before calibrating (minutes to hours for a large model): on a
    full disk the run failed at the very end, with a traceback from safetensors' writer. The free space the OS reports
    is set here (a test cannot fill a filesystem); exactly the checkpoint's own size is enough."""
    from converter.cli_checks import tensor_bytes

    _, src, calib = tiny
    done = tmp_path / "done"
    small = ("--calib-samples", "4", "--calib-seqlen", "32")
    assert run_convert(src, done, "--calib", calib, *small).returncode == 0
    need = tensor_bytes(done)
    real = shutil.disk_usage
    for free in (need, need // 2):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
        out, stats = tmp_path / f"out{free}", tmp_path / f"stats{free}.pt"
        proc = run_convert(src, out, "--calib", calib, "--stats-cache", stats, *small)
        if free == need:
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert tensor_bytes(out) == need
        else:
            assert_refused(proc, out, "not enough disk space for the converted checkpoint", f"{tmp_path} has ",
                           "write OUT elsewhere")
            assert not stats.exists(), "calibrated before refusing"


def test_overwrite_never_deletes_an_input(tiny, tmp_path):
    """--overwrite replaces OUT by renaming it away and deleting it: an OUT that is the source, or a folder holding
    the source or a calibration file, is refused (before torch is imported, and by convert() itself), and every
    input file is left as it was. Before, `care-convert model model --overwrite` replaced the original by its
    conversion."""
    from converter.errors import ConversionError
    from converter.pipeline import convert

    _, src, calib = tiny
    models = tmp_path / "models"
    shutil.copytree(src, models / "orig")
    shutil.copy(calib, models / "calib.txt")
    before = {f: f.read_bytes() for f in models.rglob("*") if f.is_file()}
    cases = [(models / "orig", models / "orig", calib, "the source", "it is OUT"),
             (models, models / "orig", calib, "the source", "it is inside OUT"),
             (models, src, models / "calib.txt", "the calibration file", "it is inside OUT")]
    for out, source, cal, role, where in cases:
        proc, torch_imported = run_main_alone("converter.cli", source, out, "--calib", cal, "--overwrite")
        assert proc.returncode == 2 and f"--overwrite would delete {role}" in proc.stderr, proc.stderr
        assert where in proc.stderr and not torch_imported
        with pytest.raises(ConversionError, match=f"--overwrite would delete {role}"):
            convert(source, out, calib_files=[cal], overwrite=True)
    # without --overwrite the same refusal, not the advice to pass it
    proc, _ = run_main_alone("converter.cli", models / "orig", models / "orig", "--calib", calib)
    assert proc.returncode == 2 and "would delete the source" in proc.stderr and "pass --overwrite" not in proc.stderr
    assert {f: f.read_bytes() for f in models.rglob("*") if f.is_file()} == before
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_same_inputs_give_identical_checkpoint(tiny, tmp_path):
    _, src, calib = tiny
    outs = [tmp_path / "a", tmp_path / "b"]
    for o in outs:
        proc = run_convert_process(src, o, "--calib", calib, "--kv-ratio", "0.5", "--calib-samples", "4",
                           "--calib-seqlen", "32")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    assert (outs[0] / "config.json").read_text() == (outs[1] / "config.json").read_text()


def _shell_like_signals() -> None:
    """(preexec_fn) What an interactive shell gives a command it starts: SIGINT at its default disposition and
    SIGINT, SIGTERM and SIGHUP unblocked, whatever the test process inherited. In two parallel fresh-clone runs
    (never alone) the child ran to the end and exited 0 after SIGINT, as it does when SIGINT reaches it ignored
    or blocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def _signal_masks(pid: int) -> str:
    """The process's SigBlk/SigIgn/SigCgt lines (SIGINT is bit 0x2, SIGTERM 0x4000): for the failure message."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(no /proc status)"
    return " ".join(ln for ln in lines if ln.startswith(("SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_signal_while_writing_leaves_nothing(tmp_path, calib_file, sig, code, said):
    """Ctrl-C once the output is being written (its temporary folder exists: the refit and shards come
    next) exits 130 with one line, and neither OUT nor the temporary folder is left. So does SIGTERM, how
    `timeout`, a scheduler's time limit or `docker stop` end a run (exit 143): by default it kills Python
    without unwinding, which left the temporary folder and the shards written so far (converter/interrupts.py).
    care-convert is frozen while the test looks for the folder, so a slow test cannot signal after it finished."""
    src = make_tiny_original(tmp_path / "orig", "llama", num_layers=24)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", str(src), str(out), "--calib", str(calib_file),
                             "--calib-samples", "64", "--calib-seqlen", "128"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_shell_like_signals)
    try:
        deadline, masks = time.monotonic() + 240, None
        while masks is None:   # care-convert frozen (SIGSTOP) while the test looks: the signal lands while it writes
            assert proc.poll() is None, f"exited before writing: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the temporary output folder never appeared"
            with frozen(proc):
                if list(tmp_path.glob(".out.tmp-*")):
                    masks = f"child {_signal_masks(proc.pid)}; test process {_signal_masks(os.getpid())}"
                    proc.send_signal(sig)
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, f"{masks}\n{err[-2000:]}"
    assert err.strip().splitlines()[-1] == f"care-convert: {said}; nothing was written", err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())


def test_attention_objective_needs_care(tiny, tmp_path):
    _, src, calib = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--objective", "attention", "--method", "svd"), out,
                   "--objective attention", "--method care")


def test_stats_cache_of_an_older_version_is_refused(tmp_path):
    """A stats cache from before the statistics were reduced to output space (version 2: every layer's
    whole input covariance) says what it is and what to do, instead of failing inside the pipeline."""
    import torch

    src = make_tiny_original(tmp_path / "qwen3", "qwen3", num_layers=2)
    calib = tmp_path / "calib.txt"
    calib.write_text("a few words of calibration text, repeated. " * 200)
    cache = tmp_path / "stats.pt"
    small = ("--calib-samples", "4", "--calib-seqlen", "32", "--stats-cache", cache)
    assert run_convert(src, tmp_path / "first", "--calib", calib, *small).returncode == 0
    assert run_convert(src, tmp_path / "again", "--calib", calib, *small).returncode == 0   # reused as is
    stats = torch.load(cache, weights_only=False)
    stats["meta"]["stats_version"] = 2
    stats["layers"] = [{"cx": torch.eye(64, dtype=torch.float64), "ax": layer["ax"], "ck": layer["ck"],
                        "qd": layer["qc"].diagonal(dim1=1, dim2=2), "qc": layer["qc"]} for layer in stats["layers"]]
    torch.save(stats, cache)
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, *small), out, str(cache), "older care-convert",
                   "delete it")


@pytest.mark.parametrize("content, needle", [
    ([1, 2], "is not a care-convert statistics file (a torch file holding list)"),
    ({"meta": {"stats_version": "?"}, "layers": []}, "older care-convert"),
    ("code", "cannot be read (UnpicklingError"),   # a pickle naming a callable: never run
])
def test_a_stats_cache_that_is_not_one_is_refused_by_name(tiny, tmp_path, content, needle):
    """(A list gave AttributeError: 'list' object has no attribute 'get', a traceback.)"""
    import torch

    _, src, calib = tiny
    cache, out = tmp_path / "stats.pt", tmp_path / "out"
    torch.save(collections.OrderedDict(a=print) if content == "code" else content, cache)
    assert_refused(run_convert(src, out, "--calib", calib, "--stats-cache", cache), out, str(cache), needle,
                   "delete it")


def test_a_stats_cache_made_for_other_inputs_is_refused(tiny, tmp_path):
    """The cache is reused only for the calibration it holds: here 4 windows asked, 2 cached. (33799b1 compared
    the cache's metadata with itself and took any cache of the current version.)"""
    _, src, calib = tiny
    cache = tmp_path / "stats.pt"
    small = ("--calib", calib, "--calib-seqlen", "32", "--stats-cache", cache)
    assert run_convert(src, tmp_path / "first", *small, "--calib-samples", "2").returncode == 0
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, *small, "--calib-samples", "4"), out, str(cache),
                   "was made for other inputs", "delete it")
    # the same paths and options, other contents: keyed on paths alone, both were reused (exit 0)
    text, model, cache = tmp_path / "text.txt", tmp_path / "model", tmp_path / "same.pt"
    text.write_text(Path(calib).read_text())
    shutil.copytree(src, model)
    same = ("--calib", text, "--calib-seqlen", "32", "--calib-samples", "2", "--stats-cache", cache)
    assert run_convert(model, tmp_path / "second", *same).returncode == 0
    text.write_text(Path(calib).read_text().upper())               # another text in the same file
    assert_refused(run_convert(model, out, *same), out, "was made for other inputs")
    text.write_text(Path(calib).read_text())
    shutil.rmtree(model)
    make_tiny_original(model, "qwen3", num_layers=2)               # another model in the same folder
    assert_refused(run_convert(model, out, *same), out, "was made for other inputs")


def test_a_stats_cache_is_written_whole_or_not_at_all(tiny, tmp_path, monkeypatch):
    """--stats-cache: a save cut short (here Ctrl-C once torch.save has written part of it; equally SIGTERM or a
    full disk) leaves no file, where it left a truncated one that the next run failed to read with a traceback
    (PytorchStreamReader: failed finding central directory); a cache that cannot be read is refused by name."""
    import torch

    _, src, calib = tiny
    cache = tmp_path / "stats.pt"
    small = ("--calib-samples", "4", "--calib-seqlen", "32", "--stats-cache", cache)
    save = torch.save

    def save_part_then_ctrl_c(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_part_then_ctrl_c)
    out = tmp_path / "out"
    proc = run_convert(src, out, "--calib", calib, *small)
    assert proc.returncode == 130 and proc.stderr.strip().endswith("interrupted; nothing was written"), proc.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    monkeypatch.setattr(torch, "save", save)
    save({"layers": []}, cache)
    cache.write_bytes(cache.read_bytes()[:100])           # what the old direct save left
    assert_refused(run_convert(src, out, "--calib", calib, *small), out, str(cache), "cannot be read", "delete it")


@pytest.mark.parametrize("size", ["abc", "0GB"])
def test_bad_max_shard_size(tiny, tmp_path, size):
    _, src, calib = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--max-shard-size", size), out, "--max-shard-size",
                   repr(size))


@pytest.mark.parametrize("ranks, share", [("uniform", "0.97"), ("adjusted", "0.99")])
def test_a_k_share_that_leaves_the_values_no_rank_is_refused(tiny, tmp_path, ranks, share):
    """Uniform ranks with --k-share 0.97 gave every layer v_rank 0 and exit 0: a config model_defs refuses to load
    ('v_ranks must be >= 1'); adjusted ranks were refused with advice about --min/--max-rank-frac, which cannot
    help. Both name the share now."""
    _, src, calib = tiny
    out = tmp_path / "out"
    assert_refused(run_convert(src, out, "--calib", calib, "--kv-ratio", "0.5", "--ranks", ranks, "--k-share", share,
                               "--no-o-proj-refit"), out, f"--k-share {share} leaves the value latent",
                   "every layer needs at least one", "lower --k-share")
