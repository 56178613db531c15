"""Calibration text -> fixed token windows.

Text comes only from local files: `.txt` (the whole file is one document) and `.jsonl`, one JSON
object per line with either a "text" string or a "messages" list of chat turns
(`{"role": ..., "content": ...}`, the OpenAI / transformers chat format). A conversation is rendered
with the model's own chat template (`tokenizer.apply_chat_template`), i.e. exactly the string a chat
request to the served model becomes, special tokens included. Why this matters: CARE fits the latent
to the activations it sees. Calibrated on prose only, SmolLM2-Instruct at KV 0.5 (adjusted ranks)
answers 47 of 48 held-out chat prompts with an immediate end-of-turn token (an empty reply);
calibrated on the same corpus wrapped as conversations, 1 of 48, with prose perplexity 12 % higher
(benchmarks/results/chat_calib.md): calibrate on what will be served.

Documents are joined with blank lines and tokenized once; `samples` windows of `seqlen` tokens are
drawn at seeded random offsets (every file contributes in proportion to its token count), so the
same inputs always give the same windows (and therefore the same checkpoint).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConversionError, first_line

if TYPE_CHECKING:   # torch is imported where windows are made: read_texts and check_files stay light
    import torch


Conversation = list  # [{"role": str, "content": str}, ...]


def _conversation(rec: dict, where: str) -> Conversation:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ConversionError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for j, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConversionError(f'{where}: message {j} needs string "role" and "content" fields')
    return msgs


def check_files(files: list[str | Path], what: str = "calibration text") -> list[Path]:
    """The text files as paths; ConversionError when none is given or one is not a file (`what` names the text)."""
    if not files:
        raise ConversionError(f"no {what} given")
    paths = [Path(f) for f in files]
    for p in paths:
        if p.is_dir():
            raise ConversionError(f"{what} {p} is a folder: name its files")
        if p.exists() and not p.is_file():   # read more than once (checked, then converted): a pipe would be empty
            raise ConversionError(f"{what} {p} is not a regular file (a device, pipe or socket): write the text to a "
                                  f"file and name that")
        if not p.is_file():
            raise ConversionError(f"{what} file not found: {p}")
    return paths


def jsonl_records(path: str | Path, error: type[Exception] = ConversionError, named: str = ""):
    """(line number from 1, record) of each non-blank line of a JSONL file; `error` names a line that is not JSON
    (prefixed with `named`, e.g. "--dataset-path ")."""
    for i, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{named}{path}:{i}: not valid JSON ({e.msg})") from None


def read_texts(files: list[str | Path], what: str = "calibration text") -> list[str | Conversation]:
    """Read documents from .txt / .jsonl files: plain strings, and conversations (lists of
    messages) from "messages" records. Raise ConversionError naming a bad file or line (`what`
    names the text in the messages)."""
    docs: list[str | Conversation] = []
    for p in check_files(files, what):
        if p.suffix == ".jsonl":
            for i, rec in jsonl_records(p):
                if isinstance(rec, dict) and "messages" in rec:
                    docs.append(_conversation(rec, f"{p}:{i}"))
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ConversionError(f'{p}:{i}: a .jsonl line needs a string "text" field '
                                          f'or a "messages" list')
                docs.append(rec["text"])
        else:
            docs.append(_utf8_text(p))
    docs = [d for d in docs if not isinstance(d, str) or d.strip()]
    if not docs:
        raise ConversionError(f"{what} is empty: {', '.join(str(f) for f in files)}")
    return docs


def _utf8_text(path: Path) -> str:
    """The file's text. A few undecodable bytes (a stray Latin-1 character) become U+FFFD; a file that is mostly
    not UTF-8 (binary, gzip) is refused by name: it had been calibrated on, as replacement characters, with exit 0."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())   # (less the file's own U+FFFD characters)
    nul = b"\x00" in raw
    if nul or bad > max(8, len(raw) // 100):
        what = "NUL bytes" if nul else f"{bad} bytes that are not UTF-8"
        raise ConversionError(f"{path}: not UTF-8 text ({what}); give plain text, .jsonl or decompressed files")
    return text


def render(tokenizer, docs: list[str | Conversation]) -> list[str]:
    """Plain documents unchanged; conversations through the tokenizer's chat template (the text of
    the whole exchange, no generation prompt). The special tokens in the result are tokenized as
    such by the caller's `tokenizer(text)` (transformers parses added special tokens in text)."""
    if all(isinstance(d, str) for d in docs):
        return list(docs)
    if not getattr(tokenizer, "chat_template", None):
        raise ConversionError('the text has chat "messages" records but the model\'s tokenizer has no chat '
                              'template to render them with; give plain "text" records instead')
    try:
        return [d if isinstance(d, str) else tokenizer.apply_chat_template(d, tokenize=False) for d in docs]
    except Exception as e:  # noqa: BLE001  (jinja2's TemplateError, or a template's own raise_exception)
        raise ConversionError(f"the model's chat template refused a \"messages\" record ({type(e).__name__}: "
                              f"{first_line(e)}); give records it accepts, or plain \"text\" records") from None


def token_windows(tokenizer, docs: list[str | Conversation], samples: int, seqlen: int,
                  seed: int) -> torch.Tensor:
    """Return a [samples, seqlen] LongTensor of token windows (BOS first when the tokenizer has one)."""
    import torch

    if samples < 1 or seqlen < 2:
        raise ConversionError(f"--calib-samples must be >= 1 and --calib-seqlen >= 2 (got {samples}, {seqlen})")
    ids = tokenizer("\n\n".join(render(tokenizer, docs)), add_special_tokens=False)["input_ids"]
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
