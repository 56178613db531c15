"""care_report.json's per-layer value errors, checked against a forward pass of the original model.

The report tells a user how much each layer lost: `v_rel_error` = ||V - V_hat|| / ||V|| over the
calibration tokens. Reference, sharing nothing with the converter's statistics: run the ORIGINAL
transformers model (fp64) on the same calibration windows, capture every layer's attention input (the
output of its input_layernorm), and compare the original values X W_V^T with the values the WRITTEN
checkpoint produces (value latent, then kv_b's value rows of one head of each KV group; docs/FORMAT.md).
Also `k_rel_error` = ||K - K_hat|| / ||K||: the original keys (X W_K^T; Qwen3: after k_norm) against the keys the
checkpoint gives each KV group in its original coordinates (k_nope from kv_b's key rows, plus the rope key mapped
back through the query's rope map: the rope rows q_proj adds to the group's query, or Qwen3's q_rope_proj);
with separate latents and with one joint latent (--latent joint), whose value and key rows read the same latent
(Qwen3: the sum of k_latent_proj's latent rows on the keys and v_latent_proj's on X).
"""
from __future__ import annotations

import pytest
import torch

from converter import calib_data
from converter.pipeline import convert
from tests import format_reference
from tests.tiny_models import make_tiny_original


def _attention_inputs(src, windows: torch.Tensor) -> tuple[object, list[torch.Tensor]]:
    """The fp64 original model and each layer's attention input [tokens, D] on `windows`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.input_layernorm.register_forward_hook(
        lambda _m, _i, out, l=l: captured.__setitem__(l, out.reshape(-1, out.shape[-1])))
        for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return model, [captured[l] for l in range(len(model.model.layers))]


@pytest.mark.parametrize("arch,latent", [("llama", "separate"), ("qwen3", "separate"), ("llama", "joint"),
                                         ("qwen3", "joint")])
def test_reported_value_errors_are_those_of_the_written_checkpoint(arch, latent, tmp_path, calib_file):
    from transformers import AutoTokenizer

    src = make_tiny_original(tmp_path / "orig", arch, num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    samples, seqlen = 8, 64
    report = convert(src, tmp_path / "mla", calib_files=[calib_file], kv_ratio=0.5, ranks="adjusted",
                     calib_samples=samples, calib_seqlen=seqlen, rope_dim=8, latent=latent)
    windows = calib_data.token_windows(AutoTokenizer.from_pretrained(src), calib_data.read_texts([calib_file]),
                                       samples, seqlen, seed=0)
    model, inputs = _attention_inputs(src, windows)
    cfg, t = format_reference.load_checkpoint(tmp_path / "mla")
    n_h, d_h, g = cfg["num_attention_heads"], cfg["v_head_dim"], cfg["original_num_key_value_heads"]
    d_r = cfg["qk_rope_head_dim"]
    assert cfg.get("joint_latent", False) == (latent == "joint")
    errors, k_errors = [], []
    for l, x in enumerate(inputs):
        r_k, r_v = cfg["k_ranks"][l], cfg["v_ranks"][l]
        r = r_k + r_v
        p = f"model.layers.{l}.self_attn."
        attn = model.model.layers[l].self_attn
        if cfg["use_qk_norm"]:
            k = attn.k_norm((x @ attn.k_proj.weight.T).view(-1, g, d_h)).reshape(-1, g * d_h)
            k_out = k @ t[p + "k_latent_proj.weight"].T
            c_v = x @ t[p + "v_latent_proj.weight"].T
            c = k_out[:, :r] + c_v if latent == "joint" else torch.cat([k_out[:, :r_k], c_v], -1)
            k_pe = k_out[:, -d_r:]
            q_rope = t[p + "q_rope_proj.weight"].view(n_h, d_r, d_h)   # Q_S of head h's group, as it is
        else:
            k = x @ attn.k_proj.weight.T
            a_out = x @ t[p + "kv_a_proj_with_mqa.weight"].T
            c, k_pe = a_out[:, :r], a_out[:, r:]
            q_rows = t[p + "q_proj.weight"].view(n_h, d_h + d_r, -1)
            # the rope rows of head h's query are Q_S,a W_Q,h: recover the group's rope map Q_S,a [d_r, d_h]
            q_rope = [torch.linalg.lstsq(q_rows[h, :d_h].T, q_rows[h, d_h:].T).solution.T for h in range(n_h)]
        kv_b = t[p + "kv_b_proj.weight"].view(n_h, 2 * d_h, r)
        v_hat = torch.cat([c @ kv_b[a * (n_h // g), d_h:].T for a in range(g)], -1)
        v = x @ attn.v_proj.weight.T
        errors.append(((v - v_hat).norm() / v.norm()).item())
        k_hat = [c @ kv_b[a * (n_h // g), :d_h].T + k_pe @ q_rope[a * (n_h // g)] for a in range(g)]
        k_errors.append(((k - torch.cat(k_hat, -1)).norm() / k.norm()).item())
    # KV 0.5 really drops something (in every layer with separate latents; the joint latent keeps layer 0, whose
    # inputs, embeddings of the calibration text's few distinct words, span few directions, almost whole)
    assert min(errors[1:] + k_errors[1:]) > 0.01, (errors, k_errors)
    reported = [layer["v_rel_error"] for layer in report["layers"]]
    assert errors == pytest.approx(reported, rel=1e-3, abs=1e-5), (errors, reported)
    reported = [layer["k_rel_error"] for layer in report["layers"]]
    assert k_errors == pytest.approx(reported, rel=1e-3, abs=1e-5), (k_errors, reported)


@pytest.mark.parametrize("method,weighted", [("care", False), ("care", True), ("svd", False), ("asvd", False)])
def test_error_curve_equals_the_direct_error_at_every_rank(method, weighted):
    """The report's errors come from factorize.error_curve (so the covariances can be freed before the
    ranks are known); at every rank it must equal tr((A - Â) C (A - Â)^T) computed directly. Also: a
    light() factor materialized at rank r is the rank-r truncation of the full one."""
    from converter import factorize

    g = torch.Generator().manual_seed(7)
    a = torch.randn(12, 20, generator=g, dtype=torch.float64)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 20, dtype=torch.float64)
    c = x.T @ x
    m = None
    if weighted:
        b = torch.randn(12, 12, generator=g, dtype=torch.float64)
        m = b @ b.T
    f = factorize.factorize(a, c, x.abs().mean(0), method, out_weight=m)
    curve = factorize.error_curve(a, f, c, total=123.0)
    assert curve.shape == (13,)
    for r in range(0, 13):
        direct = factorize.relative_error(a, f.approx(r), c, 123.0)
        assert curve[r].item() == pytest.approx(direct, rel=1e-9, abs=1e-9), r
        rebuilt = f.light().keep(r).materialize(a, r)
        torch.testing.assert_close(rebuilt.approx(r), f.approx(r), rtol=0, atol=1e-12)
