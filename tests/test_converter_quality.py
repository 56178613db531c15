"""On the two small models trained here (../shared/models), with calibration text and held-out text
from different local files:

* `care` has a lower K and V activation error than weight-only `svd` at every rank, measured on the
  HELD-OUT text's statistics (not the calibration data it was fitted on);
* adjusted allocation spends exactly the budget, and the cache never exceeds the original's.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from converter import calib_data, calibrate, factorize, load, rope_map
from converter.pipeline import convert
from tests.license_texts import CALIB, HELD_OUT, require_license_texts
from tests.tiny_models import SHARED, require_shared


def _windows(source, files, samples, seqlen, seed):
    return calib_data.token_windows(source.tokenizer, calib_data.read_texts(files), samples, seqlen, seed)


def _forward_moments(source, windows) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Reference statistics from a plain forward pass of the original model (hooks; shares nothing with
    converter.calibrate): per layer the whole attention-input covariance C_x and, for Qwen3, the
    post-k_norm keys' moment. Run in fp32 (the source may be stored in bf16)."""
    model = copy.deepcopy(source.model).float()
    layers = model.model.layers
    seen = [[None, None] for _ in layers]

    def add(l, i, t):
        t = t.reshape(-1, t.shape[-1] if i == 0 else t.shape[-2] * t.shape[-1]).double()
        seen[l][i] = t.T @ t if seen[l][i] is None else seen[l][i] + t.T @ t

    hooks = [layer.input_layernorm.register_forward_hook(lambda _m, _i, out, l=l: add(l, 0, out))
             for l, layer in enumerate(layers)]
    if source.arch == "qwen3":
        hooks += [layer.self_attn.k_norm.register_forward_hook(lambda _m, _i, out, l=l: add(l, 1, out))
                  for l, layer in enumerate(layers)]
    with torch.no_grad():
        for i in range(0, windows.shape[0], 8):
            model(windows[i:i + 8])
    for h in hooks:
        h.remove()
    return [tuple(s) for s in seen]


@pytest.fixture(scope="module", params=["llama3-small", "qwen3-small"])
def model_stats(request):
    src = require_shared(SHARED / "models" / request.param)
    require_license_texts()
    source = load.load_source(src)
    calibration = calibrate.collect_stats(source.model, _windows(source, CALIB, 32, 256, 0), source.arch)
    return source, calibration, _forward_moments(source, _windows(source, HELD_OUT, 32, 256, 1))


def test_care_beats_svd_on_held_out_text_at_every_rank(model_stats):
    """Fitted on the converter's calibration statistics, scored on covariances of held-out text taken
    from the original model's forward pass."""
    source, cal, held_out = model_stats
    cfg = source.config
    g, d_h = cfg.num_key_value_heads, cfg.head_dim
    d_r = 32
    for l, layer in enumerate(source.model.model.layers):
        a = layer.self_attn
        wk, wv = a.k_proj.weight.detach().double(), a.v_proj.weight.detach().double()
        cs, (held_x, held_k) = cal.layers[l], held_out[l]
        energy, mixing = rope_map.frequency_pca(cs.ck, g, d_h)
        rm = rope_map.build_map(energy, mixing, rope_map.shared_pair_counts([energy], d_r),
                                torch.ones(d_h // 2), g, d_h)
        key_moment = factorize.Moment(rm.q_n @ cs.ck @ rm.q_n.T, cs.x_scale)
        if source.arch == "qwen3":
            gamma = a.k_norm.weight.detach().double().repeat(g)
            k_target, k_cov = rm.q_n, held_k
            key_moment.scale = cs.ck.diagonal().mean().item()
            care_k = factorize.factorize(rm.q_n, key_moment, None, "care")
            svd_k = factorize.projection_factor(rm.q_n, factorize.factorize(rm.q_n @ (gamma[:, None] * wk),
                                                                            None, cs.ax, "svd"))
        else:
            k_target, k_cov = rm.q_n @ wk, held_x
            care_k = factorize.factorize(k_target, key_moment, cs.ax, "care")
            svd_k = factorize.factorize(k_target, None, cs.ax, "svd")
        care_v = factorize.factorize(wv, factorize.Moment(cs.cv, cs.x_scale), cs.ax, "care")
        svd_v = factorize.factorize(wv, None, cs.ax, "svd")
        for name, target, cov, fc, fs in (("K", k_target, k_cov, care_k, svd_k), ("V", wv, held_x, care_v, svd_v)):
            full = target.shape[0]
            for r in range(1, full):  # at full rank both are exact
                e_care = factorize.relative_error(target, fc.approx(r), cov)
                e_svd = factorize.relative_error(target, fs.approx(r), cov)
                assert e_care < e_svd, f"layer {l} {name} rank {r}: care {e_care:.4f} >= svd {e_svd:.4f}"


@pytest.mark.parametrize("policy", ["uniform", "adjusted"])
@pytest.mark.parametrize("ratio", [1.0, 0.75, 0.5, 0.25])
def test_budget_is_spent_exactly(tmp_path, policy, ratio):
    src = require_shared(SHARED / "models" / "qwen3-small")
    stats = tmp_path.parent / "qwen3-small-stats.pt"  # shared by the parametrized cases
    report = convert(src, tmp_path / "out", calib_files=CALIB, ranks=policy, kv_ratio=ratio,
                     calib_samples=8, calib_seqlen=128, stats_cache=str(stats))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    original = report["original_cache_values_per_token"]
    assert original == 6 * 2 * 2 * 64
    expected = int(ratio * original)
    per_layer = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    assert sum(per_layer) == report["cache_values_per_token"] == expected <= original
    assert [(l["k_rank"], l["v_rank"]) for l in report["layers"]] == list(zip(cfg["k_ranks"], cfg["v_ranks"]))
    if policy == "adjusted" and ratio < 1.0:
        assert len(set(per_layer)) > 1, "adjusted ranks should differ across layers"
    for key in ("method", "rank_policy", "layers", "cache_values_per_token", "original_cache_values_per_token",
                "calibration", "seconds"):
        assert key in report
    assert (tmp_path / "out" / "care_ranks.png").stat().st_size > 1000


def test_uniform_policy_gives_every_layer_the_same_width():
    """A budget that divides evenly must give one width everywhere (576 = 512 + 64 is what vLLM's
    stock MLA kernels take), even when K and V have different lossless widths."""
    from converter.allocate import plan_ranks

    n, d_r = 32, 64
    full_k, full_v = [1024 - d_r] * n, [1024] * n       # Llama-8B shapes
    k, v = plan_ranks("uniform", 576 * n, d_r, full_k, full_v, [], [])
    assert {a + b + d_r for a, b in zip(k, v)} == {576}
    assert sum(k) + sum(v) + n * d_r == 576 * n
    assert all(a <= b for a, b in zip(k, v))            # K (960 wide) gets no more than V (1024)


@pytest.mark.parametrize("policy", ["uniform", "adjusted"])
def test_rank_multiple_allocates_whole_units(policy):
    """--rank-multiple M: every rank a multiple of M, the budget spent to within one unit, and (adjusted) the
    units go where the single-value water-filling puts its ranks: each layer within two units of it (here the
    layers whose spectra decay fastest get the most: the paper's score is the next value's share of what is left)."""
    from converter.allocate import plan_ranks

    n, d_r, m = 8, 64, 32
    full_k, full_v = [1024 - d_r] * n, [1024] * n
    sig = [torch.logspace(1, -1 - 0.5 * l, 1024) for l in range(n)]   # layer 0 decays slowest
    budget = 600 * n + 17
    k, v = plan_ranks(policy, budget, d_r, full_k, full_v, sig, sig, multiple=m)
    assert all(r % m == 0 for r in k + v) and all(r >= m for r in v)
    cache = sum(k) + sum(v) + n * d_r
    assert budget - m < cache <= budget
    k1, v1 = plan_ranks(policy, budget, d_r, full_k, full_v, sig, sig)
    assert all(abs(a - b) <= 2 * m for a, b in zip(k + v, k1 + v1)), (k, v, k1, v1)
    if policy == "adjusted":
        assert len(set(k)) > 1 and len(set(v)) > 1


def test_rank_multiple_conversion_writes_whole_units(tmp_path):
    """A real conversion with --rank-multiple: the config's ranks are whole units, the cache and the report
    say what was spent (below the budget by less than a unit), and the model runs in model_defs."""
    src = require_shared(SHARED / "models" / "qwen3-small")
    stats = tmp_path.parent / "qwen3-small-stats.pt"  # shared with test_budget_is_spent_exactly
    report = convert(src, tmp_path / "out", calib_files=CALIB, ranks="adjusted", kv_ratio=0.4, rope_dim=32,
                     rank_multiple=16, calib_samples=8, calib_seqlen=128, stats_cache=str(stats))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert all(r % 16 == 0 for r in cfg["k_ranks"] + cfg["v_ranks"])
    assert len(set(zip(cfg["k_ranks"], cfg["v_ranks"]))) > 1, "adjusted ranks should differ across layers"
    original = report["original_cache_values_per_token"]
    budget = int(0.4 * original)
    cache = sum(k + v + 32 for k, v in zip(cfg["k_ranks"], cfg["v_ranks"]))
    assert report["cache_values_per_token"] == cache and budget - 16 < cache <= budget
    assert report["kv_ratio"] == cache / original and report["options"]["rank_multiple"] == 16
    import model_defs  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.parametrize("policy", ["uniform", "adjusted"])
@pytest.mark.parametrize("share", [0.25, 0.6])
def test_k_share_sets_the_k_part_of_the_latent(policy, share):
    """--k-share moves latent from V to K (or back) without changing any layer's total for uniform,
    nor the total budget; the default splits in proportion to the lossless widths."""
    from converter.allocate import plan_ranks

    n, d_r = 8, 64
    full_k, full_v = [1024 - d_r] * n, [1024] * n
    sig = [torch.linspace(10, 0.1, 1024) * (1 + l) for l in range(n)]
    budget = 576 * n
    k0, v0 = plan_ranks(policy, budget, d_r, full_k, full_v, sig, sig)
    k, v = plan_ranks(policy, budget, d_r, full_k, full_v, sig, sig, k_share=share)
    latent = budget - n * d_r
    assert sum(k) + sum(v) == sum(k0) + sum(v0) == latent
    assert abs(sum(k) - latent * share) <= (n if policy == "uniform" else 1)   # uniform rounds per layer
    assert abs(sum(k0) / latent - 960 / 1984) < 1e-2
    if policy == "uniform":
        assert [a + b for a, b in zip(k, v)] == [a + b for a, b in zip(k0, v0)] == [512] * n


def test_bf16_source_stays_bf16_in_memory_and_converts_bit_identically(tmp_path):
    """The source is kept in its stored dtype (half the RAM of fp32 for an 8B model); since every
    computation upcasts per layer, the checkpoint must equal the one made from an fp32 load. With the
    default --dtype auto a bf16 source gives a bf16 checkpoint: exactly the fp32 one rounded to bf16."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from converter.pipeline import Options, convert_source

    src = require_shared(SHARED / "models" / "qwen3-small")
    stored = load.load_source(src)
    assert stored.model.dtype == torch.bfloat16
    assert stored.model.model.rotary_emb.inv_freq.dtype == torch.float32
    fp32 = load.Source(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), stored.tokenizer,
                       stored.arch, str(src), stored.src_dir)
    assert torch.equal(stored.model.model.rotary_emb.inv_freq, fp32.model.model.rotary_emb.inv_freq)
    windows = torch.randint(3, 16000, (4, 64), generator=torch.Generator().manual_seed(0))
    outs, dtypes = {}, {}
    for source, tag, dtype in ((stored, "stored", "float32"), (fp32, "fp32", "float32"),
                               (stored, "stored_auto", None), (fp32, "fp32_auto", None)):  # None: the default
        kw = {} if dtype is None else {"dtype": dtype}
        convert_source(source, windows, tmp_path / tag, Options(kv_ratio=0.5, calib_samples=4, calib_seqlen=64, **kw))
        outs[tag] = load_file(str(tmp_path / tag / "model.safetensors"))
        dtypes[tag] = json.loads((tmp_path / tag / "config.json").read_text())["dtype"]
    assert outs["stored"].keys() == outs["fp32"].keys() == outs["stored_auto"].keys()
    assert all(torch.equal(outs["stored"][k], outs["fp32"][k]) for k in outs["stored"])
    assert dtypes == {"stored": "float32", "fp32": "float32", "stored_auto": "bfloat16", "fp32_auto": "float32"}
    assert all(t.dtype == torch.bfloat16 for t in outs["stored_auto"].values())
    assert all(torch.equal(outs["stored_auto"][k], outs["fp32"][k].to(torch.bfloat16)) for k in outs["fp32"])
    assert all(torch.equal(outs["fp32_auto"][k], outs["fp32"][k]) for k in outs["fp32"])
