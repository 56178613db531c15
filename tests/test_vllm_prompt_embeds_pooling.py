"""Two ways into a converted model that skip its usual token path: prompt embeddings and the pooling runner.

Why: both reach the plugin's model class by other doors than a plain token prompt. `--enable-prompt-embeds` makes
vLLM call the model with `inputs_embeds` in place of token ids for the prompt (and with the embeddings of the
generated tokens afterwards), so the class must take them where the embedding layer would have run.
`--runner pooling --convert embed` builds the model without its LM head and pools its last hidden state into an
`/v1/embeddings` vector, so the class's hidden states (the final norm included), not its logits, are what is served.

A Llama conversion with per-layer ranks and the o_proj refit (tests/served_reference.mixed_rank_conversion), served
in fp32 and compared with model_defs (transformers) on the same checkpoint:
- prompt embeddings that are no token's embedding (the token embeddings of random prompts plus noise, so that a
  server that fell back to token ids could not match): greedy tokens equal model_defs' fed the same embeddings,
  generated-token logprobs within 1e-3;
- `/v1/embeddings` of random token prompts: the L2-normalised hidden state at the last position, as model_defs
  computes it after the final norm, to 1e-4 (cosine with the reference > 1 - 1e-6), and different prompts give
  different vectors.

The pooling server also checks the launcher (care_vllm.loadtest.server.VllmServer): it is started on a port another
socket listens on. CI once saw this module's server exit with "[Errno 98] Address already in use": the launcher's
free port was taken by another process in the seconds before vLLM bound it. The launcher now draws ports below the
kernel's ephemeral range and restarts a server whose port was taken on a fresh one; with no retries such a server
fails, naming the cause.
"""
from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.served_reference import mixed_rank_conversion, random_prompts, reference_model, serve_args
from tests.vllm_server import ServerError, VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

N_NEW = 12
NOISE = 0.05


@pytest.fixture(scope="module")
def converted(tmp_path_factory, calib_file):
    """(converted folder, its config, model_defs on it)."""
    _, out, cfg = mixed_rank_conversion(tmp_path_factory.mktemp("embeds"), "llama", calib_file)
    model, _ = reference_model(out)
    return out, cfg, model


def encode_embeds(embeds: torch.Tensor) -> str:
    """A [len, hidden] tensor as the completions API takes `prompt_embeds`: base64 of its torch.save bytes."""
    buf = io.BytesIO()
    torch.save(embeds.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def greedy_from_embeds(model, embeds: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """model_defs' n greedy tokens after a prompt given as embeddings (each generated token enters as its own token
    embedding, as in vLLM), by full recomputation; and each token's log-probability."""
    table = model.get_input_embeddings().weight
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(n):
            inputs = torch.cat([embeds, table[tokens]]) if tokens else embeds
            logp = torch.log_softmax(model(inputs_embeds=inputs[None]).logits[0, -1].double(), -1)
            tokens.append(int(logp.argmax()))
            logprobs.append(float(logp[tokens[-1]]))
    return tokens, logprobs


def test_prompt_embeds_match_model_defs(converted, tmp_path):
    out, cfg, model = converted
    g = torch.Generator().manual_seed(3)
    table = model.get_input_embeddings().weight.detach()
    prompts = [table[ids] + NOISE * table.std() * torch.randn(len(ids), table.shape[1], generator=g)
               for ids in random_prompts(cfg["vocab_size"], n=4, seed=2)]
    with VLLMServer(out, *serve_args("--enable-prompt-embeds"), log_path=tmp_path / "embeds.log") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
        name = client.models.list().data[0].id

        def ask(embeds):
            return client.completions.create(model=name, prompt=None, max_tokens=N_NEW, temperature=0, logprobs=0,
                                             extra_body={"prompt_embeds": encode_embeds(embeds), "ignore_eos": True,
                                                         "return_token_ids": True})

        with ThreadPoolExecutor(len(prompts)) as ex:
            results = list(ex.map(ask, prompts))
    distinct = set()
    for embeds, r in zip(prompts, results):
        got = list(r.choices[0].token_ids)
        want, want_logprobs = greedy_from_embeds(model, embeds, N_NEW)
        assert got == want, f"vLLM {got} != model_defs {want}"
        err = max(abs(a - b) for a, b in zip(r.choices[0].logprobs.token_logprobs, want_logprobs))
        assert err < 1e-3, err
        distinct.update(got)
    assert len(distinct) > 4, f"continuations too uniform to compare: {distinct}"


def held_port() -> socket.socket:
    """A socket listening on a port of 127.0.0.1: `vllm serve` cannot bind that port while it is open."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.fixture(scope="module")
def pooling_server(converted, tmp_path_factory):
    """(the pooling server, the port it was first given): started on a port another socket listens on, as CI once
    saw a port taken between the launcher's choice and vLLM's bind
    (see test_a_taken_port_is_replaced_by_a_fresh_one)."""
    out, _, _ = converted
    # eager: the pooling model's forward is the generating one's without the LM head, and compiles as it does
    # (the prompt-embeds server here and tests/test_vllm_serve.py's Llama server run compiled; ~35 s each on 2 cores)
    args = serve_args("--enforce-eager", "--runner", "pooling", "--convert", "embed",
                      "--pooler-config", '{"pooling_type": "LAST", "use_activation": true}')
    with held_port() as blocker:
        taken = blocker.getsockname()[1]
        server = VLLMServer(out, *args, port=taken, log_path=tmp_path_factory.mktemp("pooling") / "pooling.log")
        server.start().wait_ready()
    try:
        yield server, taken
    finally:
        server.stop()


def test_a_taken_port_is_replaced_by_a_fresh_one(converted, pooling_server, tmp_path):
    """Without retries a server on a taken port fails, naming the cause; with the launcher's default it is restarted
    on a fresh port, which `port`, `base_url` and the recorded command line name, and its log says why. (That it
    then serves the right thing is the pooling test's part.)"""
    out, _, _ = converted
    with held_port() as blocker:
        with pytest.raises(ServerError, match="Address already in use"):
            with VLLMServer(out, *serve_args(), port=blocker.getsockname()[1], port_retries=0,
                            log_path=tmp_path / "no_retry.log"):
                pass
    server, taken = pooling_server
    assert server.port != taken
    assert server.base_url.endswith(f":{server.port}")
    assert f"--port {server.port}" in " ".join(server.args)
    assert f"port {taken} was taken before vllm serve bound it; restarting on port {server.port}" in server.log_text()


def test_pooling_runner_embeddings_match_model_defs(converted, pooling_server):
    out, cfg, model = converted
    prompts = random_prompts(cfg["vocab_size"], n=4, seed=5)
    server, _ = pooling_server
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=300, max_retries=0)
    r = client.embeddings.create(model=client.models.list().data[0].id, input=prompts)
    served = torch.tensor([d.embedding for d in sorted(r.data, key=lambda d: d.index)], dtype=torch.float64)
    with torch.no_grad():
        want = torch.stack([model.model(torch.tensor([ids])).last_hidden_state[0, -1].double() for ids in prompts])
    want = torch.nn.functional.normalize(want, dim=-1)
    assert served.shape == want.shape
    assert (served - want).abs().max() < 1e-4, (served - want).abs().max()
    assert (served * want).sum(-1).min() > 1 - 1e-6
    off_diagonal = (served @ served.T - torch.eye(len(prompts), dtype=torch.float64)).abs().max()
    assert off_diagonal < 0.99, "the prompts' embeddings should differ"
