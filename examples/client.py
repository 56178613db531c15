"""Query a care-vllm server (or any OpenAI-compatible server) with the official openai client:
a completion, a chat completion (the model's chat template), streaming, and concurrent requests.

  python examples/client.py --base-url http://127.0.0.1:8000/v1 --model smollm2-care
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = args.model or client.models.list().data[0].id

    r = client.completions.create(model=model, prompt="The Linux kernel is", max_tokens=32, temperature=0)
    print("completion:", repr(r.choices[0].text))

    r = client.chat.completions.create(model=model, max_tokens=48, temperature=0,
                                       messages=[{"role": "user", "content": "What is a Python dictionary?"}])
    print("chat:", repr(r.choices[0].message.content))

    print("stream: ", end="", flush=True)
    for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=32,
                                           temperature=0, stream=True):
        print(chunk.choices[0].text, end="", flush=True)
    print()

    prompts = ["def add(a, b):", "Perl is", "Pride and Prejudice", "A spinlock"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        outs = pool.map(lambda p: client.completions.create(model=model, prompt=p, max_tokens=16,
                                                            temperature=0).choices[0].text, prompts)
        for p, o in zip(prompts, outs):
            print(f"concurrent {p!r} -> {o!r}")


if __name__ == "__main__":
    main()
