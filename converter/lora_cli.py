"""`care-convert-lora ADAPTER CHECKPOINT OUT`: front end of converter.lora.convert_adapter.

Bad input exits with code 2 and one line naming the problem, with nothing written at OUT; what needs no model
(converter/lora_checks.py) is refused before torch is imported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import run_tool
from .interrupts import stops_cleanly
from .lora_checks import check_request
from .versions import add_version_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="care-convert-lora",
        description="Rewrite a PEFT LoRA adapter of the source model for its care-convert checkpoint, to serve "
                    "with `vllm serve CHECKPOINT --enable-lora --lora-modules NAME=OUT`.")
    p.add_argument("adapter", help="PEFT LoRA adapter folder of the source model (adapter_config.json, "
                                   "adapter_model.safetensors)")
    p.add_argument("checkpoint", help="the converted checkpoint (care-convert's OUT)")
    p.add_argument("out", help="output adapter folder (must not exist unless --overwrite)")
    p.add_argument("--source", default=None,
                   help="the source model care-convert was given (default: the one care_report.json records)")
    p.add_argument("--revision", default=None, help="Hub revision when --source is a repo id")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_version_flag(p)
    return p


@stops_cleanly("care-convert-lora")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, code = run_tool("care-convert-lora", lambda: check_request(Path(args.adapter), Path(args.checkpoint),
                                                                  Path(args.out), args.source, args.revision,
                                                                  args.overwrite))
    if code:
        return code
    from .lora import convert_adapter   # torch, transformers: ~5 s

    summary, code = run_tool("care-convert-lora", lambda: convert_adapter(
        args.adapter, args.checkpoint, args.out, source=args.source, revision=args.revision,
        overwrite=args.overwrite))
    if code:
        return code
    print(json.dumps({"out": args.out, **summary}, indent=2))
    print(f"serve it: vllm serve {args.checkpoint} --enable-lora --max-lora-rank {summary['vllm_max_lora_rank']} "
          f"--lora-modules NAME={args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
