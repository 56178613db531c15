"""Structured outputs (guided decoding) on a converted checkpoint: `vllm serve OUT` with requests constrained by a
JSON schema, a choice list and a regex, and a chat request with `response_format` json_schema.

Why it needs its own test: vLLM builds a token bitmask per request from the grammar (xgrammar) and applies it to
the logits the plugin's model returns, for the structured requests of a batch only, rows matched to requests by
id; the greedy token is the argmax of what the mask leaves. The plugin must hand vLLM logits of the full vocabulary
in batch order for that to constrain the right rows, and the output must still be the model's.

The reference is independent of the plugin and of vLLM's engine: model_defs (transformers, fp32) on the same
checkpoint, decoding greedily by full recomputation under the same constraint applied with xgrammar directly
(GrammarMatcher, fill_next_token_bitmask, apply_token_bitmask_inplace, the stop token the engine gives it). A
random tiny conversion with per-layer ranks (tests/served_reference.mixed_rank_conversion): its text is junk, so
the constraint, not the model, gives the structure, and the mask changes its greedy choice at many steps.

Served with `--structured-outputs-config` backend xgrammar (what "auto" picks for these requests; named so that
server and reference use one engine) and disable_any_whitespace: with free whitespace the random model (and the
trained llama3-small as well) emits whitespace until max_tokens. vLLM's xgrammar backend reads that flag from the
server config only (a request's structured_outputs.disable_any_whitespace does not reach it).

Checked, for requests sent together (with an unconstrained one, whose row the masks must leave alone): the served
token ids are the reference's, the constraint ends the output (finish reason "stop" on the stop token) with text
that validates against the schema / is one of the choices / fully matches the regex, and the generated-token
logprobs are within 1e-3 of the reference's masked log-softmax. (vLLM's default logprobs_mode, raw_logprobs, is
computed in the sampler from logits the bitmask was already applied to: the log-probabilities renormalised over the
allowed tokens, 0 for forced ones. The test checks that these differ from the unmasked ones, so they tell.)
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest
import torch

from tests.served_reference import log_probs, mixed_rank_conversion, reference_model, serve_args
from tests.tiny_models import TOKENIZER_SRC, require_shared
from tests.vllm_server import VLLMServer

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

MAX_TOKENS = 40
SCHEMA = {"type": "object",
          "properties": {"layer": {"type": "string", "enum": ["key", "value", "rope"]},
                         "rank": {"type": "integer", "minimum": 0, "maximum": 999},
                         "absorbed": {"type": "boolean"}},
          "required": ["layer", "rank", "absorbed"], "additionalProperties": False}
CHOICES = ["latent attention", "grouped query attention", "multi-head attention", "sliding window"]
REGEX = r"[A-Z][a-z]{2,8}-[0-9]{2,4}"
CHAT = [{"role": "user", "content": "Describe one layer's cache as JSON."}]
# name: (prompt, the request's structured_outputs; None: unconstrained)
COMPLETIONS = {
    "json": ("The cache of one layer, as JSON:", {"json": SCHEMA}),
    "choice": ("Which attention does the converted model use? Answer:", {"choice": CHOICES}),
    "regex": ("A product code:", {"regex": REGEX}),
    "unconstrained": ("Once upon a time, in a small village by the sea, there lived", None),
}


def reference_grammar(compiler, constraint: dict | None):
    """The constraint compiled with xgrammar as vLLM's xgrammar backend does under disable_any_whitespace (the
    choice list as an EBNF alternation of its strings)."""
    if constraint is None:
        return None
    if "json" in constraint:
        return compiler.compile_json_schema(json.dumps(constraint["json"]), any_whitespace=False, separators=(",", ":"))
    if "choice" in constraint:
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in constraint["choice"]))
    return compiler.compile_regex(constraint["regex"])


def constrained_greedy(model, grammar, ids: list[int], stop_ids: list[int]) -> tuple[list[int], torch.Tensor, bool]:
    """model_defs' greedy continuation of `ids` with each step's logits masked to what `grammar` allows (None: no
    mask), up to MAX_TOKENS or a stop token. Returns the tokens, each step's masked log-softmax ([tokens, vocab],
    fp64, -inf where masked), and whether it stopped on a stop token."""
    matcher = xgr.GrammarMatcher(grammar, override_stop_tokens=stop_ids) if grammar is not None else None
    bitmask = xgr.allocate_token_bitmask(1, model.config.vocab_size)
    new, rows = [], []
    with torch.no_grad():
        while len(new) < MAX_TOKENS and not (new and new[-1] in stop_ids):
            logits = model(torch.tensor([ids + new])).logits[0, -1:].clone()
            if matcher is not None:
                matcher.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(logits, bitmask)
            new.append(int(logits.argmax()))
            rows.append(torch.log_softmax(logits[0].double(), -1))
            assert matcher is None or matcher.accept_token(new[-1])
    return new, torch.stack(rows), new[-1] in stop_ids


class Reply(NamedTuple):
    """One served request: the prompt as tokenized by the reference's tokenizer and by vLLM, its constraint, and
    what came back."""
    prompt_ids: list[int]
    served_prompt_ids: list[int]
    constraint: dict | None
    finish_reason: str
    text: str
    token_ids: list[int]
    logprobs: list[float]


@pytest.fixture(scope="module")
def served(tmp_path_factory, calib_file):
    """{case: Reply} for every request, all sent at once to one server, and the reference model with its
    tokenizer."""
    require_shared(TOKENIZER_SRC)
    root = tmp_path_factory.mktemp("structured_outputs")
    _, out, _ = mixed_rank_conversion(root, "llama", calib_file)
    model, tok = reference_model(out)
    config = {"backend": "xgrammar", "disable_any_whitespace": True}
    # eager: the masks are applied outside the model, compiled or not (compiled serving: tests/test_vllm_serve.py)
    with VLLMServer(out, *serve_args("--enforce-eager", "--structured-outputs-config", json.dumps(config)),
                    log_path=root / "serve.log") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=120, max_retries=0)
        name = client.models.list().data[0].id

        def complete(case):
            prompt, constraint = COMPLETIONS[case]
            extra = {"return_token_ids": True, **({"structured_outputs": constraint} if constraint else {})}
            c = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=0, extra_body=extra).choices[0]
            return Reply(tok(prompt)["input_ids"], list(c.prompt_token_ids), constraint, c.finish_reason, c.text,
                         list(c.token_ids), c.logprobs.token_logprobs)

        def chat():
            fmt = {"type": "json_schema", "json_schema": {"name": "layer_cache", "schema": SCHEMA}}
            r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                               logprobs=True, response_format=fmt,
                                               extra_body={"return_token_ids": True})
            c, templated = r.choices[0], tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
            return Reply(tok(templated, add_special_tokens=False)["input_ids"], list(r.prompt_token_ids),
                         {"json": SCHEMA}, c.finish_reason, c.message.content, list(c.token_ids),
                         [t.logprob for t in c.logprobs.content])

        with ThreadPoolExecutor(len(COMPLETIONS) + 1) as ex:
            replies = {case: ex.submit(complete, case) for case in COMPLETIONS} | {"chat json_schema": ex.submit(chat)}
            replies = {case: reply.result() for case, reply in replies.items()}
    yield replies, model, tok


@pytest.mark.parametrize("case", [*COMPLETIONS, "chat json_schema"])
def test_served_constrained_greedy_matches_model_defs(served, case):
    replies, model, tok = served
    ids, served_ids, constraint, finish, text, got, got_logprobs = replies[case]
    assert served_ids == ids
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size))
    stop_ids = [model.config.eos_token_id]
    want, masked, stopped = constrained_greedy(model, reference_grammar(compiler, constraint), ids, stop_ids)
    print(f"{case}: {text!r} ({len(got)} tokens, {finish})")
    if got != want:
        k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
        where = "" if k is None else (f": at {k} vLLM's {got[k]} (logprob {got_logprobs[k]:.4f}; model_defs' masked "
                                      f"{masked[k, got[k]]:.4f}) over {want[k]} ({masked[k, want[k]]:.4f})")
        pytest.fail(f"vLLM {got} != model_defs under xgrammar {want}{where}")
    assert finish == ("stop" if stopped else "length")
    # vLLM's logprobs come with its tokens, the stop token's too when it ends the output
    assert len(got_logprobs) == len(got)
    error = max(abs(lp - masked[j, t].item()) for j, (t, lp) in enumerate(zip(got, got_logprobs)))
    assert error < 1e-3, f"max |generated-token logprob diff| {error}"

    if constraint is None:
        return
    assert stopped, f"the constraint should end the output within {MAX_TOKENS} tokens: {text!r}"
    unmasked = log_probs(model, ids + got)[len(ids) - 1:-1]
    assert any(unmasked[j].argmax().item() != t for j, t in enumerate(got)), "the mask never changed the greedy token"
    assert max(abs(lp - unmasked[j, t].item()) for j, (t, lp) in enumerate(zip(got, got_logprobs))) > 0.1, \
        "masked and unmasked logprobs agree: the logprob comparison could not tell them apart"
    if "json" in constraint:
        jsonschema.validate(json.loads(text), constraint["json"])
    elif "choice" in constraint:
        assert text in constraint["choice"]
    else:
        assert re.fullmatch(constraint["regex"], text), text
