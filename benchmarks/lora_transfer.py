"""Does a LoRA adapter trained on the original survive `care-convert-lora`? A real adaptation, measured.

Trains a LoRA adapter (PEFT, every attention and MLP projection) on the ORIGINAL model with one domain's
training text, rewrites it for a converted checkpoint with care-convert-lora (converter/lora.py), and
measures held-out perplexity on that domain and on another one for: the original, the original with its
adapter, the converted model, the converted model with the rewritten adapter, and (ablation) the rewritten
adapter with the o_proj delta carried as is instead of through the o_proj refit's input map.

    .venv/bin/python benchmarks/lora_transfer.py     # SmolLM2 vs out/smollm2-care-kv0.5 (examples/quickstart.sh)

Writes benchmarks/results/lora_transfer.json and .md.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the original (benchmarks/common.py model names)")
    p.add_argument("--checkpoint", default="out/smollm2-care-kv0.5", help="its care-convert output")
    p.add_argument("--source", default=None, help="care-convert-lora --source (default: the checkpoint's record)")
    p.add_argument("--train", default="austen", help="domain whose .train.txt the adapter is trained on")
    p.add_argument("--other", default="python311_docs", help="second held-out domain (.test.txt)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--data", default=None)
    p.add_argument("--work", default="out/lora_transfer", help="adapters are written here")
    p.add_argument("--out", default=str(common.RESULTS / "lora_transfer"))
    return p


def domain_text(data: Path, domain: str, split: str) -> str:
    return (data / "corpus" / f"{domain}.{split}.txt").read_text(encoding="utf-8", errors="replace")


def train_adapter(model_dir: Path, text: str, out: Path, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text[: args.steps * args.batch * args.seqlen * 8], add_special_tokens=False)["input_ids"]
    need = args.steps * args.batch * args.seqlen
    if len(ids) < need:
        raise SystemExit(f"training text has {len(ids)} tokens, {need} needed")
    windows = torch.tensor(ids[:need]).view(args.steps, args.batch, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                          lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
    def lr_factor(step: int) -> float:   # 5 warm-up steps, then a cosine to 0
        return min(1.0, (step + 1) / 5) * 0.5 * (1 + math.cos(math.pi * step / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    t0, losses = time.time(), []
    pm.train()
    for s in range(args.steps):
        loss = pm(windows[s], labels=windows[s]).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
        print(f"step {s + 1}/{args.steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    pm.save_pretrained(out)
    return {"seconds": round(time.time() - t0, 1), "tokens": need, "first_loss": round(losses[0], 3),
            "last_loss": round(sum(losses[-5:]) / 5, 3)}


def evaluate(path: Path, adapter: Path | None, texts: dict[str, str], args) -> dict:
    import torch
    import model_defs  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    perplexity, _ = common.perplexity_fn()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(path)
    return {d: round(perplexity(model, tok, [t], seqlen=args.seqlen, max_tokens=args.eval_tokens)["ppl"], 3)
            for d, t in texts.items()}


def render(res: dict) -> str:
    doms = [res["settings"]["train"], res["settings"]["other"]]
    rows = [[name, *(f"{r[d]:.2f}" for d in doms)] for name, r in res["rows"].items()]
    st, tr = res["settings"], res["train"]
    title = "LoRA adapter of the original, carried to the converted model (care-convert-lora)"
    lines = [*common.report_head(res, title),
             f"Adapter: r {st['rank']}, every attention and MLP projection, trained on {tr['tokens']} tokens of "
             f"{doms[0]} ({st['steps']} steps, lr {st['lr']}; loss {tr['first_loss']} -> {tr['last_loss']}, "
             f"{tr['seconds']} s). Held-out perplexity, {st['eval_tokens']} tokens per domain in {st['seqlen']}-token "
             f"windows.",
             "", common.md_table(["model", *(f"{d} ppl" for d in doms)], rows), ""]
    if "kept" in res:
        lines.append(f"Share of the adapter's {doms[0]} gain (log perplexity) kept on the converted model: "
                     f"{res['kept']:.0%} (o_proj delta through the refit's map), {res['kept_as_is']:.0%} (as is).")
    lines.append(f"care-convert-lora: {res.get('lora_summary', {})}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import converter.lora as lora
    from converter.lora_map import Fit

    data = common.data_dir(args.data)
    model = common.model_path(args.model, data)
    ckpt = Path(args.checkpoint)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    res = {"machine": common.machine(), "command": common.command_line(), "git": common.git_rev(),
           "started": common.now_utc(), "settings": vars(args), "rows": {}}
    save = common.report_saver(res, args.out, render)
    res["train"] = train_adapter(model, domain_text(data, args.train, "train"), work / "adapter", args)
    res["lora_summary"] = lora.convert_adapter(work / "adapter", ckpt, work / "adapter_care", source=args.source)
    res["lora_summary"].pop("approximate")
    real = lora.solve_input_side
    lora.solve_input_side = lambda t, s: (Fit(torch.eye(s.shape[1], dtype=torch.float64), 0.0), True)
    try:
        lora.convert_adapter(work / "adapter", ckpt, work / "adapter_care_as_is", source=args.source)
    finally:
        lora.solve_input_side = real
    texts = {d: domain_text(data, d, "test") for d in (args.train, args.other)}
    rewritten, as_is = "converted + care-convert-lora adapter", "converted + adapter, o_proj delta as is (ablation)"
    for name, path, adapter in (("original", model, None), ("original + adapter", model, work / "adapter"),
                                ("converted", ckpt, None), (rewritten, ckpt, work / "adapter_care"),
                                (as_is, ckpt, work / "adapter_care_as_is")):
        res["rows"][name] = evaluate(path, adapter, texts, args)
        print(name, res["rows"][name], file=sys.stderr, flush=True)
        save()
    r, d = res["rows"], args.train
    gain = math.log(r["original"][d]) - math.log(r["original + adapter"][d])
    res["kept"] = (math.log(r["converted"][d]) - math.log(r[rewritten][d])) / gain
    res["kept_as_is"] = (math.log(r["converted"][d]) - math.log(r[as_is][d])) / gain
    save()
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
