"""The o_proj refit (converter/refit.py), checked against references that share none of its code:

* a conversion with the refit differs from one without (`care-convert --no-o-proj-refit`) in o_proj
  only, and each layer's o_proj equals the ridge least-squares solution computed here from whole-model
  forward passes: the original transformers model (its attention outputs o) and the refitted
  checkpoint in model_defs (its own attention outputs o', i.e. with every earlier layer refitted), with
  the ridge asked for (`--o-proj-refit-ridge`, or its default);
* on a trained model and held-out text, the refit brings the converted model closer to the original
  (KL of the next-token distributions) than the factorization alone;
* an exact conversion (full ranks, RoPE on every key dim) keeps the original o_proj: covered by
  tests/test_converter_exact.py, which converts with the refit on (the default).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from converter import calib_data
from converter.cli import main as care_convert
from converter.pipeline import convert
from tests.license_texts import CALIB, held_out_kl, require_license_texts
from tests.tiny_models import SHARED, make_tiny_original, require_shared

SAMPLES, SEQLEN = 8, 64
DEFAULT_RIDGE = 0.01   # care-convert's documented default (docs/CONVERTING.md, --help)
# per architecture: the --o-proj-refit-ridge given (None: the default)
RIDGE = {"llama": None, "qwen3": 0.1, "qwen3_moe": 1.0}


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen3_moe"])
def refit_pair(request, tmp_path_factory, calib_file):
    arch = request.param
    root = tmp_path_factory.mktemp(f"refit_{arch}")
    src = make_tiny_original(root / "orig", arch, num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    common = ["--calib", str(calib_file), "--kv-ratio", "0.5", "--calib-samples", str(SAMPLES),
              "--calib-seqlen", str(SEQLEN), "--calib-batch", "3", "--ranks", "uniform", "--dtype", "float32"]
    ridge = [] if RIDGE[arch] is None else ["--o-proj-refit-ridge", str(RIDGE[arch])]
    assert care_convert([str(src), str(root / "refit"), *common, *ridge]) == 0
    assert care_convert([str(src), str(root / "plain"), *common, "--no-o-proj-refit"]) == 0
    return arch, src, root / "refit", root / "plain", calib_file


def _o_proj_inputs(model, layers, windows) -> list[torch.Tensor]:
    """Per layer, o_proj's inputs over all windows [N*T, n_h*d_h] fp64, from one plain forward."""
    seen = [[] for _ in layers]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args, l=l: seen[l].append(args[0].flatten(0, 1).double())) for l, layer in enumerate(layers)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return [torch.cat(s) for s in seen]


def test_only_o_proj_changes(refit_pair):
    arch, _, refit, plain, _ = refit_pair
    a, b = load_file(str(refit / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("self_attn.o_proj.weight") for k in changed), changed
    cfg_a, cfg_b = (json.loads((p / "config.json").read_text()) for p in (refit, plain))
    assert cfg_a["care"]["o_proj_refit"] is True and cfg_b["care"]["o_proj_refit"] is False
    assert cfg_a["care"]["o_proj_refit_ridge"] == (RIDGE[arch] or DEFAULT_RIDGE)
    assert cfg_b["care"]["o_proj_refit_ridge"] is None
    assert {k: v for k, v in cfg_a.items() if k != "care"} == {k: v for k, v in cfg_b.items() if k != "care"}


def test_o_proj_is_the_ridge_solution_on_propagated_outputs(refit_pair):
    import model_defs  # noqa: F401  (registers care_mla)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, src, refit, _, calib = refit_pair
    tok = AutoTokenizer.from_pretrained(src)
    windows = calib_data.token_windows(tok, calib_data.read_texts([calib]), SAMPLES, SEQLEN, 0)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, experts_implementation="eager").eval()
    converted = AutoModelForCausalLM.from_pretrained(refit, dtype=torch.float32).eval()
    o = _o_proj_inputs(original, original.model.layers, windows)
    o_conv = _o_proj_inputs(converted, converted.model.layers, windows)
    report = json.loads((refit / "care_report.json").read_text())
    for l, (ol, cl) in enumerate(zip(original.model.layers, converted.model.layers)):
        w_o = ol.self_attn.o_proj.weight.double()
        c_pp, c_op = o_conv[l].T @ o_conv[l], o[l].T @ o_conv[l]
        lam = (RIDGE[arch] or DEFAULT_RIDGE) * c_pp.diagonal().mean()
        eye = torch.eye(c_pp.shape[0], dtype=torch.float64)
        expected = w_o @ (c_op + lam * eye) @ torch.linalg.inv(c_pp + lam * eye)
        got = cl.self_attn.o_proj.weight.double()
        assert (got - expected).abs().max() < 1e-4 * expected.abs().max(), f"{arch} layer {l}"
        # the reported error of the attention output, before and after, from the same outputs
        def rel(w):
            return ((o_conv[l] @ w.T - o[l] @ w_o.T).norm() / (o[l] @ w_o.T).norm()).item()
        entry = report["layers"][l]
        assert entry["attn_rel_error"] == pytest.approx(rel(expected), rel=1e-3, abs=1e-5)
        assert entry["attn_rel_error_before_refit"] == pytest.approx(rel(w_o), rel=1e-3, abs=1e-5)
        assert entry["attn_rel_error"] < entry["attn_rel_error_before_refit"]


@pytest.mark.parametrize("name", ["llama3-small", "qwen3-small"])
def test_refit_brings_held_out_predictions_closer_to_the_original(tmp_path, name):
    """Calibrated on two license texts, scored on two others (tests/license_texts.held_out_kl)."""
    import model_defs  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = require_shared(SHARED / "models" / name)
    require_license_texts()
    kw = dict(calib_files=CALIB, kv_ratio=0.5, ranks="uniform", calib_samples=32, calib_seqlen=256,
              dtype="float32", stats_cache=str(tmp_path / "stats.pt"))
    convert(src, tmp_path / "refit", **kw)
    convert(src, tmp_path / "plain", o_proj_refit=False, **kw)
    tok = AutoTokenizer.from_pretrained(src)
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    kl = {tag: held_out_kl(original, AutoModelForCausalLM.from_pretrained(tmp_path / tag, dtype=torch.float32).eval(),
                           tok) for tag in ("refit", "plain")}
    print(f"{name}: held-out KL to the original {kl}")
    assert kl["refit"] < 0.97 * kl["plain"], kl
