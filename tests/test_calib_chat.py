"""Chat conversations as calibration / healing / evaluation text: `.jsonl` records with a "messages"
list are rendered with the model's own chat template, so the calibration windows hold exactly the
tokens a chat request to the served model consists of (special tokens as single ids, not as text).

The reference is transformers itself: `apply_chat_template(..., tokenize=True)` on the same
tokenizer. Bad records and a tokenizer without a chat template are refused by `care-convert` with
one line, exit code 2 and no OUT.
"""
from __future__ import annotations

import json
import shutil

import pytest

from converter import calib_data
from converter.errors import ConversionError
from tests.test_converter_errors import assert_refused, run_convert
from tests.tiny_models import TOKENIZER_SRC, make_tiny_original, require_shared

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What does the KV cache hold?"},
     {"role": "assistant", "content": "Keys and values of every past token."}],
    [{"role": "user", "content": "Name a latent rank."}, {"role": "assistant", "content": "Sixty-four."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_shared(TOKENIZER_SRC))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_conversations_become_the_chat_template_token_ids(tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] + [{"text": "plain prose"}])
    docs = calib_data.read_texts([f])
    assert docs[0] == CONVERSATIONS[0] and docs[2] == "plain prose"
    rendered = calib_data.render(tokenizer, docs)
    assert rendered[2] == "plain prose"
    for conv, text in zip(CONVERSATIONS, rendered):
        want = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert text == tokenizer.apply_chat_template(conv, tokenize=False)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == list(want)
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert got.count(im_start) == len(conv)  # one special id per turn, not the characters "<|im_start|>"

    # every calibration window is a slice of the rendered token stream
    stream = tokenizer("\n\n".join(rendered), add_special_tokens=False)["input_ids"]
    windows = calib_data.token_windows(tokenizer, docs, samples=4, seqlen=12, seed=0)
    bos = tokenizer.bos_token_id
    for w in windows.tolist():
        body = w[1:] if bos is not None else w
        assert any(stream[i:i + len(body)] == body for i in range(len(stream) - len(body) + 1))


@pytest.mark.parametrize("record, needle", [
    ({"messages": "hello"}, '"messages" must be a non-empty list'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, 'message 0 needs string "role" and "content"'),
    ({"prompt": "x"}, 'needs a string "text" field or a "messages" list'),
])
def test_bad_chat_records_are_named_with_their_line(record, needle, tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, record])
    with pytest.raises(ConversionError) as e:
        calib_data.read_texts([f])
    assert f"{f}:2" in str(e.value) and needle in str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_calib")
    src = make_tiny_original(root / "orig", "llama", num_layers=2)
    chat = write_jsonl(root / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS] * 40)
    return root, src, chat


def test_convert_calibrates_on_conversations(tiny, tmp_path):
    root, src, chat = tiny
    out = tmp_path / "mla"
    proc = run_convert(src, out, "--calib", chat, "--calib-samples", "4", "--calib-seqlen", "32", "--kv-ratio", "0.75")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "care_report.json").read_text())
    assert report["calibration"]["files"] == [str(chat)]


def test_convert_refuses_conversations_without_a_chat_template(tiny, tmp_path):
    root, src, chat = tiny
    bare = tmp_path / "no_template"
    shutil.copytree(src, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "mla"
    assert_refused(run_convert(bare, out, "--calib", chat), out, "chat template", '"messages"')


def test_convert_refuses_conversations_the_chat_template_raises_on(tiny, tmp_path):
    """A template that refuses a record (Mistral's 'Conversation roles must alternate') was a jinja2 traceback."""
    root, src, chat = tiny
    strict = tmp_path / "strict"
    shutil.copytree(src, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    two_users = write_jsonl(tmp_path / "two_users.jsonl",
                            [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}])
    out = tmp_path / "mla"
    assert_refused(run_convert(strict, out, "--calib", two_users), out, "chat template refused",
                   "Conversation roles must alternate")


def test_perplexity_of_conversations_is_that_of_their_rendered_text(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter.eval_cli import perplexity

    _, src, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    got = perplexity(model, tok, CONVERSATIONS, seqlen=16)
    want = perplexity(model, tok, rendered, seqlen=16)
    assert got["tokens"] == want["tokens"] > 0
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)


def test_healing_windows_of_conversations_are_those_of_their_rendered_text(tokenizer):
    from converter.heal_data import pack_windows

    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    got = pack_windows(tokenizer, CONVERSATIONS * 4, seqlen=16)
    assert got.equal(pack_windows(tokenizer, rendered * 4, seqlen=16))
    assert (got == tokenizer.convert_tokens_to_ids("<|im_start|>")).sum() > 0
