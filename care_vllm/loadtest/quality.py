"""The quality half of the report: greedy agreement between the two served models on a fixed prompt
set (what users see), and held-out perplexity of both checkpoints (care-eval's function)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In the Linux kernel, a spinlock is",
    "It is a truth universally acknowledged, that",
    "The three primary colors are",
    "To install a Python package with pip, run",
    "Perl's hashes are",
    "Water boils at a temperature of",
    "The main difference between a process and a thread is",
    "Once upon a time, in a small village,",
    "A list comprehension in Python looks like",
    "The function malloc() returns",
    "Elizabeth Bennet walked into the room and",
    "Photosynthesis is the process by which",
    "The HTTP status code 404 means",
    "To reverse a string in Python you can",
)


def greedy_completions(base_url: str, served_name: str, max_tokens: int = 32,
                       prompts: tuple[str, ...] = PROMPTS) -> list[str]:
    """Greedy completions (temperature 0), sent concurrently through the OpenAI client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=600)

    def one(p: str) -> str:
        r = client.completions.create(model=served_name, prompt=p, max_tokens=max_tokens, temperature=0.0)
        return r.choices[0].text

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, prompts))


def agreement(tokenizer, a: list[str], b: list[str]) -> dict:
    """Token-level greedy agreement: exact-match rate and mean shared-prefix fraction."""
    exact, prefix_frac, rows = 0, [], []
    for x, y in zip(a, b):
        tx = tokenizer(x, add_special_tokens=False)["input_ids"]
        ty = tokenizer(y, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(tx), len(ty)) and tx[n] == ty[n]:
            n += 1
        exact += int(tx == ty)
        prefix_frac.append(n / max(1, max(len(tx), len(ty))))
        rows.append({"shared_prefix_tokens": n, "tokens": [len(tx), len(ty)]})
    return {"prompts": len(a), "exact_match_rate": exact / max(1, len(a)),
            "mean_shared_prefix_fraction": sum(prefix_frac) / max(1, len(prefix_frac)), "per_prompt": rows}


def perplexities(models: dict[str, str], texts: list[str], seqlen: int, max_tokens: int,
                 hf_overrides: dict[str, dict] | None = None) -> dict:
    """Held-out perplexity of each checkpoint folder (loaded with transformers, fp32, CPU; `hf_overrides`:
    a model's config overrides by name, as care-convert --hf-overrides recorded them for the original)."""
    from converter.eval_cli import load_model, perplexity

    out = {}
    for name, path in models.items():
        model, tok = load_model(path, "cpu", "float32", hf_overrides=(hf_overrides or {}).get(name))
        out[name] = perplexity(model, tok, texts, seqlen, max_tokens, "cpu", 1)
        del model
    return out
