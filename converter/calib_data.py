"""Calibration text -> fixed token windows.

Text comes only from local files (`.txt` whole-file documents, `.jsonl` with a "text" field per
line). Documents are joined with blank lines and tokenized once; `samples` windows of `seqlen`
tokens are drawn at seeded random offsets, so the same inputs always give the same windows (and
therefore the same checkpoint).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConversionError


def read_texts(files: list[str | Path]) -> list[str]:
    """Read documents from .txt / .jsonl files; raise ConversionError naming a bad file."""
    if not files:
        raise ConversionError("no calibration text given (--calib FILE...)")
    docs: list[str] = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConversionError(f"calibration file not found: {p}")
        if p.suffix == ".jsonl":
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversionError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ConversionError(f'{p}:{i + 1}: a .jsonl line needs a string "text" field')
                docs.append(rec["text"])
        else:
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConversionError(f"calibration text is empty: {', '.join(str(f) for f in files)}")
    return docs


def token_windows(tokenizer, docs: list[str], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return a [samples, seqlen] LongTensor of token windows (BOS first when the tokenizer has one)."""
    if samples < 1 or seqlen < 2:
        raise ConversionError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2 (got {samples}, {seqlen})")
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seqlen - 1 if bos is not None else seqlen
    if len(ids) < body:
        raise ConversionError(
            f"calibration text has only {len(ids)} tokens; one window needs {body} (--calib-seqlen {seqlen})")
    ids = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (samples,), generator=gen)
    windows = torch.stack([ids[s:s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows
