"""care-convert-lora: a PEFT LoRA adapter of the original model, rewritten for the converted checkpoint.

The reference is PEFT itself: the adapter is made and applied by `peft` on the original (transformers), and
the converted adapter is applied by `peft` on model_defs. At full rank the two adapted models must give the
same logits (the maps are exact), for Llama (q and k/v deltas into q_proj's rope rows and
kv_a_proj_with_mqa's latent rows), Qwen3 (k_proj kept, v_proj into v_latent_proj) and Phi-3 (fused
qkv_proj / gate_up_proj deltas split), with PEFT's rank_pattern, alpha_pattern and rsLoRA scalings. A Qwen3 joint
latent (partial rope, so not exact to the original) must carry the adapter as separate latents do. At
KV 0.75 with the o_proj refit, the adapted converted model must be closer to the adapted original than the
unadapted one is, and about as close as the conversion is to the original. Bad input is refused by name with
nothing written.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_run import assert_refused_by, run_main, run_main_alone
from tests.tiny_models import make_tiny_original

IDS = [[5, 17, 99, 1024, 3000, 42, 7, 640, 8191, 12, 77, 501, 64, 2048, 16000, 33]]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "llama": dict(arch="llama", targets=LINEAR, lora=dict(rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0})),
    "qwen3": dict(arch="qwen3", targets=LINEAR, lora=dict(use_rslora=True)),
    "phi3": dict(arch="phi3", targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], lora={}),
}


def make_adapter(src, out, targets, seed=0, **lora_kw):
    """A random LoRA adapter of the original, made and saved by PEFT (deltas ~1/3 of the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                          **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[-1] ** 0.5)
    pm.save_pretrained(out)
    return out


def logits(model_path, adapter=None, dtype=torch.float64):
    """Logits of IDS from `model_path` (a transformers original or a care_mla checkpoint through model_defs),
    with `adapter` applied by PEFT."""
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0]


def convert_lora(*args):
    from converter.lora_cli import main

    return run_main(main, "care-convert-lora", *args)


def adapted_conversion(root, arch: str, calib_file) -> tuple:
    """The serving tests' LoRA case: tests/served_reference.mixed_rank_conversion under root, a random adapter of
    its original on every linear (seed 1), rewritten by care-convert-lora to root/adapter_mla. Returns (converted
    folder, its config.json, the `vllm serve` flags that serve the adapter as "care-ad")."""
    from tests.served_reference import mixed_rank_conversion

    src, out, cfg = mixed_rank_conversion(root, arch, calib_file)
    adapter = make_adapter(src, root / "adapter", LINEAR, seed=1)
    proc = convert_lora(adapter, out, root / "adapter_mla")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank = json.loads(proc.stdout)["vllm_max_lora_rank"]
    # (vLLM's default --max-loras 1: the adapter sits in the last slot, which vLLM's CPU ops gave the base requests
    # batched with it, care_vllm/cpu_lora_no_adapter.py)
    flags = ["--enable-lora", "--max-lora-rank", str(rank),
             "--lora-modules", f"care-ad={root / 'adapter_mla'}"]
    return out, cfg, flags


@pytest.fixture(scope="module", params=list(VARIANTS))
def exact_case(request, tmp_path_factory, calib_file):
    from converter.pipeline import convert

    v = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    src = make_tiny_original(root / "orig", v["arch"], num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], kv_ratio=1.0, rope_dim=2 * 16, calib_samples=8, calib_seqlen=64,
            ranks="uniform")
    adapter = make_adapter(src, root / "adapter", v["targets"], **v["lora"])
    proc = convert_lora(adapter, out, root / "adapter_mla", "--source", src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, src, out, adapter, root / "adapter_mla", json.loads(proc.stdout)


def test_full_rank_converted_adapter_matches_peft_on_the_original(exact_case):
    arch, src, out, adapter, converted, summary = exact_case
    want = logits(src, adapter)
    assert (want - logits(src)).abs().max().item() > 0.5, "the adapter must change the logits"
    got = logits(out, converted)
    assert (got - want).abs().max().item() < 1e-4
    assert summary["approximate"] == []
    expected = {"llama": ["self_attn.kv_a_proj_with_mqa", "self_attn.q_proj"],
                "phi3": ["self_attn.kv_a_proj_with_mqa", "self_attn.q_proj"],
                "qwen3": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_latent_proj"]}[arch]
    assert set(expected) <= set(summary["modules"])
    assert not any("kv_b_proj" in m for m in summary["modules"])


def test_converted_adapter_is_a_plain_peft_lora(exact_case):
    _, _, out, _, converted, summary = exact_case
    cfg = json.loads((converted / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == summary["rank"]
    tensors = load_file(converted / "adapter_model.safetensors")
    assert all(t.shape[0] == summary["rank"] for n, t in tensors.items() if ".lora_A." in n)
    report = json.loads((converted / "care_lora_report.json").read_text())
    assert report["versions"]["torch"] == torch.__version__ and report["rank"] == summary["rank"]


def test_a_qwen3_joint_latent_carries_an_adapter_as_separate_latents_do(tmp_path, calib_file):
    """Qwen3 with a joint latent (k_latent_proj's latent rows on the post-norm keys plus v_latent_proj's on x): k_proj
    is kept and v_latent_proj's rows are still an image of v_proj's, so the adapter maps as it does for separate
    latents. Reference: the separate conversion of the same original with its own converted adapter. Rope on 8 of
    the 32 key dims, so that the latent carries keys too; at parity (KV 1.0, no refit) both conversions compute the
    same function (tests/test_joint_latent.py), so adapted they must too."""
    from converter.pipeline import convert

    src = make_tiny_original(tmp_path / "orig", "qwen3", num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16)
    adapter = make_adapter(src, tmp_path / "adapter", LINEAR, seed=2)
    adapted = {}
    for latent in ("separate", "joint"):
        out = tmp_path / latent
        convert(src, out, calib_files=[calib_file], kv_ratio=1.0, rope_dim=8, calib_samples=8, calib_seqlen=64,
                ranks="uniform", o_proj_refit=False, latent=latent)
        proc = convert_lora(adapter, out, tmp_path / f"{latent}_adapter")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
        assert summary["approximate"] == [] and summary["worst_exact_residual"] < 1e-5
        assert {"self_attn.k_proj", "self_attn.v_latent_proj"} <= set(summary["modules"])
        adapted[latent] = logits(out, tmp_path / f"{latent}_adapter")
    assert (adapted["separate"] - logits(tmp_path / "separate")).abs().max().item() > 0.5   # the adapter matters
    assert (adapted["joint"] - adapted["separate"]).abs().max().item() < 1e-4


def _lossy_conversion(tmp_path_factory, calib_file, latent: str):
    """A Llama at KV 0.75 (refitted o_proj) and a random adapter of it on every linear."""
    from converter.pipeline import convert

    root = tmp_path_factory.mktemp(f"lora_lossy_{latent}")
    # (qk_gain 1: with the exactness tests' sharper attention, a tiny random model converted at a reduced cache
    # is 3-4 nats of KL from its original, too far for an adapter's effect to show)
    src = make_tiny_original(root / "orig", "llama", num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                             qk_gain=1.0)
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], kv_ratio=0.75, rope_dim=8, calib_samples=16, calib_seqlen=64,
            latent=latent)
    adapter = make_adapter(src, root / "adapter", LINEAR, seed=3)
    return root, src, out, adapter


@pytest.fixture(scope="module")
def lossy_case(tmp_path_factory, calib_file):
    return _lossy_conversion(tmp_path_factory, calib_file, "separate")


@pytest.fixture(scope="module")
def joint_lossy_case(tmp_path_factory, calib_file):
    """One latent shared by keys and values (--latent joint): every latent row mixes the key and value maps, so
    the key and value adapters both write it."""
    return _lossy_conversion(tmp_path_factory, calib_file, "joint")


def kl(p_logits, q_logits) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("case", ["lossy_case", "joint_lossy_case"])
def test_at_a_reduced_cache_the_converted_adapter_carries_the_adaptation(case, request):
    root, src, out, adapter = request.getfixturevalue(case)
    proc = convert_lora(adapter, out, root / "adapter_mla")   # --source from care_report.json
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert [a["layer"] for a in summary["approximate"]] == [0, 1, 2]   # every o_proj was refitted
    assert summary["worst_exact_residual"] < 1e-5
    want, base = logits(src, adapter), logits(src)
    conversion = kl(base, logits(out))                  # what the conversion itself costs
    with_adapter = kl(want, logits(out, root / "adapter_mla"))
    without = kl(want, logits(out))
    moved = kl(want, base)                              # what the adapter does to the original
    # (measured, separate: 0.74, 0.85, 1.46 nats; joint: 0.41, 0.56, 1.24; the adapter moves the original by 0.80:
    # the adapted conversion is as far from the adapted original as the conversion is from the original, plus a
    # little of the adapter's own effect that leaves the latents' subspace)
    assert with_adapter < 0.7 * without and with_adapter < conversion + 0.25 * moved, (
        conversion, with_adapter, without, moved)


def _copy(adapter, dest):
    shutil.copytree(adapter, dest)
    return dest


def _config_copy(adapter, dest, **fields):
    """A copy of `adapter` whose adapter_config.json also sets `fields`."""
    _copy(adapter, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return dest


def _dora_copy(adapter, dest):
    """A copy of `adapter` whose config asks for DoRA (refused: its magnitude vector does not map)."""
    return _config_copy(adapter, dest, use_dora=True)


def test_refusals_write_nothing(lossy_case, tmp_path):
    root, src, out, adapter = lossy_case
    target = tmp_path / "out"

    def refused(adapter_dir, *needles, checkpoint=out, extra=()):
        assert_refused_by("care-convert-lora", convert_lora(adapter_dir, checkpoint, target, *extra), target,
                          *needles)

    refused(tmp_path / "nowhere", "no adapter_config.json")
    dora = _dora_copy(adapter, tmp_path / "dora")
    refused(dora, "use_dora")
    # what PEFT applies beside B A (or on changed base weights): rewritten as a plain LoRA, they served as another
    # model (exit 0 before; logits off by 11-16 from PEFT's adapted original)
    for i, (fields, needle) in enumerate([({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
                                          ({"init_lora_weights": "olora"}, "init_lora_weights 'olora'"),
                                          ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
                                          ({"layer_replication": [[0, 1], [0, 2]]}, "layer_replication")]):
        refused(_config_copy(adapter, tmp_path / f"variant{i}", **fields), needle, "is not supported")
    embed = _copy(adapter, tmp_path / "embed")
    tensors = load_file(embed / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 16384)
    save_file(tensors, str(embed / "adapter_model.safetensors"))
    refused(embed, "embed_tokens")
    # an adapter of another model: its deltas do not fit the source's weights
    other = make_tiny_original(tmp_path / "other", "llama", num_layers=3, hidden=32, heads=4, kv_heads=2, head_dim=8)
    refused(make_adapter(other, tmp_path / "other_adapter", ["q_proj"]), "layer 0 q_proj", "[32 x 32]", "[64, 64]")
    # a checkpoint whose converted weights are not the source's images (as after care-heal)
    healed = tmp_path / "healed"
    shutil.copytree(out, healed)
    weights = load_file(healed / "model.safetensors")
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    weights[name] = weights[name] + 0.1 * torch.randn_like(weights[name])
    save_file(weights, str(healed / "model.safetensors"), metadata={"format": "pt"})
    refused(adapter, "layer 1 k_proj -> kv_a_proj_with_mqa", "not a linear image", checkpoint=healed)
    refused(adapter, "not a care_mla checkpoint", checkpoint=src)
    # a quantized copy of the conversion (as llm-compressor saves it, care_report.json copied along)
    quantized = tmp_path / "w8a8"
    shutil.copytree(out, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (quantized / "config.json").write_text(json.dumps(config))
    refused(adapter, "a quantized checkpoint (compressed-tensors)", "pass the unquantized care-convert output",
            checkpoint=quantized)
    target.mkdir()
    proc = convert_lora(adapter, out, target)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    inside = _copy(adapter, target / "adapter")      # --overwrite would delete it with OUT
    proc = convert_lora(inside, out, target, "--overwrite")
    assert proc.returncode == 2 and f"would delete the adapter {inside}: it is inside OUT" in proc.stderr
    assert (inside / "adapter_config.json").is_file()


def test_a_mistyped_path_is_refused_before_torch_is_imported(lossy_case, tmp_path):
    """What needs no model (converter/lora_checks.py: OUT, the checkpoint's config, the adapter's) is refused in a
    process that never imported torch: a typo is answered without the ~5 s of importing torch and transformers."""
    root, src, out, adapter = lossy_case
    target = tmp_path / "out"
    dora = _dora_copy(adapter, tmp_path / "dora")
    for args, needles in (((tmp_path / "nowhere", out), ["nowhere", "no adapter_config.json"]),
                          ((adapter, tmp_path / "no-checkpoint"), ["no-checkpoint", "no config.json"]),
                          ((adapter, src), ["not a care_mla checkpoint"]),
                          ((dora, out), ["use_dora"])):
        proc, torch_imported = run_main_alone("converter.lora_cli", *args, target)
        assert_refused_by("care-convert-lora", proc, target, *needles)
        assert not torch_imported, args
    # a --source that is not the model OUT was converted from (one layer fewer: converter/source_match.py)
    other = make_tiny_original(tmp_path / "other", "llama", num_layers=2)
    proc, torch_imported = run_main_alone("converter.lora_cli", adapter, out, target, "--source", other)
    assert_refused_by("care-convert-lora", proc, target, f"--source {other} is not the model {out} was converted "
                      "from: num_hidden_layers 2 where the source's was 3")
    assert not torch_imported
