"""model_defs: the transformers reference for care_mla checkpoints (docs/FORMAT.md).

Random tiny models with DIFFERENT latent ranks per layer (one layer with r_K = 0) and a full
(non-block-diagonal) kv_b_proj, for both front-ends (Llama: linear; Qwen3: q_norm/k_norm kept), and Qwen3's
with a joint latent (care-convert --latent joint: k_latent_proj's latent rows add to v_latent_proj's).
Checked: plain == absorbed attention, cached == recomputed generation, left padding == no
padding, save/load round trip with exactly the FORMAT.md tensors, and one attention layer against
a per-head loop written here straight from FORMAT.md's equations (no model code involved).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import model_defs  # noqa: F401  (registers care_mla)
from model_defs import CareMLAConfig
from model_defs.modeling_care import CareMLAForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "qwen3", "qwen3-joint")
PATHS = ("plain", "absorbed")
K_RANKS = [0, 5, 12]   # r_K = 0 on layer 0: its keys are rope-only
V_RANKS = [3, 7, 4]


def tiny_config(arch: str, tied: bool = True, **overrides) -> CareMLAConfig:
    joint = arch == "qwen3-joint"   # the same cache widths, as one latent per layer
    kw = dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        original_num_key_value_heads=2, original_head_dim=12, qk_rope_head_dim=6,
        k_ranks=[0] * 3 if joint else list(K_RANKS),
        v_ranks=[k + v for k, v in zip(K_RANKS, V_RANKS)] if joint else list(V_RANKS),
        use_qk_norm=arch.startswith("qwen3"), joint_latent=joint,
        rope_inv_freq=[1.0, 0.31, 0.05], rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kw.update(overrides)
    return CareMLAConfig(**kw)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with sharp attention (scores O(1..10)) so that a wrong rope, mask or
    absorption cannot hide behind near-uniform softmax; norm weights non-trivial; kv_b_proj full,
    i.e. K rows also read c_V and V rows also read c_K (what a healed model may look like)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:  # logits O(1..5): fp32 noise ~1e-6
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            if name.endswith(("q_proj.weight", "kv_a_proj_with_mqa.weight", "k_proj.weight")):
                p.mul_(2.0)
    return model


def tiny_model(arch: str, tied: bool = True, seed: int = 0, attn_implementation: str | None = None,
               **overrides) -> CareMLAForCausalLM:
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, **overrides),
                                             attn_implementation=attn_implementation)
    return randomize(model, seed).eval()


def ids(batch: int, length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, path, **kw) -> torch.Tensor:
    model.set_attention_path(path)
    with torch.no_grad():
        return model(input_ids, **kw).logits


# ---------------------------------------------------------------- config


def test_config_ranks_and_cache_size_by_hand():
    cfg = tiny_config("llama")
    assert cfg.kv_lora_rank == max(k + v for k, v in zip(K_RANKS, V_RANKS)) == 16
    assert [cfg.layer_rank(l) for l in range(3)] == list(zip(K_RANKS, V_RANKS))
    # (0+3+6) + (5+7+6) + (12+4+6)
    assert cfg.cache_values_per_token() == 9 + 18 + 22


def test_config_round_trip_has_no_gqa_keys(tmp_path):
    cfg = tiny_config("qwen3", source_rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      care={"method": "care", "kv_ratio": 0.5})
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("head_dim", "num_key_value_heads", "rope_parameters", "rope_scaling", "rope_theta"):
        assert key not in raw
    assert raw["model_type"] == "care_mla" and raw["k_ranks"] == K_RANKS and raw["kv_lora_rank"] == 16
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, CareMLAConfig)
    assert {k: v for k, v in back.to_dict().items() if k != "_name_or_path"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}
    assert not hasattr(back, "num_key_value_heads") and not hasattr(back, "head_dim")


@pytest.mark.parametrize("arch, variant", [("llama", "CareLlamaForCausalLM"), ("qwen3", "CareQwen3ForCausalLM")])
def test_a_model_saved_under_the_generic_class_name_reads_as_its_variant(tmp_path, arch, variant):
    """vLLM dispatches on config.architectures. A model built as the generic CareMLAForCausalLM is the variant
    class, so its save keeps the name; and a config.json that says "CareMLAForCausalLM" anyway (written by a
    remote-code copy from before that held under trust_remote_code, then re-saved by a quantizer or a trainer)
    reads as the variant."""
    model = tiny_model(arch)
    assert type(model).__name__ == variant
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [variant]
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    raw["architectures"] = ["CareMLAForCausalLM"]
    (tmp_path / "generic").mkdir()
    (tmp_path / "generic" / "config.json").write_text(json.dumps(raw))
    assert AutoConfig.from_pretrained(tmp_path / "generic").architectures == [variant]


@pytest.mark.parametrize("bad, msg", [
    (dict(k_ranks=[1, 2]), "3 entries"),
    (dict(v_ranks=[1, 0, 1]), "v_ranks"),
    (dict(qk_rope_head_dim=5, rope_inv_freq=[1.0, 0.5]), "even"),
    (dict(rope_inv_freq=[1.0, 0.5]), "rope_inv_freq"),
    (dict(kv_lora_rank=99), "kv_lora_rank"),
    (dict(care_attention_path="fast"), "care_attention_path"),
    (dict(use_qk_norm=True, attention_bias=True), "attention_bias is only defined for the Llama-path"),
    (dict(joint_latent=True), "joint latent is written as v_ranks with k_ranks all 0"),
])
def test_config_rejects_inconsistent_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config("llama", **bad)


# ---------------------------------------------------------------- attention paths


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_equals_absorbed(arch):
    # fp64: the two paths are the same algebra (they differ by ~1e-13 here); in fp32 the fused CPU
    # attention's rounding alone reached 1.2e-5 on logits up to ~7 (the per-head test below checks each
    # path in fp32 against an fp64 loop)
    model = tiny_model(arch).double()
    x = ids(2, 19)
    plain, absorbed = logits(model, x, "plain"), logits(model, x, "absorbed")
    assert plain.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (plain - absorbed).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch, bias", [("llama", False), ("llama", True), ("qwen3", False), ("qwen3-joint", False)])
def test_scaling_the_latent_keeps_the_model(arch, bias):
    """scale_latent_ (what healing balances the factors with) moves scale between a latent dimension's producers
    and its kv_b_proj column and changes nothing the model computes, by either attention path; fp64."""
    model = tiny_model(arch, **({"attention_bias": True} if bias else {})).double()
    x = ids(2, 19)
    ref = logits(model, x, "plain")
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.scale_latent_(torch.exp(torch.empty(attn.rank, dtype=torch.float64).uniform_(-7, 7, generator=g)))
    for path in PATHS:
        torch.testing.assert_close(logits(model, x, path), ref, rtol=1e-9, atol=1e-9)


def _per_head_reference(attn, cfg: CareMLAConfig, layer: int, x: torch.Tensor,
                        pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention layer, fp64, written from FORMAT.md with explicit loops over heads and
    rotation pairs; reads only the layer's weights. (output [T, D], attention weights [n_h, T, T])."""
    w = {k: v.double() for k, v in attn.state_dict().items()}
    n_h, d_h, d_r, g = cfg.num_attention_heads, cfg.original_head_dim, cfg.qk_rope_head_dim, cfg.original_num_key_value_heads
    r_k, r_v = cfg.k_ranks[layer], cfg.v_ranks[layer]
    eps, T = cfg.rms_norm_eps, x.shape[0]
    x = x.double()

    def rms(v, weight):
        return weight * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)

    def rope(v):  # v [T, d_r]
        out = v.clone()
        for p in range(d_r // 2):
            ang = (pos.float() * torch.tensor(cfg.rope_inv_freq[p], dtype=torch.float32)).double()
            a, b = v[:, p], v[:, p + d_r // 2]
            out[:, p] = a * ang.cos() - b * ang.sin()
            out[:, p + d_r // 2] = b * ang.cos() + a * ang.sin()
        return out

    if cfg.use_qk_norm:
        q = x @ w["q_proj.weight"].T
        q_nope = [rms(q[:, h * d_h:(h + 1) * d_h], w["q_norm.weight"]) for h in range(n_h)]
        q_pe = [q_nope[h] @ w["q_rope_proj.weight"][h * d_r:(h + 1) * d_r].T for h in range(n_h)]
        kfull = x @ w["k_proj.weight"].T
        k = torch.cat([rms(kfull[:, j * d_h:(j + 1) * d_h], w["k_norm.weight"]) for j in range(g)], -1)
        kl = k @ w["k_latent_proj.weight"].T
        c_v = x @ w["v_latent_proj.weight"].T
        if cfg.joint_latent:   # FORMAT.md: the key part and the value part of one latent add up
            c, k_pe = kl[:, :r_v] + c_v, kl[:, r_v:]
        else:
            c, k_pe = torch.cat([kl[:, :r_k], c_v], -1), kl[:, r_k:]
    else:
        q = x @ w["q_proj.weight"].T
        q_nope = [q[:, h * (d_h + d_r):h * (d_h + d_r) + d_h] for h in range(n_h)]
        q_pe = [q[:, h * (d_h + d_r) + d_h:(h + 1) * (d_h + d_r)] for h in range(n_h)]
        a = x @ w["kv_a_proj_with_mqa.weight"].T
        c, k_pe = a[:, :r_k + r_v], a[:, r_k + r_v:]
    k_pe = rope(k_pe)
    wb = w["kv_b_proj.weight"]
    outs, probs = [], torch.zeros(n_h, T, T, dtype=torch.float64)
    for h in range(n_h):
        w_uk, w_uv = wb[h * 2 * d_h:h * 2 * d_h + d_h], wb[h * 2 * d_h + d_h:(h + 1) * 2 * d_h]
        k_nope, v = c @ w_uk.T, c @ w_uv.T
        qp = rope(q_pe[h])
        out = torch.zeros(T, d_h, dtype=torch.float64)
        for t in range(T):
            s = torch.tensor([cfg.softmax_scale * (q_nope[h][t] @ k_nope[s_] + qp[t] @ k_pe[s_]) for s_ in range(t + 1)])
            probs[h, t, :t + 1] = torch.softmax(s.double(), 0)
            out[t] = probs[h, t, :t + 1] @ v[:t + 1]
        outs.append(out)
    return torch.cat(outs, -1) @ w["o_proj.weight"].T, probs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [0, 1])   # layer 0 has r_K = 0
@pytest.mark.parametrize("path", PATHS)
def test_one_layer_against_per_head_loop(arch, layer, path):
    model = tiny_model(arch, seed=3)
    model.set_attention_path(path)
    cfg = model.config
    attn = model.model.layers[layer].self_attn
    T = 9
    x = torch.randn(1, T, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(3, 3 + T)  # not starting at 0: rope must use the given positions
    cos_sin = model.model.rotary_emb(pos[None])
    from model_defs.modeling_care import build_attention_mask

    with torch.no_grad():
        got, _ = attn(x, cos_sin, attention_mask=build_attention_mask(None, 1, T, 0, x.device))
    ref, _ = _per_head_reference(attn, cfg, layer, x[0], pos)
    assert ref.abs().max() > 0.1
    assert (got[0].double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
def test_eager_attention_returns_the_per_head_weights(arch, path):
    """attn_implementation="eager" (what output_attentions needs) returns every layer's softmax weights, equal to
    the per-head loop's, and the same logits as SDPA."""
    x = ids(1, 9, seed=4)
    sdpa = logits(tiny_model(arch, seed=3), x, path)
    model = tiny_model(arch, seed=3, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model.set_attention_path(path)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
    assert (out.logits - sdpa).abs().max().item() < 1e-5
    assert len(out.attentions) == model.config.num_hidden_layers
    pos = torch.arange(9)
    for layer, weights in enumerate(out.attentions):
        assert weights.shape == (1, model.config.num_attention_heads, 9, 9)
        attn = model.model.layers[layer].self_attn
        normed = model.model.layers[layer].input_layernorm(out.hidden_states[layer])[0]
        _, ref = _per_head_reference(attn, model.config, layer, normed.detach(), pos)
        assert (weights[0].double() - ref).abs().max().item() < 1e-5, layer


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_model_matches_format_reference_file_reader(arch, tmp_path):
    """The repo's naive FORMAT.md reader (tests/format_reference.py) on the saved files agrees."""
    from tests import format_reference

    model = tiny_model(arch, seed=4)
    model.save_pretrained(tmp_path)
    x = ids(1, 13, seed=6)
    ref = format_reference.logits(tmp_path, x[0].tolist())
    for path in PATHS:
        assert (logits(model, x, path)[0].double() - ref).abs().max().item() < 1e-4


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
def test_cache_holds_only_the_latent_and_steps_match_full_forward(arch, path):
    model = tiny_model(arch, seed=7)
    model.set_attention_path(path)
    x = ids(2, 12, seed=8)
    full = logits(model, x, path)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(x[:, :5], past_key_values=cache, use_cache=True).logits]
        for t in range(5, 12):
            steps.append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    # 1-token steps take other kernels/reduction orders than the full pass: fp32 noise, not 0
    assert (torch.cat(steps, 1) - full).abs().max().item() < 5e-5
    d_r = model.config.qk_rope_head_dim
    for l, (k, v) in enumerate(zip(K_RANKS, V_RANKS)):
        assert tuple(cache.layers[l].keys.shape) == (2, 1, 12, k + v)
        assert tuple(cache.layers[l].values.shape) == (2, 1, 12, d_r)


def _greedy_by_recomputation(model, x, n):
    out = x
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
def test_generate_with_cache_equals_recomputation(arch, path):
    model = tiny_model(arch, seed=9)
    model.set_attention_path(path)
    x = ids(2, 6, seed=10)
    with torch.no_grad():
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                             use_cache=True, output_scores=True, return_dict_in_generate=True)
    ref = _greedy_by_recomputation(model, x, 10)
    assert torch.equal(gen.sequences, ref)
    with torch.no_grad():
        ref_logits = model(ref[:, :-1]).logits[:, 5:]
    assert (torch.stack(gen.scores, 1) - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_given_only_the_new_tokens_mask_is_placed_after_the_past(arch):
    """A 2-D attention_mask covering only the new tokens means a real past (build_attention_mask): the positions
    must then continue from the cache, as with the full mask, not restart at 0."""
    model = tiny_model(arch, seed=7)
    x = ids(2, 12, seed=8)
    full = logits(model, x, "plain")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(x[:, :5], past_key_values=cache, use_cache=True).logits]
        steps.append(model(x[:, 5:6], attention_mask=torch.ones(2, 1), past_key_values=cache, use_cache=True).logits)
        steps.append(model(x[:, 6:], attention_mask=torch.ones(2, 6), past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 5e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
def test_generate_with_a_static_cache_equals_recomputation(arch, path):
    """generate(cache_implementation="static") (preallocated rows, the route to torch.compile): the unwritten rows
    are masked."""
    model = tiny_model(arch, seed=9)
    model.set_attention_path(path)
    x = ids(2, 6, seed=10)
    with torch.no_grad():
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                             cache_implementation="static")
    assert torch.equal(gen, _greedy_by_recomputation(model, x, 10))


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PATHS)
def test_left_padded_batch_equals_each_sample_alone(arch, path):
    model = tiny_model(arch, seed=11)
    a, b = ids(1, 11, seed=12)[0], ids(1, 6, seed=13)[0]
    pad = 4
    x = torch.stack([a, torch.cat([torch.full((5,), pad), b])])
    mask = torch.tensor([[1] * 11, [0] * 5 + [1] * 6])
    batched = logits(model, x, path, attention_mask=mask)
    alone_a, alone_b = logits(model, a[None], path)[0], logits(model, b[None], path)[0]
    assert torch.isfinite(batched).all()
    # a masking/position bug shows up as O(1) differences; the rest is fp32 kernel noise
    assert (batched[0] - alone_a).abs().max().item() < 3e-5
    assert (batched[1, 5:] - alone_b).abs().max().item() < 3e-5

    with torch.no_grad():
        gen = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for row, seq in ((0, a), (1, b)):
        assert torch.equal(gen[row, 11:], _greedy_by_recomputation(model, seq[None], 6)[0, len(seq):])


# ---------------------------------------------------------------- files


def expected_tensors(cfg: CareMLAConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes straight from FORMAT.md's "Tensors" section."""
    V, D, I = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    n_h, d_h, d_r, g = cfg.num_attention_heads, cfg.original_head_dim, cfg.qk_rope_head_dim, cfg.original_num_key_value_heads
    t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (V, D)
    for l, (r_k, r_v) in enumerate(zip(cfg.k_ranks, cfg.v_ranks)):
        p = f"model.layers.{l}."
        t.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                  p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                  p + "mlp.down_proj.weight": (D, I), p + "self_attn.o_proj.weight": (D, n_h * d_h),
                  p + "self_attn.kv_b_proj.weight": (n_h * 2 * d_h, r_k + r_v)})
        if cfg.use_qk_norm:
            t.update({p + "self_attn.q_proj.weight": (n_h * d_h, D), p + "self_attn.q_norm.weight": (d_h,),
                      p + "self_attn.q_rope_proj.weight": (n_h * d_r, d_h),
                      p + "self_attn.k_proj.weight": (g * d_h, D), p + "self_attn.k_norm.weight": (d_h,),
                      p + "self_attn.k_latent_proj.weight": ((r_v if cfg.joint_latent else r_k) + d_r, g * d_h),
                      p + "self_attn.v_latent_proj.weight": (r_v, D)})
        else:
            t.update({p + "self_attn.q_proj.weight": (n_h * (d_h + d_r), D),
                      p + "self_attn.kv_a_proj_with_mqa.weight": (r_k + r_v + d_r, D)})
    return t


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_with_exact_format_tensors(arch, tied, tmp_path):
    model = tiny_model(arch, tied=tied, seed=14)
    model.save_pretrained(tmp_path)
    shapes = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    assert shapes == expected_tensors(model.config)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["CareQwen3ForCausalLM" if arch.startswith("qwen3") else "CareLlamaForCausalLM"]
    assert raw["joint_latent"] == (arch == "qwen3-joint")

    x = ids(2, 10, seed=15)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded).__name__ == raw["architectures"][0]
    assert torch.equal(loaded.model.rotary_emb.inv_freq,
                       torch.tensor(model.config.rope_inv_freq, dtype=torch.float32))
    for path in PATHS:
        assert torch.equal(logits(loaded, x, path), logits(model, x, path))
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_a_folder_saved_after_import_loads_with_trust_remote_code_alone(tmp_path):
    """save_pretrained writes the code its config's auto_map names, so a model fine-tuned with `import model_defs`
    and saved (or pushed to the Hub) loads where care-vllm is not installed."""
    model = tiny_model("qwen3", seed=14)
    model.save_pretrained(tmp_path)
    x = ids(1, 10, seed=15)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch\n"
            "sys.path = [p for p in sys.path if p not in ('', sys.argv[2])]\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
            "assert not any(n.startswith('model_defs') for n in sys.modules), 'model_defs was imported'\n"
            "with torch.no_grad():\n"
            "    torch.save(m(torch.load(sys.argv[1] + '/x.pt')).logits, sys.argv[1] + '/logits.pt')\n"
            "print(type(m).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(ROOT)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "CareQwen3ForCausalLM"
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(model, x, "plain"))


def test_config_values_given_to_from_pretrained_are_checked(tmp_path):
    """from_pretrained's keyword overrides are set after the config's own checks: the model and save_pretrained
    check them again."""
    model = tiny_model("llama", seed=14)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="care_attention_path must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path, care_attention_path="fast")
    model.config.care_attention_path = "fast"
    with pytest.raises(ValueError, match="care_attention_path must be one of"):
        model.save_pretrained(tmp_path / "again")


# ---------------------------------------------------------------- training / dtypes


@pytest.mark.parametrize("arch", ARCHS)
def test_training_with_gradient_checkpointing_matches_and_reaches_every_parameter(arch):
    x = ids(2, 10, seed=16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(arch, seed=17).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(g is not None and g.abs().sum() > 0 for g in grads[-1].values())
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_runs_close_to_fp32_and_keeps_fp32_rope(arch, tmp_path):
    model = tiny_model(arch, seed=18)
    model.save_pretrained(tmp_path)
    x = ids(1, 12, seed=19)
    ref = torch.log_softmax(logits(model, x, "plain"), -1)
    bf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    bf.to(torch.bfloat16)  # even an explicit cast must not degrade the rope frequencies
    for path in PATHS:
        out = logits(bf, x, path)
        assert out.dtype == torch.bfloat16
        assert bf.model.rotary_emb.inv_freq.dtype == torch.float32
        diff = (torch.log_softmax(out.float(), -1) - ref).abs().mean().item()
        assert diff < 0.1, f"{path}: mean |logprob diff| {diff}"
    bf.train()
    bf(x, labels=x).loss.backward()
    assert bf.model.layers[0].self_attn.kv_b_proj.weight.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- packaging


def test_config_import_is_light_and_lazy_registration_resolves():
    """The vLLM plugin imports model_defs.configuration_care in every worker: that must not pull
    in the modeling code; AutoModelForCausalLM must still resolve care_mla afterwards."""
    code = (
        "import sys, model_defs.configuration_care\n"
        "assert 'model_defs.modeling_care' not in sys.modules\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        "from model_defs import CareMLAConfig\n"
        "cfg = CareMLAConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                    num_attention_heads=2, original_num_key_value_heads=1, original_head_dim=8,\n"
        "                    qk_rope_head_dim=4, k_ranks=[2], v_ranks=[2], use_qk_norm=True)\n"
        "print(type(AutoModelForCausalLM.from_config(cfg)).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "CareQwen3ForCausalLM"


def test_registration_is_idempotent():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_defs.register()
    model_defs.register()
    assert MODEL_FOR_CAUSAL_LM_MAPPING[CareMLAConfig] is CareMLAForCausalLM  # real class, not the stand-in
    assert isinstance(AutoConfig.for_model("care_mla"), CareMLAConfig)
    assert math.isclose(AutoConfig.for_model("care_mla").softmax_scale, 64 ** -0.5)
