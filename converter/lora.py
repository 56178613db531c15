"""`care-convert-lora`: a PEFT LoRA adapter of the source model, rewritten for its converted checkpoint.

Users fine-tune the original (GQA) model; after `care-convert` they want the same adapters served on the
converted one with `vllm serve --enable-lora`. The adapter's q/k/v deltas cannot be loaded as they are:
the converted checkpoint has no k_proj/v_proj on the Llama path (they became kv_a_proj_with_mqa's latent and
rope rows) and its q_proj has extra rope rows. converter/lora_map.py says how each delta maps (exactly, except
o_proj after the o_proj refit, which gets the refit's own correction); this module reads and checks the
adapter, reads the two checkpoints' weights, and writes a PEFT adapter (adapter_config.json +
adapter_model.safetensors) whose target modules are the converted model's, which vLLM (and PEFT on
model_defs) load as they load any other.

Refused by name: anything but plain LoRA on the attention and dense-MLP linears (DoRA, biases,
modules_to_save, embedding/lm_head or MoE-expert adapters, fan_in_fan_out, base-changing inits such as PiSSA,
aLoRA, layer_replication, QALoRA, BD-LoRA: converter/lora_checks.py).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConversionError
from .lora_checks import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_request, read_adapter_config
from .lora_map import (Delta, Fit, map_columns, map_per_head, map_rows, padded, per_head_fits, solve,
                       solve_input_side, solve_scale, stack_rows)
from .versions import recorded_versions

REPORT = "care_lora_report.json"
# vLLM's --max-lora-rank choices (vllm/config/lora.py MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_NAME = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# fused source projections (Phi-3/Phi-4) -> the projections the converter's Llama view splits them into
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# sources whose loaded (Llama) view is not their adapters' base weights
UNMAPPED_SOURCES = {"GraniteForCausalLM": "its multipliers are folded into the weights the maps are solved from"}
# how close T = M S must hold for a map to count as exact, by the checkpoint's stored dtype
EXACT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}   # safetensors' names


@dataclass
class SourceAdapter:
    path: Path
    deltas: dict[tuple[int, str], Delta]   # (layer, source module) -> scaled delta
    dtype: torch.dtype                     # of its stored weights: the rewritten adapter's


@dataclass
class ConvertedAdapter:
    deltas: dict[tuple[int, str], Delta] = field(default_factory=dict)   # (layer, converted module) -> delta
    approximate: list[dict] = field(default_factory=list)
    worst_exact_residual: float = 0.0


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name it ends (as a dotted suffix)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | Path) -> SourceAdapter:
    """Read and check a PEFT LoRA adapter folder; fold each module's scaling into its B."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_adapter_config(path)
    weights = path / ADAPTER_WEIGHTS
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for name in fh.keys():
                m = _NAME.match(name)
                if m is None:
                    raise ConversionError(f"{weights}: tensor {name!r} is not a LoRA A/B weight of an attention or "
                                          f"MLP projection (embedding, lm_head and MoE-expert adapters are not "
                                          f"supported)")
                layer, _, module, ab = m.groups()
                if module not in ATTENTION + MLP + tuple(FUSED):
                    raise ConversionError(f"{weights}: tensor {name!r}: module {module!r} is not supported "
                                          f"(only {', '.join(ATTENTION + MLP + tuple(FUSED))})")
                raw.setdefault((int(layer), module), {})[ab] = fh.get_tensor(name)
    except SafetensorError as e:
        raise ConversionError(f"{weights}: cannot read safetensors file ({e})") from None
    if not raw:
        raise ConversionError(f"{weights}: no LoRA weights")
    deltas, dtype = {}, None
    for (layer, module), pair in sorted(raw.items()):
        if set(pair) != {"A", "B"}:
            raise ConversionError(f"{weights}: layer {layer} {module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConversionError(f"{weights}: layer {layer} {module}: lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)} do not make a LoRA pair")
        full = f"model.layers.{layer}.{'mlp' if module in MLP or module == 'gate_up_proj' else 'self_attn'}.{module}"
        r = int(_pattern_value(cfg.get("rank_pattern"), full, cfg.get("r", a.shape[0])))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), full, cfg.get("lora_alpha", r)))
        if r != a.shape[0]:
            raise ConversionError(f"{weights}: layer {layer} {module} has rank {a.shape[0]}, the config says {r}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[(layer, module)] = Delta(a.double(), scale * b.double())
        dtype = dtype or a.dtype
    return SourceAdapter(path, deltas, dtype)


def split_fused(adapter: SourceAdapter, sizes: dict[str, int]) -> None:
    """A Phi-3 adapter's qkv_proj / gate_up_proj deltas as the q/k/v and gate/up deltas of the Llama view
    (row blocks of B, A shared)."""
    for (layer, module) in [k for k in adapter.deltas if k[1] in FUSED]:
        d = adapter.deltas.pop((layer, module))
        parts = FUSED[module]
        want = sum(sizes[p] for p in parts)
        if d.b.shape[0] != want:
            raise ConversionError(f"{adapter.path}: layer {layer} {module}'s lora_B has {d.b.shape[0]} rows, the "
                                  f"source's {module} has {want}")
        for p, b in zip(parts, d.b.split([sizes[p] for p in parts])):
            if (layer, p) in adapter.deltas:
                raise ConversionError(f"{adapter.path}: layer {layer} has adapters on both {module} and {p}")
            adapter.deltas[(layer, p)] = Delta(d.a, b)


class CheckpointTensors:
    """The converted checkpoint's tensors by name, read on demand from its (possibly sharded) safetensors."""

    def __init__(self, folder: Path):
        from .load import _safetensors_entries

        self.entries, _ = _safetensors_entries(folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.entries:
            raise ConversionError(f"converted checkpoint: tensor {name!r} is missing")
        with safe_open(str(self.entries[name][0]), framework="pt") as fh:
            return fh.get_tensor(name)


def convert_deltas(adapter: SourceAdapter, source_layers, cfg: dict, ckpt: CheckpointTensors) -> ConvertedAdapter:
    """Map every (layer, module) delta of `adapter` (source_layers: the source's decoder layers, Llama view)."""
    out = ConvertedAdapter()
    qwen3 = bool(cfg.get("use_qk_norm"))
    joint = cfg.get("care", {}).get("latent") == "joint"
    n_h = cfg["num_attention_heads"]
    d_r = cfg["qk_rope_head_dim"]
    tol = max(EXACT_TOL.get(STORED_DTYPES.get(entry[2]), EXACT_TOL[torch.bfloat16]) for entry in ckpt.entries.values())

    def exact(fit: Fit, what: str) -> Fit:
        if fit.residual > tol:
            raise ConversionError(f"{what}: the converted weight is not a linear image of the source's (relative "
                                  f"residual {fit.residual:.3g} > {tol:g}): was the checkpoint healed with care-heal, "
                                  f"or converted from another source?")
        out.worst_exact_residual = max(out.worst_exact_residual, fit.residual)
        return fit

    layers = sorted({layer for layer, _ in adapter.deltas})
    for layer in layers:
        if layer >= len(source_layers):
            raise ConversionError(f"{adapter.path}: adapter for layer {layer}, the source has {len(source_layers)}")
        src = source_layers[layer]
        p = f"model.layers.{layer}."

        def weight(module: str) -> torch.Tensor:
            parent = src.mlp if module in MLP else src.self_attn
            return getattr(parent, module).weight.detach()

        got = {m: adapter.deltas[(layer, m)] for m in ATTENTION + MLP if (layer, m) in adapter.deltas}
        for m, d in got.items():
            w = weight(m)
            if tuple(d.b.shape[:1]) + tuple(d.a.shape[1:]) != tuple(w.shape):
                raise ConversionError(f"{adapter.path}: layer {layer} {m}: the adapter's delta is "
                                      f"[{d.b.shape[0]} x {d.a.shape[1]}], the source's weight {list(w.shape)}")
        where = f"layer {layer}"
        if "q_proj" in got:
            fits = [exact(f, f"{where} q_proj") for f in
                    per_head_fits(ckpt[p + "self_attn.q_proj.weight"], weight("q_proj"), n_h, f"{where} q_proj")]
            out.deltas[(layer, "self_attn.q_proj")] = map_per_head(fits, got["q_proj"])
        if qwen3:
            if "k_proj" in got:
                fit = exact(solve(ckpt[p + "self_attn.k_proj.weight"], weight("k_proj"), f"{where} k_proj"),
                            f"{where} k_proj")
                out.deltas[(layer, "self_attn.k_proj")] = map_rows(fit, got["k_proj"])
            if "v_proj" in got:
                fit = exact(solve(ckpt[p + "self_attn.v_latent_proj.weight"], weight("v_proj"), f"{where} v_proj"),
                            f"{where} v_proj -> v_latent_proj")
                out.deltas[(layer, "self_attn.v_latent_proj")] = map_rows(fit, got["v_proj"])
        elif ("k_proj" in got or "v_proj" in got) and joint:
            # one latent of keys and values (care-convert --latent joint): every row of kv_a_proj_with_mqa is a
            # linear image of [W_K; W_V] (the rope rows of W_K alone), so each adapter maps through its columns
            kv_a = ckpt[p + "self_attn.kv_a_proj_with_mqa.weight"]
            what = f"{where} k_proj, v_proj -> kv_a_proj_with_mqa (joint latent)"
            wk = weight("k_proj")
            fit = exact(solve(kv_a, torch.cat([wk, weight("v_proj")]), what), what)
            rows = torch.arange(kv_a.shape[0])
            parts = [(rows, map_rows(Fit(cols, fit.residual), got[m]))
                     for m, cols in (("k_proj", fit.map[:, :wk.shape[0]]), ("v_proj", fit.map[:, wk.shape[0]:]))
                     if m in got]
            out.deltas[(layer, "self_attn.kv_a_proj_with_mqa")] = stack_rows(parts, kv_a.shape[0])
        elif "k_proj" in got or "v_proj" in got:
            r_k, r_v = int(cfg["k_ranks"][layer]), int(cfg["v_ranks"][layer])
            kv_a = ckpt[p + "self_attn.kv_a_proj_with_mqa.weight"]
            k_rows = torch.cat([torch.arange(r_k), torch.arange(r_k + r_v, r_k + r_v + d_r)])
            v_rows = torch.arange(r_k, r_k + r_v)
            parts = []
            for m, rows in (("k_proj", k_rows), ("v_proj", v_rows)):
                if m in got:
                    what = f"{where} {m} -> kv_a_proj_with_mqa"
                    fit = exact(solve(kv_a[rows], weight(m), what), what)
                    parts.append((rows, map_rows(fit, got[m])))
            out.deltas[(layer, "self_attn.kv_a_proj_with_mqa")] = stack_rows(parts, kv_a.shape[0])
        if "o_proj" in got:
            fit, determined = solve_input_side(ckpt[p + "self_attn.o_proj.weight"], weight("o_proj"))
            change = (fit.map - torch.eye(fit.map.shape[0], dtype=fit.map.dtype)).norm().item()
            if change > tol * fit.map.shape[0] ** 0.5:    # refitted: W_O' = W_O R with R != I
                out.approximate.append({"layer": layer, "module": "self_attn.o_proj", "refit_determined": determined})
            exact(fit, f"{where} o_proj")
            out.deltas[(layer, "self_attn.o_proj")] = map_columns(fit, got["o_proj"])
        for m in MLP:
            if m in got:
                fit = exact(solve_scale(ckpt[p + f"mlp.{m}.weight"], weight(m)), f"{where} {m}")
                out.deltas[(layer, f"mlp.{m}")] = map_rows(fit, got[m])
    return out


def write_adapter(converted: ConvertedAdapter, out: Path, dtype: torch.dtype, base: str) -> int:
    """PEFT adapter files in `out`; returns the rank r every module is padded to (lora_alpha = r: scale 1)."""
    from safetensors.torch import save_file

    rank = max(d.a.shape[0] for d in converted.deltas.values())
    tensors = {}
    for (layer, name), d in sorted(converted.deltas.items()):
        d = padded(d, rank, dtype)
        key = f"base_model.model.model.layers.{layer}.{name}"
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = d.a, d.b
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    targets = sorted({name.rsplit(".", 1)[-1] for _, name in converted.deltas})
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
        "lora_alpha": rank, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}, indent=2) + "\n")
    return rank


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)


def convert_adapter(adapter: str | Path, checkpoint: str | Path, out: str | Path, source: str | None = None,
                    revision: str | None = None, overwrite: bool = False) -> dict:
    """Rewrite `adapter` (a PEFT LoRA of `source`) for the converted `checkpoint`; write it to `out` atomically.
    `source`: what care-convert was given (default: what the checkpoint's care_report.json records)."""
    from .load import load_source
    from .write import atomic_dir

    t0 = time.time()
    checkpoint, out = Path(checkpoint), Path(out)
    cfg, source, revision = check_request(Path(adapter), checkpoint, out, source, revision, overwrite)
    adapter_data = read_adapter(adapter)
    ckpt = CheckpointTensors(checkpoint)
    src = load_source(source, revision)
    layers = src.model.model.layers
    arch_name = (src.config.architectures or [None])[0]
    if arch_name in UNMAPPED_SOURCES:
        raise ConversionError(f"{source}: {arch_name} sources are not supported by care-convert-lora "
                              f"({UNMAPPED_SOURCES[arch_name]})")
    if src.num_experts:
        raise ConversionError(f"{source}: a MoE source; LoRA adapters are carried over for dense models only")
    attn, mlp = layers[0].self_attn, layers[0].mlp
    split_fused(adapter_data, {m: getattr(attn if m in ATTENTION else mlp, m).weight.shape[0]
                               for parts in FUSED.values() for m in parts})
    if len(layers) != cfg["num_hidden_layers"]:
        raise ConversionError(f"{source} has {len(layers)} layers, {checkpoint} {cfg['num_hidden_layers']}: "
                              f"not the checkpoint's source")
    with torch.no_grad():
        converted = convert_deltas(adapter_data, layers, cfg, ckpt)
    with atomic_dir(out, overwrite) as tmp:
        rank = write_adapter(converted, tmp, adapter_data.dtype, str(checkpoint))
        summary = {
            "adapter": str(adapter), "checkpoint": str(checkpoint), "source": str(source), "rank": rank,
            "vllm_max_lora_rank": vllm_max_lora_rank(rank),
            "modules": sorted({name for _, name in converted.deltas}),
            "layers": len({layer for layer, _ in converted.deltas}),
            "worst_exact_residual": float(f"{converted.worst_exact_residual:.3g}"),
            "approximate": converted.approximate,
            "seconds": round(time.time() - t0, 1),
            "versions": recorded_versions(),
        }
        (tmp / REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
