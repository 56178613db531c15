"""care-convert --k-share auto: the checkpoint is care-convert's at the share it chose (tensor for tensor), each
candidate's score is what plain transformers measures on that candidate converted without the refit
(KL to the original on the scoring windows), the choice is the lowest, and with a single possible rank plan
(parity) nothing is scored; a value that is neither a number nor 'auto' is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converter import calib_data, cli, kshare_auto
from tests.cli_run import assert_refused_by, run_main
from tests.tiny_models import checkpoint_tensors, make_tiny_original

# 160 windows of 32 tokens: more than the 4096 tokens (128 windows) that candidates are scored on
OPTIONS = ["--calib-samples", "160", "--calib-seqlen", "32", "--ranks", "uniform", "--objective", "attention",
           "--rope-dim", "16"]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def original(request, tmp_path_factory) -> Path:
    return make_tiny_original(tmp_path_factory.mktemp(f"auto-{request.param}") / "orig", request.param,
                              num_layers=2, kv_heads=2, head_dim=16)


def convert(original: Path, out: Path, calib_file: Path, *flags) -> dict:
    """care-convert with OPTIONS and `flags` (calibrating once per test: the statistics do not depend on the split)."""
    stats = out.parent / "calib_stats.pt"
    proc = run_main(cli.main, "care-convert", original, out, "--calib", calib_file, *OPTIONS, *flags,
                    "--stats-cache", stats)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "care_report.json").read_text())
    if "k_share_auto" in report:   # what it chose is also in the summary care-convert prints
        auto = report["k_share_auto"]
        assert json.loads(proc.stdout)["k_share_auto"] == {"chosen": auto["chosen"],
                                                            "k_share_actual": auto["k_share_actual"]}
    return report


def log_probs(folder: Path, windows: torch.Tensor):
    """Next-token log-probabilities (fp64) of the plain transformers model in `folder` on `windows`, 16 windows
    at a time (a generator: one chunk in memory)."""
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for chunk in windows.split(16):
            yield torch.log_softmax(model(chunk).logits.double(), -1)


def kl_on_windows(original: list[torch.Tensor], converted: Path, windows: torch.Tensor) -> float:
    """Mean KL(original || converted) per token on `windows` (`original`: the original's log_probs)."""
    total = sum((lp.exp() * (lp - lq)).sum().item() for lp, lq in zip(original, log_probs(converted, windows)))
    return total / windows.numel()


def test_auto_converts_at_the_split_whose_unrefitted_model_is_closest(original, calib_file, tmp_path):
    report = convert(original, tmp_path / "auto", calib_file, "--kv-ratio", "0.5", "--k-share", "auto")
    auto = report["k_share_auto"]
    assert report["options"]["k_share"] == "auto"
    # 16 latent ranks a layer (0.5 x 64 - the 16-wide rope key) split by the share, round(16 x share): 2..8 K ranks
    # for 0.15 .. 0.5; the default share (16 lossless key dims beside the rope key, 32 value dims: 1/3) gives 5, as
    # 0.3 does, and 0.35 and 0.4 both give 6: those are scored once
    plans = [c["k_shares"] for c in auto["candidates"]]
    assert plans == [["default", 0.3], [0.15], [0.2], [0.25], [0.35, 0.4], [0.45], [0.5]]
    assert [c["k_share_actual"] for c in auto["candidates"]] == [k / 16 for k in (5, 2, 3, 4, 6, 7, 8)]
    # every candidate's score, measured independently: converted without the refit, run by transformers
    from transformers import AutoTokenizer

    windows = calib_data.token_windows(AutoTokenizer.from_pretrained(original),
                                       calib_data.read_texts([calib_file]), 160, 32, 0)[:128]
    assert (auto["score_windows"], auto["score_tokens"]) == (128, kshare_auto.SCORE_TOKENS) == (128, 4096)
    measured, reference = [], list(log_probs(original, windows))
    for cand in auto["candidates"]:
        share = cand["k_shares"][-1]
        flags = [] if share == "default" else ["--k-share", share]
        out = tmp_path / f"norefit-{share}"
        convert(original, out, calib_file, "--kv-ratio", "0.5", "--no-o-proj-refit", *flags)
        measured.append(kl_on_windows(reference, out, windows))
        assert cand["kl"] == pytest.approx(measured[-1], rel=1e-5, abs=1e-6)   # (the report rounds to 1e-6)
    assert len(set(round(m, 6) for m in measured)) == len(measured)   # the plans differ: so do their scores
    best = auto["candidates"][min(range(len(measured)), key=measured.__getitem__)]
    assert auto["k_share_actual"] == best["k_share_actual"] and auto["chosen"] == best["k_shares"][0]
    # the checkpoint is care-convert's at that share, refit included
    flags = [] if auto["chosen"] == "default" else ["--k-share", auto["chosen"]]
    convert(original, tmp_path / "chosen", calib_file, "--kv-ratio", "0.5", *flags)
    ours, theirs = checkpoint_tensors(tmp_path / "auto"), checkpoint_tensors(tmp_path / "chosen")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "auto" / "config.json").read_text()) == json.loads(
        (tmp_path / "chosen" / "config.json").read_text())
    # its card says how the split was made
    card = (tmp_path / "auto" / "README.md").read_text()
    assert f"({auto['k_share_actual']:.2f} of the latent to K, chosen by `--k-share auto`)" in card


def test_auto_at_parity_scores_nothing_and_is_lossless_split(original, calib_file, tmp_path):
    report = convert(original, tmp_path / "auto", calib_file, "--kv-ratio", "1", "--k-share", "auto")
    auto = report["k_share_auto"]
    # every share gives the lossless plan (16 key dims beside the rope key, 32 value dims a layer)
    assert auto["candidates"] == [{"k_shares": ["default", *kshare_auto.CANDIDATES],
                                   "k_share_actual": pytest.approx(1 / 3, abs=1e-6), "kl": None}]
    assert auto["chosen"] == "default"
    convert(original, tmp_path / "default", calib_file, "--kv-ratio", "1")
    ours, theirs = checkpoint_tensors(tmp_path / "auto"), checkpoint_tensors(tmp_path / "default")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_score_tokens_sets_the_windows_scored(original, calib_file, tmp_path):
    """--k-share-score-tokens 100: the first 4 windows of 32 tokens (whole windows), and a candidate's score is its
    KL measured on those 4."""
    report = convert(original, tmp_path / "auto", calib_file, "--kv-ratio", "0.5", "--k-share", "auto",
                     "--k-share-score-tokens", "100")
    auto = report["k_share_auto"]
    assert (auto["score_windows"], auto["score_tokens"]) == (4, 128)
    from transformers import AutoTokenizer

    windows = calib_data.token_windows(AutoTokenizer.from_pretrained(original),
                                       calib_data.read_texts([calib_file]), 160, 32, 0)[:4]
    default = next(c for c in auto["candidates"] if "default" in c["k_shares"])
    convert(original, tmp_path / "norefit-default", calib_file, "--kv-ratio", "0.5", "--no-o-proj-refit")
    measured = kl_on_windows(list(log_probs(original, windows)), tmp_path / "norefit-default", windows)
    assert default["kl"] == pytest.approx(measured, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("flags, needle", [(["--k-share", "best"], "'best' is neither a number nor 'auto'"),
                                           (["--k-share", "1.5"], "--k-share must be in (0, 1)"),
                                           (["--k-share", "auto", "--k-share-score-tokens", "0"],
                                            "--k-share-score-tokens must be >= 1 (got 0)")])
def test_bad_k_share_is_refused(flags, needle, original, calib_file, tmp_path):
    out = tmp_path / "out"
    proc = run_main(cli.main, "care-convert", original, out, "--calib", calib_file, *OPTIONS, *flags)
    assert_refused_by("care-convert", proc, out, needle)
