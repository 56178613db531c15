"""What the serving tests compare a running `vllm serve` against: model_defs (transformers, fp32) on
the same checkpoint. One place for the greedy reference, the concurrent greedy + logprob comparison,
and the tiny original whose continuations are worth comparing."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tests.tiny_models import make_tiny_original

KV_BYTES = 32 << 20          # --kv-cache-memory-bytes of every tiny-model server (one budget for all)
MAX_LEN = 512
PROMPTS = [
    "The latent cache of every layer",
    "Once upon a time, in a small village by the sea, there lived",
    "Attention is all you need, said the",
    "1, 2, 3, 4, 5,",
]


def serve_args(*extra: str) -> list[str]:
    """The `vllm serve` flags the serving tests share (fp32: compared with model_defs to 1e-3)."""
    return ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--kv-cache-memory-bytes", str(KV_BYTES),
            "--max-num-seqs", "8", *extra]


def varied_original(path: Path, arch: str, head_dim: int = 16, rope: dict | None = None) -> Path:
    """A tiny random original whose greedy continuations vary (a plain random model with tied
    embeddings mostly repeats its last token, which would make the greedy comparison weak): the
    attention and MLP outputs are scaled up so that the context, not the current token, decides.
    Stock vLLM's CPU attention runs head_dim 32 and up (16 only allocates its cache: enough for
    comparing KV sizes, not for serving the original)."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_original(path, arch, num_layers=4, hidden=64, heads=4, kv_heads=2, head_dim=head_dim, seed=1,
                             rope=rope)
    f = next(src.glob("*.safetensors"))
    tensors = load_file(str(f))
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):   # (w2: Mixtral's down_proj)
            tensors[name] = tensors[name] * 4.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    return src


def mixed_rank_conversion(root: Path, arch: str, calib_file: Path) -> tuple[Path, Path, dict]:
    """`varied_original` under root/orig converted to root/mla with adjusted ranks at KV 0.75 (rope 8, the o_proj
    refit on): a conversion whose layers really differ in width. Returns (original, converted folder, its
    config.json)."""
    import json

    from converter.pipeline import convert

    src = varied_original(root / "orig", arch)
    out = root / "mla"
    convert(src, out, calib_files=[calib_file], method="care", ranks="adjusted", kv_ratio=0.75, rope_dim=8,
            calib_samples=16, calib_seqlen=64, seed=0)
    cfg = json.loads((out / "config.json").read_text())
    assert len({k + v for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])}) > 1, "the test needs different ranks"
    return src, out, cfg


def random_prompts(vocab_size: int, n: int = 16, seed: int = 0, lengths: tuple[int, int] = (8, 40)) -> list[list[int]]:
    """n prompts of random token ids (>= 100: clear of the special tokens), lengths drawn from range(*lengths)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab_size, (int(k),), generator=g).tolist()
            for k in torch.randint(*lengths, (n,), generator=g)]


def greedy(model, ids, n: int) -> list[int]:
    """n greedy tokens by full recomputation (no cache): the reference for vLLM's paged decode."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.argmax()))
    return new


def reference_model(out: Path):
    """model_defs on a converted checkpoint, fp32, with its tokenizer."""
    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """model_defs' next-token log-probabilities at every position of `ids` ([len, vocab], fp64)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def generated_logprob_error(full: torch.Tensor, prompt_len: int, tokens: list[int], logprobs: list[float]) -> float:
    """The largest |logprob| difference between what vLLM reported for its generated `tokens` and `full`
    (`log_probs` over the prompt followed by those tokens)."""
    return max((abs(lp - full[prompt_len - 1 + j, t].item()) for j, (t, lp) in enumerate(zip(tokens, logprobs))),
               default=0.0)


def one_completion(client, model, ids: list[int], n_new: int, **sampling) -> tuple[list[int], float]:
    """One request for `ids` (n_new tokens, ignore_eos, with their logprobs; `sampling`: temperature, seed, ...) to
    the first model /v1/models lists: its tokens, and their `generated_logprob_error` against model_defs on them."""
    r = client.completions.create(model=client.models.list().data[0].id, prompt=ids, max_tokens=n_new, logprobs=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True}, **sampling)
    got, logprobs = list(r.choices[0].token_ids), r.choices[0].logprobs.token_logprobs
    return got, generated_logprob_error(log_probs(model, ids + got), len(ids), got, logprobs)


def compare_concurrent(client, model, prompt_ids: list[list[int]], n_new: int,
                       prompt_logprobs: bool = True, name: str | None = None) -> dict:
    """Send all prompts at once (greedy, ignore_eos, generated-token logprobs, and prompt logprobs
    unless `prompt_logprobs` is False) and compare with model_defs: asserts identical greedy tokens;
    returns the worst |logprob| differences (prompt tokens, 0.0 when not asked; generated tokens =
    vLLM's paged decode) and the distinct generated tokens. vLLM never reads the prefix cache for a
    request that asks for prompt logprobs: prefix-cache tests pass False. `name`: the served model (or LoRA
    adapter) to ask, by default the first one /v1/models lists."""
    name = name or client.models.list().data[0].id
    extra = {"ignore_eos": True, "return_token_ids": True, **({"prompt_logprobs": 0} if prompt_logprobs else {})}

    def ask(ids):
        return client.completions.create(model=name, prompt=ids, max_tokens=n_new, temperature=0,
                                         logprobs=0, extra_body=extra)

    with ThreadPoolExecutor(len(prompt_ids)) as ex:
        results = list(ex.map(ask, prompt_ids))

    worst = worst_decode = 0.0
    distinct = set()
    for ids, r in zip(prompt_ids, results):
        choice = r.choices[0]
        got = list(choice.token_ids)
        assert len(got) == n_new
        want = greedy(model, ids, n_new)
        assert got == want, f"prompt {ids}: vLLM {got} != model_defs {want}"
        distinct.update(got)

        full = log_probs(model, ids + got)
        worst_decode = max(worst_decode, generated_logprob_error(full, len(ids), got, choice.logprobs.token_logprobs))

        if not prompt_logprobs:
            continue
        plp = getattr(choice, "prompt_logprobs", None) or (choice.model_extra or {}).get("prompt_logprobs")
        assert plp is not None and len(plp) == len(ids) and plp[0] is None
        for i in range(1, len(ids)):
            entry = plp[i][str(ids[i])]
            lp = entry["logprob"] if isinstance(entry, dict) else entry.logprob
            worst = max(worst, abs(lp - full[i - 1, ids[i]].item()))
    return {"prompt": worst, "generated": worst_decode, "distinct": distinct}
