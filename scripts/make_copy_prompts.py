"""Copy-task prompts from the offline corpus, for load tests of speculative decoding.

    python scripts/make_copy_prompts.py data/corpus data/bench/copy_prompts.jsonl --num 32

Why: vLLM's n-gram drafter proposes the continuation of the latest n-gram that also occurs earlier
in the context, so it pays off when the answer repeats the prompt (editing, rewriting, quoting
code or documents back). Random-token prompts (vllm bench serve's random dataset) never do; these
ask the model to reproduce a paragraph of the corpus' test split, the workload where drafts are
accepted. One `{"prompt": ...}` per line: vllm bench serve's custom dataset (it applies the
model's chat template). Deterministic (seeded); the same count from each of the four sources.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_chat_calib import DOMAINS  # the corpus' four sources (this folder)

INSTRUCTION = "Repeat the following text exactly, word for word:"
MIN_CHARS, MAX_CHARS = 300, 900


def paragraphs(text: str) -> list[str]:
    """The test split's paragraphs of a length that fits one request."""
    return [p.strip() for p in text.split("\n\n") if MIN_CHARS <= len(p.strip()) <= MAX_CHARS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="folder with <domain>.test.txt (scripts/get_data.sh)")
    ap.add_argument("out", type=Path, help="output .jsonl")
    ap.add_argument("--num", type=int, default=32, help="prompts in all (a multiple of 4; default 32)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.num <= 0 or args.num % len(DOMAINS):
        raise SystemExit(f"--num must be a positive multiple of {len(DOMAINS)}")
    rng = random.Random(args.seed)
    prompts = []
    for d in DOMAINS:
        paras = paragraphs((args.corpus / f"{d}.test.txt").read_text(encoding="utf-8"))
        if len(paras) < args.num // len(DOMAINS):
            raise SystemExit(f"{d}: only {len(paras)} usable paragraphs")
        prompts += [f"{INSTRUCTION}\n\n{p}" for p in rng.sample(paras, args.num // len(DOMAINS))]
    rng.shuffle(prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    print(f"{len(prompts)} prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
