"""care-eval sweep: each kept checkpoint is exactly what care-convert makes at that ratio (and rope width) with the same
options (tensor for tensor), each row's perplexity, KL and top-1 agreement are what a plain transformers
computation gives on that checkpoint and the original, the cache sizes are the budget's; bad input
exits 2 before anything is converted and leaves nothing on disk."""
from __future__ import annotations

import json
import math
import random
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converter import cli
from converter.eval_cli import main
from tests.tiny_models import make_tiny_original

CONVERT_OPTIONS = ["--calib-samples", "8", "--calib-seqlen", "32", "--ranks", "uniform", "--objective", "attention"]
EVAL_OPTIONS = ["--seqlen", "64", "--max-tokens", "400"]
NUM_LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return make_tiny_original(tmp_path_factory.mktemp("sweep") / "orig", "llama", num_layers=NUM_LAYERS,
                              kv_heads=KV_HEADS, head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    rng = random.Random(7)
    words = "the model cache attention key value rope layer latent rank token query head of and".split()
    path = tmp_path_factory.mktemp("heldout") / "test.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(600)))
    return path


def run_main(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def independent_comparison(original: Path, converted: Path, text: str, seqlen: int, max_tokens: int) -> dict:
    """Perplexities, mean KL(original || converted) and top-1 agreement per predicted token, with the plain
    transformers models and windows cut by hand."""
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(original)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    x = torch.tensor([ids[i * seqlen:(i + 1) * seqlen] for i in range(len(ids) // seqlen)])
    with torch.no_grad():
        lp = [torch.log_softmax(AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()(x).logits[:, :-1]
                                .double(), -1) for f in (original, converted)]
    target = x[:, 1:, None]
    nll = [-(p.gather(-1, target)).mean().item() for p in lp]
    return {"ppl": [math.exp(n) for n in nll], "tokens": target.numel(),
            "kl": (lp[0].exp() * (lp[0] - lp[1])).sum(-1).mean().item(),
            "top1": (lp[0].argmax(-1) == lp[1].argmax(-1)).double().mean().item()}


def assert_care_convert_makes(kept: Path, row: dict, original, calib_file, tmp_path, capsys, *flags):
    """`kept` is the checkpoint care-convert makes with CONVERT_OPTIONS and `flags`, tensor for tensor,
    and `row` states the cache the checkpoint's own ranks and rope key take."""
    ref = tmp_path / f"ref-{kept.name}"
    assert cli.main([str(original), str(ref), "--calib", str(calib_file), *map(str, flags), *CONVERT_OPTIONS]) == 0
    capsys.readouterr()
    ours, theirs = load_file(kept / "model.safetensors"), load_file(ref / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((kept / "config.json").read_text())
    assert config == json.loads((ref / "config.json").read_text())
    parity = NUM_LAYERS * 2 * KV_HEADS * HEAD_DIM
    cache = sum(config["k_ranks"]) + sum(config["v_ranks"]) + NUM_LAYERS * config["qk_rope_head_dim"]
    assert row["cache_values_per_token"] == cache == math.floor(row["kv_ratio"] * parity)
    assert row["rope_dim"] == config["qk_rope_head_dim"]
    assert row["original_cache_values_per_token"] == parity and row["kv_capacity"] == parity / cache


def test_sweep_matches_care_convert_and_independent_measurement(original, held_out, calib_file, tmp_path, capsys):
    keep = tmp_path / "keep"
    code, res, err = run_main(capsys, "sweep", original, "--calib", calib_file, "--text", held_out,
                              "--kv-ratios", "1,0.5", "--keep", keep, *CONVERT_OPTIONS, *EVAL_OPTIONS)
    assert code == 0, err
    assert "| KV ratio |" in err                                 # the table on stderr
    assert [r["kv_ratio"] for r in res["rows"]] == [0.5, 1.0]   # sorted
    assert sorted(p.name for p in keep.iterdir()) == ["kv0.5", "kv1"]
    for row in res["rows"]:
        ratio, kept = row["kv_ratio"], Path(row["checkpoint"])
        assert_care_convert_makes(kept, row, original, calib_file, tmp_path, capsys, "--kv-ratio", ratio)
        # what it costs, measured independently
        ind = independent_comparison(original, kept, held_out.read_text(), 64, 400)
        assert res["tokens"] == ind["tokens"]
        assert math.isclose(res["original"]["ppl"], ind["ppl"][0], rel_tol=1e-5)
        assert math.isclose(row["converted"]["ppl"], ind["ppl"][1], rel_tol=1e-5)
        assert math.isclose(row["ppl_ratio"], ind["ppl"][1] / ind["ppl"][0], rel_tol=1e-5)
        assert math.isclose(row["kl"], ind["kl"], rel_tol=1e-4, abs_tol=1e-6)
        assert row["top1_agreement"] == pytest.approx(ind["top1"], abs=1e-9)
    # parity is close (only the partial RoPE is lost), half the cache visibly further
    assert res["rows"][1]["kl"] < res["rows"][0]["kl"]


def test_rope_dims_sweep_converts_every_pair_as_care_convert_with_that_rope_dim(original, held_out, calib_file,
                                                                                 tmp_path, capsys):
    """(With a joint latent, --latent joint, as care-convert options pass through the sweep: its rows say so.)"""
    keep = tmp_path / "keep"
    code, res, err = run_main(capsys, "sweep", original, "--calib", calib_file, "--text", held_out,
                              "--kv-ratios", "0.75,1", "--rope-dims", "32,16", "--keep", keep, "--latent", "joint",
                              *CONVERT_OPTIONS, *EVAL_OPTIONS)
    assert code == 0, err
    # (the key weight the fit used: --objective attention's default, 1)
    assert all(r["k_share_actual"] is None for r in res["rows"]) and err.count("| joint, W 1 |") == 4
    assert [(r["kv_ratio"], r["rope_dim"]) for r in res["rows"]] == [(0.75, 16), (0.75, 32), (1.0, 16), (1.0, 32)]
    assert sorted(p.name for p in keep.iterdir()) == ["kv0.75-rope16", "kv0.75-rope32", "kv1-rope16", "kv1-rope32"]
    for row in res["rows"][:2]:
        assert_care_convert_makes(Path(row["checkpoint"]), row, original, calib_file, tmp_path, capsys,
                                  "--kv-ratio", row["kv_ratio"], "--rope-dim", row["rope_dim"], "--latent", "joint")
    # at parity a rope key as wide as the original keys (2 x 16) leaves nothing out: exact
    exact = res["rows"][3]
    assert abs(exact["kl"]) < 1e-6 and exact["top1_agreement"] == 1.0 and res["rows"][2]["kl"] > 1e-4


def test_k_shares_sweep_converts_every_split_as_care_convert_with_that_k_share(original, held_out, calib_file,
                                                                               tmp_path, capsys):
    keep = tmp_path / "keep"
    code, res, err = run_main(capsys, "sweep", original, "--calib", calib_file, "--text", held_out,
                              "--kv-ratios", "0.5", "--rope-dim", "16", "--k-shares", "0.75,default,auto,0.25",
                              "--keep", keep, *CONVERT_OPTIONS, *EVAL_OPTIONS)
    assert code == 0, err
    # the default first, then auto's choice, then the shares sorted
    assert [r["k_share"] for r in res["rows"]] == [None, "auto", 0.25, 0.75]
    assert sorted(p.name for p in keep.iterdir()) == ["kv0.5-kshare-auto", "kv0.5-kshare-default", "kv0.5-kshare0.25",
                                                      "kv0.5-kshare0.75"]
    assert "| K share |" in err and f"| auto: {res['rows'][1]['k_share_actual']:.2f} |" in err
    for row in res["rows"]:
        kept = Path(row["checkpoint"])
        flags = [] if row["k_share"] is None else ["--k-share", row["k_share"]]
        assert_care_convert_makes(kept, row, original, calib_file, tmp_path, capsys,
                                  "--kv-ratio", 0.5, "--rope-dim", 16, *flags)
        config = json.loads((kept / "config.json").read_text())
        k, v = sum(config["k_ranks"]), sum(config["v_ranks"])
        assert row["k_share_actual"] == k / (k + v)
    # 0.5 x 64 = 32 values a layer, 16 of them the rope key: 16 latent ranks a layer, 4 / 12 at 0.25, 12 / 4 at
    # 0.75; the default splits them as the lossless widths, 32 - 16 key dims left after the rope key and 32 value
    # dims: 1/3, rounded to whole ranks
    fixed = [r["k_share_actual"] for r in res["rows"] if r["k_share"] != "auto"]
    assert fixed == [pytest.approx(5 / 16, abs=1 / 16), 0.25, 0.75]


def test_k_shares_sweep_compares_separate_latents_with_joint_ones(original, held_out, calib_file, tmp_path, capsys):
    """--k-shares 'joint' (--latent joint) and 'joint:W' (with --joint-key-weight W): each kept checkpoint is
    care-convert's with those options, and its row and the table say which key weight the fit used."""
    keep = tmp_path / "keep"
    code, res, err = run_main(capsys, "sweep", original, "--calib", calib_file, "--text", held_out,
                              "--kv-ratios", "0.5", "--rope-dim", "16", "--k-shares", "joint:auto,default,joint:4",
                              "--keep", keep, *CONVERT_OPTIONS, *EVAL_OPTIONS)
    assert code == 0, err
    assert [r["k_share"] for r in res["rows"]] == [None, "joint:auto", "joint:4"]
    assert sorted(p.name for p in keep.iterdir()) == ["kv0.5-kshare-default", "kv0.5-kshare-joint-4",
                                                      "kv0.5-kshare-joint-auto"]
    default, auto, four = res["rows"]
    assert default["k_share_actual"] > 0 and "joint_key_weight" not in default
    assert auto["k_share_actual"] is four["k_share_actual"] is None and four["joint_key_weight"] == 4
    chosen = auto["joint_key_weight_auto"]["chosen"]
    assert auto["joint_key_weight"] == chosen and len(auto["joint_key_weight_auto"]["candidates"]) > 1
    assert f"| joint, W auto: {chosen:g} |" in err and "| joint, W 4 |" in err
    for row, flags in zip(res["rows"], ([], ["--joint-key-weight", "auto"], ["--joint-key-weight", "4"])):
        kept = Path(row["checkpoint"])
        assert_care_convert_makes(kept, row, original, calib_file, tmp_path, capsys, "--kv-ratio", 0.5,
                                  "--rope-dim", 16, *(["--latent", "joint", *flags] if flags else []))


def test_sweep_without_keep_leaves_no_checkpoint(original, held_out, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the sweep's work folder goes
    code, res, err = run_main(capsys, "sweep", original, "--calib", calib_file, "--text", held_out,
                              "--kv-ratios", "0.5", *CONVERT_OPTIONS, *EVAL_OPTIONS)
    assert code == 0, err
    assert "checkpoint" not in res["rows"][0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["ratio above parity", "not a number", "empty held-out text", "one-token held-out text",
                                  "missing calibration file", "keep exists", "bad option", "odd rope dim",
                                  "rope dim and rope dims", "rope key the budget cannot hold", "k-share out of range",
                                  "k-share and k-shares", "bad joint key weight", "joint with --k-share"])
def test_sweep_bad_input_exits_2_and_writes_nothing(case, original, held_out, calib_file, tmp_path, capsys):
    keep, text, calib, ratios, extra = tmp_path / "keep", held_out, calib_file, "0.5,1", []
    expected = {"ratio above parity": "1.5 is outside (0, 1]", "not a number": "'half' is not a number",
                "empty held-out text": "text is empty",
                "one-token held-out text": "need at least 2 tokens", "missing calibration file": "missing.txt",
                "keep exists": "already exists", "bad option": "--k-share",
                "odd rope dim": "--rope-dims: 15 is not a positive even number",
                "rope dim and rope dims": "either --rope-dim or --rope-dims",
                "rope key the budget cannot hold": "KV 0.5, rope 32: KV budget of 64 values/token leaves 0",
                "k-share out of range": "--k-shares: 1 is outside (0, 1)",
                "k-share and k-shares": "either --k-share or --k-shares",
                "bad joint key weight": "--k-shares: 'joint:heavy': 'heavy' is neither a number nor 'auto'",
                "joint with --k-share": "--k-shares sweeps the K/V split of separate latents and, as 'joint' or "
                                        "'joint:W', the joint latent: drop --latent joint"}[case]
    if case == "ratio above parity":
        ratios = "0.5,1.5"
    elif case == "not a number":
        ratios = "0.5,half"
    elif case == "empty held-out text":
        text = tmp_path / "empty.txt"
        text.write_text("  \n")
    elif case == "one-token held-out text":   # read fine, refused once tokenized (the original is loaded)
        text = tmp_path / "short.txt"
        text.write_text("the")
    elif case == "missing calibration file":
        calib = tmp_path / "missing.txt"
    elif case == "keep exists":
        keep.mkdir()
    elif case == "odd rope dim":
        extra = ["--rope-dims", "16,15"]
    elif case == "rope dim and rope dims":
        extra = ["--rope-dims", "16", "--rope-dim", "16"]
    elif case == "rope key the budget cannot hold":   # 0.5 x 64 = 32 values a layer, all taken by rope 32
        extra = ["--rope-dims", "16,32"]
    elif case == "k-share out of range":
        extra = ["--k-shares", "default,0.5,1"]
    elif case == "k-share and k-shares":
        extra = ["--k-shares", "0.25,0.5", "--k-share", "0.25"]
    elif case == "bad joint key weight":
        extra = ["--k-shares", "default,joint:heavy"]
    elif case == "joint with --k-share":   # a split asked of a joint latent (--latent joint for every run)
        extra = ["--k-shares", "default,0.25", "--latent", "joint"]
    else:
        extra = ["--k-share", "1.5"]
    code, _, err = run_main(capsys, "sweep", original, "--calib", calib, "--text", text, "--kv-ratios", ratios,
                            "--keep", keep, *CONVERT_OPTIONS, *EVAL_OPTIONS, *extra)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert "converting at KV" not in err                        # refused before the first conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"keep exists": ["keep"], "empty held-out text": ["empty.txt"], "one-token held-out text": ["short.txt"]}.get(case, []))


@pytest.mark.parametrize("flags,needle", [
    (["--k-share", "1.5"], "--k-share must be in (0, 1)"),
    ([], "KV 0.5, rope 32: KV budget of 64 values/token leaves 0"),   # 0.5 x 64 = 32 values a layer: all rope
    # README's example, without --objective attention (the default is kv): refused by what it lacks
    (["--rope-dims", "16", "--k-shares", "default,joint:auto"],
     "--k-shares joint:auto: the key weight W of 'joint:W' is the attention objective's; add --objective attention"),
    (["--rope-dims", "16", "SRC=missing"], "not a model folder (no config.json) or .gguf file: ")])
def test_sweep_refuses_a_bad_option_before_torch_is_imported(original, held_out, calib_file, tmp_path, flags, needle):
    """Every run's care-convert options are checked (converter/options.py), and what the source's config.json
    says of them (converter/source_checks.py), before the converter is imported: a process refusing one never
    imported torch. So is a mistyped SRC (it was refused once the original had loaded)."""
    from tests.cli_run import run_main_alone

    src = tmp_path / "missing" if "SRC=missing" in flags else original
    flags = [f for f in flags if f != "SRC=missing"]
    rope_dims = [] if "--rope-dims" in flags else ["--rope-dims", "16,32"]
    proc, torch_imported = run_main_alone("converter.eval_cli", "sweep", src, "--calib", calib_file, "--text",
                                          held_out, "--kv-ratios", "0.5,1", *rope_dims, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr.strip().splitlines()[-1]
    assert not torch_imported
