"""converter.calibrate's statistics equal the moments of a plain forward pass of the original model.

Calibration keeps, per layer, only output-space moments (keys, values, per-head queries, all before
RoPE), ASVD's sum |x| and the damping's scale mean(diag C_x); each layer's [D, D] input covariance is
reduced as soon as the layer is done. The reference shares nothing with it: one whole-model forward of
the transformers original with hooks on the attention's projections (and Qwen3's k_norm/q_norm), and
the outer products of what they output summed directly (less the biases where the latents are fitted
to the weights' linear part: Qwen2).
"""
from __future__ import annotations

import json

import pytest
import torch

from converter import calibrate, load
from tests.tiny_models import make_tiny_original


@pytest.mark.parametrize("source", ["llama", "qwen3", "qwen3_moe", "qwen2", "llama_eager"])
def test_statistics_are_those_of_a_forward_pass(source, tmp_path):
    """(llama_eager: a config.json naming eager attention, which reads a missing mask as "attend to everything":
    calibrating layer by layer without a mask had made its statistics non-causal from layer 1 on.)"""
    folder = make_tiny_original(tmp_path / source, source.removesuffix("_eager"), num_layers=2)
    if source.endswith("_eager"):
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "attn_implementation": "eager"}))
    src = load.load_source(folder)
    assert src.model.config._attn_implementation == ("eager" if source.endswith("_eager") else "sdpa")
    arch = src.arch          # attention family: qwen3_moe has Qwen3's attention
    windows = torch.randint(0, 16384, (3, 24), generator=torch.Generator().manual_seed(5))
    stats = calibrate.collect_stats(src.model, windows, arch, batch_size=2)
    cfg = src.model.config
    n_h, d_h = cfg.num_attention_heads, cfg.head_dim
    seen = [{} for _ in src.model.model.layers]

    def record(l, name):
        def hook(_module, _inputs, out):
            seen[l].setdefault(name, []).append(out.double())
        return hook

    hooks = []
    for l, layer in enumerate(src.model.model.layers):
        a = layer.self_attn
        hooks.append(layer.input_layernorm.register_forward_hook(record(l, "x")))
        hooks.append(a.v_proj.register_forward_hook(record(l, "v")))
        # Qwen3's keys/queries as attention uses them: after the per-head norms, before RoPE
        hooks.append((a.k_norm if arch == "qwen3" else a.k_proj).register_forward_hook(record(l, "k")))
        hooks.append((a.q_norm if arch == "qwen3" else a.q_proj).register_forward_hook(record(l, "q")))
    with torch.no_grad():
        src.model(windows)
    for h in hooks:
        h.remove()

    assert stats.tokens == windows.numel()
    for l, s in enumerate(stats.layers):
        x, k, v, q = (torch.cat([t.reshape(windows.numel(), -1) for t in seen[l][n]]) for n in "xkvq")
        q = q.view(-1, n_h, d_h)
        close = dict(rtol=1e-4, atol=1e-3)
        # Qwen2's biases: the queries and the keys RoPE rotates keep them; the moments the K and V latents are
        # fitted to are of W x alone (the key bias's NoPE part and the value bias leave exactly: assemble.py)
        a = src.model.model.layers[l].self_attn
        k_lin, v_lin = (t - lin.bias.double() if lin.bias is not None else t for t, lin in ((k, a.k_proj), (v, a.v_proj)))
        assert (s.ck_rope is not None) == (a.k_proj.bias is not None)
        torch.testing.assert_close(s.rotated_key_moment, k.T @ k, **close)
        torch.testing.assert_close(s.ck, k_lin.T @ k_lin, **close)
        torch.testing.assert_close(s.cv, v_lin.T @ v_lin, **close)
        # the key/value cross moment a joint latent (--latent joint) is fitted with (Qwen3: of the post-norm keys)
        torch.testing.assert_close(s.ckv, k_lin.T @ v_lin, **close)
        torch.testing.assert_close(s.qc, torch.einsum("thd,the->hde", q, q), **close)
        torch.testing.assert_close(s.qd, (q * q).sum(0), **close)
        torch.testing.assert_close(s.ax, x.abs().sum(0), **close)
        assert s.x_scale == pytest.approx((x * x).sum().item() / x.shape[1], rel=1e-5)
        assert s.ck.dtype == s.cv.dtype == s.qc.dtype == torch.float64


def test_a_stats_cache_holds_no_input_covariance(tmp_path):
    """What --stats-cache writes is the reduced statistics: per layer nothing of size hidden^2."""
    from converter.pipeline import convert

    src = make_tiny_original(tmp_path / "llama", "llama", num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)
    calib = tmp_path / "calib.txt"
    calib.write_text("a few words of calibration text, repeated. " * 200)
    cache = tmp_path / "stats.pt"
    convert(src, tmp_path / "out", calib_files=[calib], calib_samples=4, calib_seqlen=32, stats_cache=str(cache))
    saved = torch.load(cache, weights_only=False)
    assert saved["meta"]["stats_version"] == calibrate.STATS_VERSION
    for layer in saved["layers"]:
        assert sorted(layer) == ["ax", "ck", "ck_rope", "ckv", "cv", "qc", "x_scale"] and layer["ck_rope"] is None
        assert layer["ck"].shape == layer["cv"].shape == layer["ckv"].shape == (2 * 16, 2 * 16)
        assert layer["qc"].shape == (4, 16, 16) and layer["ax"].shape == (64,)
