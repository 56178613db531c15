"""The converted folder's README.md (a Hugging Face model card) and the source's licence files.

Why: a converted checkpoint is a derivative of its source and is often pushed to a model hub. Llama
licences require redistributions to carry the agreement (LICENSE, USE_POLICY.md); Apache-2.0 models
(Qwen3, SmolLM2) their LICENSE and NOTICE. So the converter copies the source's licence files as they
are, and writes a card whose metadata keeps the source's `license` and names it as `base_model`, and
whose text says what was converted, how, and how to serve it, with the numbers from care_report.json.
huggingface_hub reads and writes the card's YAML header.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .allocate import k_share_of

# Top-level files of a source folder that carry its licence terms (Llama: LICENSE + USE_POLICY.md;
# Apache-2.0 repos: LICENSE, sometimes NOTICE). Matched case-insensitively, any extension.
LICENSE_FILE = re.compile(r"^(licen[cs]e|notice|use_policy|copying)([._-].*)?$", re.IGNORECASE)
# Source card metadata that still holds for the converted model.
CARRIED_METADATA = ("license", "license_name", "license_link", "language")
TAGS = ["care-mla", "multi-head-latent-attention", "vllm"]


def license_files(src_dir: Path | None) -> list[Path]:
    """The source folder's licence files (none for a GGUF file or an in-memory model)."""
    if src_dir is None:
        return []
    return sorted(p for p in src_dir.iterdir() if p.is_file() and LICENSE_FILE.match(p.name))


def copy_license_files(src_dir: Path | None, out: Path) -> list[str]:
    """Copy them into `out` unchanged; returns their names."""
    names = []
    for p in license_files(src_dir):
        shutil.copy(p, out / p.name)
        names.append(p.name)
    return names


def source_metadata(src_dir: Path | None) -> dict:
    """The licence/language fields of the source's own model card (README.md YAML header), if any."""
    from huggingface_hub import ModelCard

    card = src_dir / "README.md" if src_dir is not None else None
    if card is None or not card.is_file():
        return {}
    try:
        data = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a README that is not a model card: nothing to carry over
        return {}
    return {k: data[k] for k in CARRIED_METADATA if data.get(k)}


def write_card(folder: Path, name: str, config: dict, report: dict, *, base_model: str | None,
               metadata: dict, license_names: list[str]) -> None:
    """Write `folder`/README.md for a fresh conversion named `name` (the output folder's final name)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
                         tags=list(TAGS), **metadata)
    body = _body(name, config, report, base_model, metadata, license_names)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def add_healing(card_path: Path, log: dict) -> None:
    """Append what `care-heal` did to a copied card (the conversion's card otherwise stays true)."""
    if not card_path.is_file():
        return
    args = log["args"]
    lines = ["", "## Healing", "",
             f"Fine-tuned after conversion with `care-heal` (CE + {args['beta']} tau^2 KL to the teacher "
             f"`{_shown_source(args['teacher'])}`, tau {args['tau']}, lr {args['lr']}, `--train {args['train']}`, "
             f"`--kv-blocks {args['kv_blocks']}`) on {log['tokens_seen']:,} tokens; log in `heal_log.json`."]
    if log.get("eval"):
        first, last = log["eval"][0], log["eval"][-1]
        teacher = f", teacher {log['teacher_ppl']:.3f}" if log.get("teacher_ppl") else ""
        lines.append(f"Held-out perplexity {first['ppl']:.3f} at {first['tokens']:,} tokens -> "
                     f"{last['ppl']:.3f} at {last['tokens']:,}{teacher}.")
    card_path.write_text(card_path.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def _body(name: str, config: dict, report: dict, base_model: str | None, metadata: dict,
          license_names: list[str]) -> str:
    care, calib = config["care"], report["calibration"]
    widths = [k + v + config["qk_rope_head_dim"] for k, v in zip(config["k_ranks"], config["v_ranks"])]
    n_layers, orig = config["num_hidden_layers"], report["original_cache_values_per_token"]
    cache = report["cache_values_per_token"]
    source = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model
              else f"`{_shown_source(report['source'])}`")
    arch = report.get("source_architecture") or config["architectures"][0]
    refit = (f"o_proj least-squares refit (ridge {care['o_proj_refit_ridge']})" if care.get("o_proj_refit")
             else "no o_proj refit")
    if care.get("latent") == "joint":
        weight = report["options"].get("joint_key_weight")   # (--objective attention only)
        split = "one latent shared by keys and values (`--latent joint`"
        if weight is not None:
            split += f", key weight {weight:g}"
        if "joint_key_weight_auto" in report:
            split += ", chosen by `--joint-key-weight auto`"
        split += ")"
    else:
        split = (f"{k_share_of(config['k_ranks'], config['v_ranks']):.2f} of the latent to K"
                 + (", chosen by `--k-share auto`" if "k_share_auto" in report else ""))
    width_text = (f"{widths[0]} values" if len(set(widths)) == 1
                  else f"{min(widths)} to {max(widths)} values (ranks differ per layer)")
    files = ", ".join(Path(f).name for f in calib["files"]) or "built-in text"
    licence = "the source's license applies" + (f" (`{metadata['license']}`)" if metadata.get("license") else "")
    licence += (f"; its license files are copied here: {', '.join(f'`{n}`' for n in license_names)}."
                if license_names else ".")
    written_by = report.get("versions", {}).get("care-vllm") or "(version unknown: not installed)"
    return f"""# {name}

{source} ({arch}) converted from grouped-query attention to multi-head latent attention (MLA) with the
CARE recipe by care-vllm's `care-convert`: each layer caches its keys and values as low-rank latents
fitted to the model's activations, plus a small shared RoPE key.

| KV cache per token | original (GQA) | this model (MLA) |
|---|---|---|
| all {n_layers} layers | {orig:,} values | {cache:,} values ({cache / orig:.2f}x) |
| per layer | {orig // n_layers:,} values | {width_text} |

Conversion: method `{care['method']}`, objective `{care['objective']}`, ranks `{care['rank_policy']}` ({split}),
{care['rope_dim']} RoPE dims, {refit}; calibrated on {calib['samples']} windows of {calib['seqlen']}
tokens ({files}), with care-vllm {written_by}. Per-layer ranks and activation errors: `care_report.json`,
`care_ranks.png`.
A one-shot conversion loses some quality against the original until it is healed (`care-heal`).

## Use

vLLM, with the care-vllm plugin installed (it registers the architecture and its latent KV cache):

```bash
vllm serve path/to/{name}
```

transformers (the modeling code is in this folder):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}", trust_remote_code=True)
```

How far it is from the original on your own text (perplexities, KL per token, top-1 agreement):
`care-eval compare ORIGINAL path/to/{name} --text your_text.txt`.

## License

Derived from {source}: {licence}
"""


def _shown_source(spec: str) -> str:
    """How a model argument appears in a card: a Hub repo id as it is; a local path only by its last part
    (it says nothing to readers elsewhere, and may be private)."""
    from .hub import looks_like_repo_id

    return spec if looks_like_repo_id(spec) and not Path(spec).exists() else Path(spec).name
