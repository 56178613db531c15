"""`care-eval`: perplexity of an original, converted (care_mla) or GGUF model on local text.

    care-eval ppl MODEL --text FILE [FILE...] [--seqlen 1024] [--max-tokens N]
                        [--device cpu|cuda] [--dtype float32|bfloat16] [--batch-size B] [--revision REV]

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

from .errors import ConversionError

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
               device: str | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Perplexity of `model` on `texts` under the protocol of this module.

    Returns {"ppl", "nll" (mean), "tokens", "input_tokens", "seqlen", "windows"}. "tokens" counts
    the scored (predicted) tokens, i.e. the NLL terms, so that results over several texts pool
    exactly when weighted by it; "input_tokens" counts the tokens fed (windows x their length).
    `device` defaults to the model's device; the model itself is not moved.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .calib_data import render

    try:
        texts = render(tokenizer, texts)   # conversations -> the model's chat template
    except ConversionError as e:
        raise EvalError(str(e)) from None
    text = "\n\n".join(texts)
    if not text.strip():
        raise EvalError("empty text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = make_windows(ids, seqlen, max_tokens)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    nll_sum, count = 0.0, 0
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), max(1, batch_size))]
    with torch.no_grad():
        for batch in tqdm(batches, desc="ppl", unit="batch", file=sys.stderr, disable=len(batches) < 2):
            x = torch.tensor(batch, dtype=torch.long, device=device)  # all windows of a batch share a length
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="sum")
            nll_sum += nll.item()
            count += x[:, 1:].numel()
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "input_tokens": sum(map(len, windows)),
            "seqlen": seqlen, "windows": len(windows)}


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None):
    """(model, tokenizer) from a transformers folder (original or care_mla), the Hub repo id of one
    (local Hugging Face cache first: converter/hub.py), or a `.gguf` file. A missing path that is not
    of the form `namespace/name` is reported as missing, without any network call."""
    import torch

    from . import hub

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("--device cuda requested but CUDA is not available")
    path = Path(spec)
    kwargs: dict[str, Any] = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EvalError(f"GGUF file not found: {path}")
        folder, kwargs["gguf_file"] = str(path.parent.resolve()), path.name
    else:
        if (not path.exists() and hub.looks_like_repo_id(spec)) or revision is not None:
            try:
                path = hub.resolve(spec, revision).path
            except hub.HubError as e:
                raise EvalError(str(e)) from None
        if not (path / "config.json").is_file():
            raise EvalError(f"not a model folder (no config.json) or .gguf file: {spec}")
        folder = str(path)

    import model_defs  # noqa: F401  (registers care_mla so converted folders resolve)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # config first: an unknown model type should be reported as such, not as a tokenizer failure
    config = _load_step("read the config of", spec, AutoConfig.from_pretrained, folder, **kwargs)
    model = _load_step("load the model", spec, AutoModelForCausalLM.from_pretrained, folder,
                       config=config, dtype=torch_dtype, **kwargs)
    tokenizer = _load_step("load the tokenizer of", spec, AutoTokenizer.from_pretrained, folder, **kwargs)
    return model.to(device).eval(), tokenizer


def _load_step(what: str, spec: str, fn, *args, **kwargs):
    """Run one transformers loading call, turning its exceptions into one-line EvalErrors."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise EvalError(f"cannot {what} {spec}: {first.strip()}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="care-eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity on local text files; JSON on stdout")
    ppl.add_argument("model", help="original or care_mla model folder, its Hub repo id, or a .gguf file")
    ppl.add_argument("--text", nargs="+", required=True, metavar="FILE", help=".txt (whole file) or .jsonl (\"text\" field)")
    ppl.add_argument("--seqlen", type=int, default=1024)
    ppl.add_argument("--max-tokens", type=int, default=None)
    ppl.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ppl.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when MODEL is a repo id")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.max_tokens is not None and args.max_tokens < 2:
            raise EvalError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        texts = read_texts(args.text)  # before loading: a bad path fails in milliseconds
        model, tokenizer = load_model(args.model, args.device, args.dtype, args.revision)
        result = perplexity(model, tokenizer, texts, args.seqlen, args.max_tokens, args.device, args.batch_size)
    except EvalError as e:
        print(f"care-eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    result["model"] = args.model
    result["model_type"] = getattr(model.config, "model_type", None)
    result["dtype"] = args.dtype
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
