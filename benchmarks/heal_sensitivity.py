"""How far one AdamW-sized step moves a converted checkpoint from its original, tensor family by tensor family.

AdamW's first updates move every entry by about lr (m / sqrt(v) is ~ the gradient's sign), whatever the entry's
own size. A family whose entries are tiny next to lr (kv_a_proj's latent rows, in checkpoints whose factors split
their scale badly: benchmarks/results/heal_latent_balance/) is wrecked by one update. This applies a step of
lr * sign(gradient of care-heal's loss) to one family at a time and prints the KL to the original on held-out
windows before and after, then the same for all families at once.

    python benchmarks/heal_sensitivity.py CONVERTED --teacher ORIGINAL --text chat.train.jsonl [--lr 2e-5]
        [--balance] [--json out.json]

--balance first applies care-heal's balance_latents (converter/heal.py), as care-heal does before training.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted")
    p.add_argument("--teacher", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--balance", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model_defs  # noqa: F401  (registers care_mla)
    from converter.heal import balance_latents, heal_losses
    from converter.heal_data import pack_windows, read_docs
    from converter.load import load_source

    windows = pack_windows(AutoTokenizer.from_pretrained(args.converted), read_docs([args.text], "--text"),
                           args.seqlen)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    train = [windows[order[i:i + 2]].long() for i in (0, 2)]          # one update: 2 micro-batches of 2
    held = windows[order[100:104]].long()
    teacher = load_source(args.teacher, None, role="teacher").model.float().eval()
    student = AutoModelForCausalLM.from_pretrained(args.converted, dtype=torch.float32).train()
    if args.balance:
        balance_latents(student)

    def losses() -> dict:
        with torch.no_grad():
            ce, kd = heal_losses(student(input_ids=held).logits, teacher(input_ids=held).logits, held, 1.0)
        return {"ce": ce.item(), "kl": kd.item()}

    rows = {"(none)": losses()}
    for x in train:
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        ce, kd = heal_losses(student(input_ids=x).logits, t, x, 1.0)
        ((ce + kd) / len(train)).backward()
    params = dict(student.named_parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0).item()
    families: dict[str, list[str]] = {}
    for name in params:
        families.setdefault(name.split(".")[-2] if ".layers." in name else name, []).append(name)
    families["(all)"] = list(params)
    saved = {n: q.detach().clone() for n, q in params.items()}
    for family, names in sorted(families.items()):
        with torch.no_grad():
            for n in names:
                if params[n].grad is not None:
                    params[n].sub_(args.lr * torch.sign(params[n].grad))
        rows[family] = losses()
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])

    print(f"{args.converted}: one sign step of lr {args.lr} per tensor family (clipped gradient norm {grad_norm:.4g})")
    print("| family | held-out CE | KL to the original |\n|---|---|---|")
    for family, r in rows.items():
        print(f"| {family} | {r['ce']:.4f} | {r['kl']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "grad_norm": grad_norm, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
