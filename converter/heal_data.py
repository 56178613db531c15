"""care-heal's training data: documents and conversations from --text files, packed into fixed windows,
visited in a seeded order that is a pure function of the sample index (so --resume continues exactly)."""
from __future__ import annotations

import torch

from .errors import HealError


def read_docs(files: list, what: str) -> list:
    """Plain documents and chat conversations (converter.calib_data.read_texts) from --text files."""
    from .calib_data import read_texts

    return read_texts(list(files or []), what=what)  # its errors name `what` ("--text file not found: ...")


def pack_windows(tokenizer, docs: list, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Documents joined by EOS, packed into [N, seqlen] windows (BOS first when the tokenizer has one).
    Conversations are rendered with the model's chat template first (calib_data.render).

    Tokenized in chunks into an int32 stream (a large corpus does not become a list of Python ints);
    the windows stay int32 and are made long per batch."""
    from .calib_data import render

    docs = render(tokenizer, docs)  # its ConversionError reaches main() like every other bad input
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seqlen - 1 if bos is not None else seqlen
    parts: list[torch.Tensor] = []
    have = 0
    for i in range(0, len(docs), 256):
        for ids in tokenizer(docs[i:i + 256], add_special_tokens=False)["input_ids"]:
            if eos is not None:
                ids = ids + [eos]
            parts.append(torch.tensor(ids, dtype=torch.int32))
            have += len(ids)
        if max_windows is not None and have >= max_windows * body:
            break
    n = have // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise HealError(f"text has only {have} tokens; one window needs {body} (--seqlen {seqlen})")
    w = torch.cat(parts)[: n * body].view(n, body)
    if bos is not None:
        w = torch.cat([torch.full((n, 1), bos, dtype=torch.int32), w], 1)
    return w


class WindowOrder:
    """Sample i of the run -> window index: a seeded permutation per epoch (pure function of i)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g)}
        return int(self._cache[epoch][i % self.n])
