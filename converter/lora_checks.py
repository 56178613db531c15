"""What care-convert-lora can check without a model or torch: the adapter's config, the converted checkpoint's
config and report, and OUT. converter/lora_cli.py runs these before the ~5 s import of torch and transformers, so
that a mistyped path is answered at once; converter.lora.convert_adapter runs them for callers of the API."""
from __future__ import annotations

from pathlib import Path

from .cli_checks import prepare_out, read_converted_config, read_json
from .errors import ConversionError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(path: Path) -> dict:
    """A PEFT adapter folder's config, refused by name where it is not plain LoRA (its weights are read later,
    converter.lora.read_adapter)."""
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not weights.is_file():
        other = " (adapter_model.bin is not read: save it with safe_serialization)" if (
            path / "adapter_model.bin").is_file() else ""
        raise ConversionError(f"{path}: no {ADAPTER_WEIGHTS}{other}")
    cfg = read_json(cfg_file)
    refusals = [
        (cfg.get("peft_type", "LORA") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
        (cfg.get("use_dora"), "use_dora (DoRA's magnitude vector does not map through the conversion)"),
        (cfg.get("bias", "none") != "none", f"bias {cfg.get('bias')!r} (only 'none')"),
        (cfg.get("modules_to_save"), f"modules_to_save {cfg.get('modules_to_save')}"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out (Conv1D-style weights)"),
        # (what PEFT applies beside B A, or to other weights than the base's; rewritten, the result was a plain
        # LoRA that served without these, so a different model: vLLM refuses each of them in the source adapter)
        (not _plain_init(cfg.get("init_lora_weights", True)),
         f"init_lora_weights {cfg.get('init_lora_weights')!r} (it changes the base weights PEFT loads the adapter "
         f"on; save it as a plain LoRA with PEFT's path_initial_model_for_weight_conversion)"),
        (cfg.get("alora_invocation_tokens"), "alora_invocation_tokens (Activated LoRA)"),
        (cfg.get("layer_replication"), "layer_replication"),
        (cfg.get("use_qalora"), "use_qalora"),
        (cfg.get("use_bdlora"), "use_bdlora (block-diagonal LoRA)"),
    ]
    for bad, what in refusals:
        if bad:
            raise ConversionError(f"{cfg_file}: {what} is not supported")
    return cfg


def _plain_init(init) -> bool:
    """Whether `init_lora_weights` leaves the saved adapter a plain LoRA over the unchanged base: a boolean, or an
    init that only draws the first A and B (the inits vLLM 0.32's PEFTHelper accepts). PiSSA, OLoRA, CorDA and LoftQ
    move part of the base weights into the adapter, so PEFT changes the base as it loads one."""
    return not isinstance(init, str) or init.lower() in ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def check_request(adapter: Path, checkpoint: Path, out: Path, source: str | None, revision: str | None,
                  overwrite: bool) -> tuple[dict, str, str | None]:
    """OUT, the adapter's config and the converted checkpoint: (the checkpoint's config, the source model,
    its revision), the source being what the checkpoint's care_report.json records unless `source` is given."""
    prepare_out(out, overwrite, [("adapter", adapter), ("checkpoint", checkpoint), ("source", source)])
    cfg = read_converted_config(checkpoint)
    if cfg.get("num_experts"):
        raise ConversionError(f"{checkpoint}: a MoE checkpoint; LoRA adapters are carried over for dense models only")
    quantized = cfg.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise ConversionError(f"{checkpoint}: a quantized checkpoint ({method}): its weights are not the converted "
                              f"ones the adapter is solved against; pass the unquantized care-convert output it was "
                              f"made from (the adapter written for it serves on the quantized copy too)")
    report_file = checkpoint / "care_report.json"
    report = read_json(report_file) if report_file.is_file() else {}
    if source is None:
        source = report.get("source")
        if source is None:
            raise ConversionError(f"{checkpoint}: no care_report.json naming its source; pass --source")
        revision = revision or report.get("source_revision")
    else:   # a source named by hand must be the one the checkpoint was converted from (its shape, from its files)
        from .source_match import stored_mismatch

        problem = stored_mismatch(cfg, source, revision, role="--source", converted_name=str(checkpoint))
        if problem:
            raise ConversionError(problem)
    read_adapter_config(adapter)
    return cfg, source, revision
