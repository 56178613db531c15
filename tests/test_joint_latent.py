"""care-convert --latent joint: one latent per layer that keys and values both read (Llama-path and Qwen3 sources;
Qwen3's is the sum of a map of its post-k_norm keys and one of the layer input, docs/FORMAT.md).

References, independent of the converter's statistics: the separate-latent conversion of the same original (at
parity both keep every latent dimension, so they must compute the same function, whatever kv_b_proj looks
like), and the original model's own keys and values on the calibration windows (at a reduced cache the joint
latent of a layer must leave no more key + value energy out than separate latents of the same total rank: the
separate pair is one of the latents the joint fit chooses among). The errors compared are the report's, which
tests/test_care_report.py checks against the written checkpoint, for both latents. `--joint-key-weight auto`:
each candidate's score equals plain transformers' KL on that weight's unrefitted conversion, and the checkpoint is
the one converted at the weight chosen. Also: the config and model card say what was written, and what a joint
latent cannot do is refused by name with nothing written.
"""
from __future__ import annotations

import json

import pytest
import torch

from converter import calib_data
from converter.pipeline import convert
from tests.cli_run import assert_refused_by, run_main
from tests.test_care_report import _attention_inputs
from tests.tiny_models import make_tiny_original

IDS = [[5, 900, 33, 1200, 77, 4000, 12, 8, 15000, 256, 9, 3000, 41, 42, 43, 600]]
SHAPE = dict(num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
CALIB = dict(calib_samples=8, calib_seqlen=64)


def _logits(folder) -> torch.Tensor:
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """arch -> (folder for its conversions, the tiny original), each made on first use."""
    root = tmp_path_factory.mktemp("joint")
    made = {}

    def get(arch: str):
        if arch not in made:
            (root / arch).mkdir()
            made[arch] = root / arch, make_tiny_original(root / arch / "orig", arch, **SHAPE)
        return made[arch]
    return get


@pytest.fixture(scope="module")
def original(originals):
    return originals("llama")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("objective", ["kv", "attention"])
def test_at_parity_a_joint_latent_computes_what_separate_latents_do(originals, calib_file, objective, arch):
    root, src = originals(arch)
    # partial rope (8 of the 32 key dims): the latents carry the rest of the keys, so K really is in the latent
    kw = dict(calib_files=[calib_file], kv_ratio=1.0, rope_dim=8, ranks="uniform", objective=objective, **CALIB)
    convert(src, root / f"separate_{objective}", **kw)
    report = convert(src, root / f"joint_{objective}", latent="joint",
                     joint_key_weight=3.0 if objective == "attention" else None, **kw)
    joint = root / f"joint_{objective}"
    cfg = json.loads((joint / "config.json").read_text())
    g_d = 2 * 16
    # the whole latent is written as v_ranks, k_ranks 0 (docs/FORMAT.md): lossless at K_nope's width + V's
    assert cfg["k_ranks"] == [0] * 3 and cfg["v_ranks"] == [2 * g_d - 8] * 3 and cfg["care"]["latent"] == "joint"
    assert cfg["joint_latent"] is True and cfg["use_qk_norm"] == (arch == "qwen3")
    assert report["latent"] == "joint" and report["cache_values_per_token"] == report["original_cache_values_per_token"]
    assert all(layer["k_rel_error"] < 1e-6 and layer["v_rel_error"] < 1e-6 for layer in report["layers"])
    assert (report["options"].get("joint_key_weight") == 3.0) == (objective == "attention")
    from safetensors.torch import load_file

    kv_b = load_file(joint / "model.safetensors")["model.layers.1.self_attn.kv_b_proj.weight"].view(4, 2, 16, -1)
    # keys and values both read (almost) every latent column: nothing block-diagonal left to split
    assert (kv_b[:, 0].abs().amax((0, 1)) > 1e-3).float().mean() > 0.9
    assert (kv_b[:, 1].abs().amax((0, 1)) > 1e-3).float().mean() > 0.9
    ref = _logits(root / f"separate_{objective}")
    assert (_logits(joint) - ref).abs().max().item() < 1e-4   # (both written in fp32: measured 4e-5)
    assert "one latent shared by keys and values" in (joint / "README.md").read_text()


def _key_value_energy(src, calib_file) -> list[tuple[float, float]]:
    """Per layer (||K||^2, ||V||^2) of the original's keys (Qwen3: after k_norm, what its latents carry) and
    values on the calibration windows."""
    from transformers import AutoTokenizer

    windows = calib_data.token_windows(AutoTokenizer.from_pretrained(src), calib_data.read_texts([calib_file]),
                                       CALIB["calib_samples"], CALIB["calib_seqlen"], seed=0)
    model, inputs = _attention_inputs(src, windows)
    out = []
    for layer, x in zip(model.model.layers, inputs):
        a = layer.self_attn
        k = x @ a.k_proj.weight.T
        if hasattr(a, "k_norm"):
            k = a.k_norm(k.view(k.shape[0], -1, a.head_dim))
        out.append((k.square().sum().item(), (x @ a.v_proj.weight.T).square().sum().item()))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_a_joint_latent_leaves_out_no_more_than_separate_latents_of_its_rank(originals, calib_file, ratio, arch):
    root, src = originals(arch)
    kw = dict(calib_files=[calib_file], kv_ratio=ratio, rope_dim=8, ranks="uniform", o_proj_refit=False, **CALIB)
    separate = convert(src, root / f"sep_{ratio}", **kw)
    joint = convert(src, root / f"joint_{ratio}", latent="joint", **kw)
    energy = _key_value_energy(src, calib_file)
    for s, j, (k2, v2) in zip(separate["layers"], joint["layers"], energy):
        assert s["k_rank"] + s["v_rank"] == j["v_rank"] and j["k_rank"] == 0   # same cache, same latent width
        left_separate = s["k_rel_error"] ** 2 * k2 + s["v_rel_error"] ** 2 * v2
        left_joint = j["k_rel_error"] ** 2 * k2 + j["v_rel_error"] ** 2 * v2
        # (damping: each fit minimizes its damped objective; 1e-3 of slack covers the difference)
        assert left_joint <= left_separate * 1.001, (s["layer"], left_joint, left_separate)
    total = [sum(l["k_rel_error"] ** 2 * k2 + l["v_rel_error"] ** 2 * v2 for l, (k2, v2) in zip(r["layers"], energy))
             for r in (separate, joint)]
    assert total[1] < 0.95 * total[0], total   # and strictly less in all: the layers' K and V share directions


def test_key_weight_auto_converts_at_the_weight_whose_unrefitted_model_is_closest(original, calib_file):
    """--joint-key-weight auto: each candidate's score is what plain transformers measures on that weight's
    conversion without the refit (KL to the original on the scored windows), the lowest is chosen, and the
    checkpoint is care-convert's at that weight, tensor for tensor."""
    from transformers import AutoTokenizer

    from converter import joint_latent
    from converter.cli import main
    from tests.test_k_share_auto import kl_on_windows, log_probs
    from tests.tiny_models import checkpoint_tensors

    root, src = original
    stats = root / "auto_stats.pt"

    def care_convert(out, *flags):
        proc = run_main(main, "care-convert", src, out, "--calib", calib_file, "--calib-samples", "8",
                        "--calib-seqlen", "64", "--rope-dim", "8", "--kv-ratio", "0.5", "--ranks", "adjusted",
                        "--latent", "joint", "--objective", "attention", "--k-share-score-tokens", "256",
                        "--stats-cache", stats, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, json.loads((out / "care_report.json").read_text())

    proc, report = care_convert(root / "auto", "--joint-key-weight", "auto")
    auto = report["joint_key_weight_auto"]
    assert [c["joint_key_weight"] for c in auto["candidates"]] == list(joint_latent.KEY_WEIGHTS)
    assert (auto["score_windows"], auto["score_tokens"]) == (4, 256)
    assert json.loads(proc.stdout)["joint_key_weight_auto"] == auto["chosen"] == report["options"]["joint_key_weight"]
    windows = calib_data.token_windows(AutoTokenizer.from_pretrained(src), calib_data.read_texts([calib_file]),
                                       8, 64, 0)[:4]
    reference, measured = list(log_probs(src, windows)), []
    for cand in auto["candidates"]:
        out = root / f"norefit-{cand['joint_key_weight']}"
        care_convert(out, "--joint-key-weight", str(cand["joint_key_weight"]), "--no-o-proj-refit")
        measured.append(kl_on_windows(reference, out, windows))
        assert cand["kl"] == pytest.approx(measured[-1], rel=1e-5, abs=1e-6)
    assert len(set(round(m, 4) for m in measured)) == len(measured)   # the weights change the latents
    assert auto["chosen"] == joint_latent.KEY_WEIGHTS[min(range(len(measured)), key=measured.__getitem__)]
    care_convert(root / "chosen", "--joint-key-weight", str(auto["chosen"]))
    ours, theirs = checkpoint_tensors(root / "auto"), checkpoint_tensors(root / "chosen")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    card = (root / "auto" / "README.md").read_text()
    assert f"key weight {auto['chosen']:g}, chosen by `--joint-key-weight auto`" in card


def test_what_a_joint_latent_cannot_do_is_refused(tmp_path, calib_file):
    from converter.cli import main

    qwen3 = make_tiny_original(tmp_path / "qwen3", "qwen3", num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)
    llama = make_tiny_original(tmp_path / "llama", "llama", num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)
    out = tmp_path / "out"
    common = ["--calib", calib_file, "--calib-samples", "4", "--calib-seqlen", "32", "--kv-ratio", "0.5"]
    cases = [
        ([qwen3, out, "--latent", "joint", "--method", "svd"], ["--latent joint with --method svd", "Qwen3ForCausalLM",
                                                                 "k_norm", "--method care"]),
        ([llama, out, "--latent", "joint", "--k-share", "auto"], ["--k-share", "joint latent", "drop --k-share"]),
        ([llama, out, "--latent", "joint", "--objective", "attention", "--joint-key-weight", "0"],
         ["--joint-key-weight", "positive"]),
        ([llama, out, "--latent", "shared"], ["--latent", "invalid choice"]),
        ([llama, out, "--latent", "joint", "--joint-key-weight", "auto"], ["--joint-key-weight",
                                                                            "--latent joint --objective attention"]),
        ([llama, out, "--objective", "attention", "--joint-key-weight", "2"], ["--joint-key-weight",
                                                                                "--latent joint --objective attention"]),
        ([llama, out, "--latent", "joint", "--joint-key-weight", "best"], ["'best' is neither a number nor 'auto'"]),
        # (1e305 overflowed the weighting: a NaN checkpoint, exit 0)
        ([llama, out, "--latent", "joint", "--objective", "attention", "--joint-key-weight", "1e305"],
         ["--joint-key-weight must be a positive number in [1e-6, 1e6]"]),
    ]
    for args, needles in cases:
        assert_refused_by("care-convert", run_main(main, "care-convert", *args, *common), out, *needles)


def test_a_joint_latent_wider_than_the_hidden_size_is_refused_before_calibration(tmp_path, calib_file, monkeypatch):
    """On an MHA source (Phi-3-mini: as many KV heads as query heads) a joint latent, a map of the layer input, holds
    at most hidden_size values, below parity: the default budget was refused only after the calibration and the
    factorization, as 'budget of 336 latent values exceeds the lossless width 192'. Now before the calibration, with
    the width that fits; and that width converts."""
    from converter import pipeline
    from converter.cli import main

    mha = make_tiny_original(tmp_path / "mha", "llama", num_layers=3, hidden=64, heads=4, kv_heads=4, head_dim=16)
    out = tmp_path / "out"
    common = ["--calib", calib_file, "--calib-samples", "4", "--calib-seqlen", "32", "--latent", "joint",
              "--rope-dim", "16"]

    def no_calibration(*a, **k):
        raise AssertionError("calibrated")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "_load_or_collect_stats", no_calibration)
        for budget in ([], ["--kv-ratio", "0.75"], ["--kv-width", "81"]):
            assert_refused_by("care-convert", run_main(main, "care-convert", mha, out, *common, *budget), out,
                              "a joint latent (--latent joint) of this model holds at most 64 values per layer",
                              "its hidden size 64", "use --kv-width 80 (--kv-ratio 0.625) or less")
    assert run_main(main, "care-convert", mha, out, *common, "--kv-width", "80").returncode == 0
    assert json.loads((out / "config.json").read_text())["v_ranks"] == [64, 64, 64]
