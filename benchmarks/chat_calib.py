"""Calibrating an instruct model on prose vs on conversations: one-shot chat fidelity and prose
perplexity of the converted model.

    .venv/bin/python benchmarks/chat_calib.py          # SmolLM2-135M-Instruct, KV 0.5 (~10 min on 2 cores)

Every conversion: care, --kv-ratio, {adjusted, uniform} ranks, --calib-samples x --calib-seqlen
tokens drawn from one of three calibration sets:
  prose       the train-split prefixes benchmarks/oneshot.py calibrates on (its stats cache is reused)
  chat        data/corpus/chat.train.jsonl: the corpus' consecutive paragraphs as user/assistant turns
              (scripts/make_chat_calib.py), rendered with the model's chat template by care-convert
  prose+chat  both files (windows are drawn over the joined tokens, so ~1/4 of them are chat)
Metrics:
  prose ppl   as oneshot.py (test split, --eval-tokens tokens in --eval-seqlen windows)
  chat        held-out prompts: the user turns of data/corpus/chat.test.jsonl plus a few generic
              questions, through the chat template with the generation prompt. The reference answer is
              the ORIGINAL model's greedy answer (--answer-tokens); teacher-forced on prompt + answer:
              mean KL(original || converted) per answer token, top-1 agreement with the original,
              perplexity of the original's answer under the converted model, and the number of
              prompts the converted model answers with an immediate end of turn (greedy first token
              = EOS: an empty reply from `vllm serve`).
Conversions run without care-convert's o_proj refit (its default) unless --o-proj-refit is given;
--refit-ridges off,0.01,0.1 converts each cell once per entry (off = no refit, a number = the refit with
that --o-proj-refit-ridge), for the ridge study of benchmarks/results/refit_ridge.md.
Writes benchmarks/results/chat_calib.json and chat_calib.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import oneshot  # noqa: E402
import sweep  # noqa: E402

GENERIC_QUESTIONS = ("What is a Python dictionary?", "How do I read a file line by line in Perl?",
                     "Who is Elizabeth Bennet?", "What does the Linux kernel scheduler do?",
                     "Give me three tips for writing clean code.", "What is the capital of France?",
                     "Explain recursion to a child.", "Write a haiku about autumn.")
CALIB_SETS = ("prose", "chat", "prose+chat")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="DATA_DIR of scripts/get_data.sh (default data/)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--policies", default="adjusted,uniform")
    p.add_argument("--calib-sets", default=",".join(CALIB_SETS))
    p.add_argument("--objective", default="kv", choices=["kv", "attention"], help="care-convert --objective")
    p.add_argument("--o-proj-refit", action="store_true", help="convert with care-convert's o_proj refit")
    p.add_argument("--refit-ridges", default=None, metavar="LIST",
                   help="comma list of refit settings, each 'off' or an --o-proj-refit-ridge value (overrides "
                        "--o-proj-refit)")
    p.add_argument("--answer-tokens", type=int, default=48)
    sweep.add_eval_calib_args(p)   # --eval-tokens: prose tokens
    p.add_argument("--work-dir", default=None, help="checkpoints + stats caches (default DATA/bench/oneshot)")
    p.add_argument("--out", default=str(common.RESULTS / "chat_calib"), help="output path stem (.json/.md)")
    return p


def chat_prompts(tok, data: Path) -> list[list[int]]:
    """Token ids of the held-out chat prompts (chat template + generation prompt)."""
    from converter.calib_data import read_texts

    src = data / "corpus" / "chat.test.jsonl"
    if not src.is_file():
        raise SystemExit(f"missing {src}: run scripts/get_data.sh first")
    users = [conv[0]["content"] for conv in read_texts([src])] + list(GENERIC_QUESTIONS)
    return [list(tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]) for u in users]


def answer_logprobs(model, seqs: list[list[int]], starts: list[int]):
    """Per sequence: log-softmax over the vocabulary at every answer position [len - start, V]."""
    import torch

    out = []
    with torch.no_grad():
        for s, n in zip(seqs, starts):
            logits = model(torch.tensor([s])).logits[0, n - 1: len(s) - 1]
            out.append(torch.log_softmax(logits.double(), -1))
    return out


def chat_fidelity(ref, got, answers: list[list[int]], eos: int) -> dict:
    import torch

    kl = agree = nll = 0.0
    n = empty = 0
    for r, g, a in zip(ref, got, answers):
        kl += (r.exp() * (r - g)).sum().item()
        agree += (r.argmax(-1) == g.argmax(-1)).sum().item()
        nll -= g.gather(1, torch.tensor(a)[:, None]).sum().item()
        n += len(a)
        empty += int(g[0].argmax().item() == eos)
    return {"kl_per_token": kl / n, "top1_agreement": agree / n, "answer_ppl": float(torch.tensor(nll / n).exp()),
            "empty_replies": empty, "prompts": len(answers)}


def refit_settings(args) -> list[float | None]:
    """The refit settings to convert each cell with: None = no refit, else the ridge."""
    from converter.refit import RIDGE

    if args.refit_ridges is None:
        return [RIDGE if args.o_proj_refit else None]
    return [None if x == "off" else float(x) for x in common.csv_list(args.refit_ridges)]


def refit_label(ridge: float | None) -> str:
    return "off" if ridge is None else f"ridge {ridge:g}"


def render_md(res: dict) -> str:
    s = res["settings"]
    orig = res["original"]
    lines = [*common.report_head(res, "Calibration text for an instruct model: prose vs conversations "
                                      "(one-shot, no healing)"),
             f"- model: {s['model']}, care (objective {s.get('objective', 'kv')}"
             f"{', o_proj refit' if s.get('o_proj_refit') and s.get('refit_ridges') is None else ''}), "
             f"KV {s['ratio']}, "
             f"calibration {s['calib_samples']} x {s['calib_seqlen']} tokens from the set named in the row "
             "(benchmarks/chat_calib.py docstring)",
             f"- chat: {orig['prompts']} held-out prompts, reference = the original's greedy answer "
             f"({s['answer_tokens']} tokens); the original itself ends {orig['empty_replies']} of them at once",
             f"- prose ppl: test split, {res['prose_tokens']} tokens; original {orig['prose_ppl']:.2f}", ""]
    sweep_refit = s.get("refit_ridges") is not None
    header = ["ranks", "calibration", *(["o_proj refit"] if sweep_refit else []), "KL/token (chat)",
              "top-1 agree", "answer ppl", "empty replies", "prose ppl"]
    rows = [[r["policy"], r["calib"], *([refit_label(r["refit_ridge"])] if sweep_refit else []),
             f"{r['kl_per_token']:.3f}", f"{r['top1_agreement']:.3f}",
             f"{r['answer_ppl']:.2f}", f"{r['empty_replies']}/{r['prompts']}", f"{r['prose_ppl']:.2f}"]
            for r in res["rows"].values()]
    return "\n".join(lines + [common.md_table(header, rows)]) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    import model_defs  # noqa: F401  (registers care_mla with transformers)
    from converter.pipeline import convert

    data = common.data_dir(args.data_dir)
    work = Path(args.work_dir) if args.work_dir else data / "bench" / "oneshot"
    policies, sets = common.csv_list(args.policies), common.csv_list(args.calib_sets)
    ppl_fn, ppl_name = common.perplexity_fn()
    src, tok, texts, n_tok, per_file, mdir, prose_stats = oneshot.model_inputs(
        args.model, data, work, oneshot.parse_eval_tokens(args.eval_tokens), args)
    prose = [str(p) for p in common.calib_subset(data, args.calib_chars)]
    chat = str(data / "corpus" / "chat.train.jsonl")
    tag = f"{args.calib_samples}x{args.calib_seqlen}_seed{args.seed}"
    calib = {"prose": (prose, prose_stats), "chat": ([chat], common.stats_cache(mdir, f"chat_{tag}")),
             "prose+chat": (prose + [chat], common.stats_cache(mdir, f"prosechat_{tag}_c{args.calib_chars}"))}
    res = {"command": common.command_line(), "started": common.now_utc(), "machine": common.machine(),
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "data_dir")},
           "perplexity": ppl_name, "prose_tokens": n_tok,
           "calibration_files": {k: v[0] for k, v in calib.items() if k in sets}, "rows": {}}
    save = common.report_saver(res, args.out, render_md)

    prompts = chat_prompts(tok, data)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=args.answer_tokens, do_sample=False)[0].tolist()
            answers.append(out[len(p):])
    seqs = [p + a for p, a in zip(prompts, answers)]
    starts = [len(p) for p in prompts]
    ref = answer_logprobs(model, seqs, starts)
    res["original"] = {**chat_fidelity(ref, ref, answers, tok.eos_token_id),
                       "prose_ppl": oneshot.evaluate(model, tok, texts, per_file, args, ppl_fn)["ppl"]}
    del model
    print(f"original: {res['original']}", flush=True)

    for calib_name in sets:
        files, stats = calib[calib_name]
        for policy in policies:
            for ridge in refit_settings(args):
                ckpt = mdir / "ckpt_chat_calib"
                convert(str(src), str(ckpt), calib_files=files, method="care", ranks=policy, kv_ratio=args.ratio,
                        objective=args.objective, calib_samples=args.calib_samples,
                        calib_seqlen=args.calib_seqlen, seed=args.seed, overwrite=True, stats_cache=str(stats),
                        dtype="float32", o_proj_refit=ridge is not None,
                        **({"o_proj_refit_ridge": ridge} if ridge is not None else {}))
                model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
                row = {"policy": policy, "calib": calib_name, "refit_ridge": ridge,
                       **chat_fidelity(ref, answer_logprobs(model, seqs, starts), answers, tok.eos_token_id),
                       "prose_ppl": oneshot.evaluate(model, tok, texts, per_file, args, ppl_fn)["ppl"]}
                del model
                gc.collect()
                key = f"{policy}|{calib_name}" + (f"|{refit_label(ridge)}" if args.refit_ridges else "")
                res["rows"][key] = row
                print(json.dumps(row), flush=True)
                save()
    save()
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
