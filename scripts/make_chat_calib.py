"""Chat-format calibration text from the offline corpus, for converting instruct models.

    python scripts/make_chat_calib.py data/corpus            # -> data/corpus/chat.{train,test}.jsonl

Why: CARE fits each layer's latent to the activations of its calibration text. Calibrated on prose
alone, the chat structure an instruct model is served with (system / user / assistant turns, their
special tokens) is never seen, and at KV 0.5 SmolLM2-Instruct ends 47 of 48 answers before the
first word (benchmarks/results/chat_calib.md). With no chat logs offline, this wraps the corpus itself as
conversations: two consecutive paragraphs of a document become a user turn asking to continue the
first and an assistant turn holding the second (a coherent exchange, in the corpus' own words).
One JSON object per line, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`: the
format `care-convert --calib`, `care-heal --text` and `care-eval --text` render with the model's
chat template. Deterministic (seeded); the same count from each of the four sources.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DOMAINS = ("austen", "linux61_docs", "perl536_docs", "python311_docs")
INSTRUCTIONS = ("Continue this text.", "What comes next? Write the following paragraph.",
                "Keep going:", "Write the next paragraph of this document.")
MIN_CHARS, MAX_CHARS = 200, 1200


def paragraph_pairs(text: str) -> list[tuple[str, str]]:
    """Consecutive (paragraph, next paragraph) pairs whose lengths suit one chat turn each."""
    paras = [p.strip() for p in text.split("\n\n")]
    return [(a, b) for a, b in zip(paras, paras[1:])
            if MIN_CHARS <= len(a) <= MAX_CHARS and MIN_CHARS <= len(b) <= MAX_CHARS]


def conversations(text: str, n: int, rng: random.Random) -> list[list[dict]]:
    pairs = paragraph_pairs(text)
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} usable paragraph pairs, {n} requested")
    return [[{"role": "user", "content": f"{rng.choice(INSTRUCTIONS)}\n\n{a}"},
             {"role": "assistant", "content": b}] for a, b in rng.sample(pairs, n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="folder with {austen,linux61_docs,perl536_docs,python311_docs}.{train,test}.txt")
    ap.add_argument("--train", type=int, default=800, help="conversations from the train split (default 800)")
    ap.add_argument("--test", type=int, default=40, help="conversations from the test split (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for split, n in (("train", args.train), ("test", args.test)):
        rng = random.Random(f"{args.seed}-{split}")
        convs = []
        for d in DOMAINS:
            src = args.corpus / f"{d}.{split}.txt"
            if not src.is_file():
                raise SystemExit(f"missing {src}: run scripts/get_data.sh first")
            convs += conversations(src.read_text(encoding="utf-8", errors="replace"), n // len(DOMAINS), rng)
        rng.shuffle(convs)
        out = args.corpus / f"chat.{split}.jsonl"
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
        tmp.replace(out)
        print(f"{out}: {len(convs)} conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
