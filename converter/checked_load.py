"""Load a checkpoint folder with transformers, refusing what transformers only logs.

Why: `from_pretrained` fills a parameter the files do not hold (a missing tensor, one under a name it does not
map, one of another shape with ignore_mismatched_sizes) with random values and only logs it. care-eval then
reported a perplexity and a KL for a partly random model with exit 0, and care-heal would have trained one. A
file it cannot read at all (truncated, a wrong shape) raises whatever its reader raises (SafetensorError,
RuntimeError); both become one line naming the checkpoint, for the tools' exit 2.
"""
from __future__ import annotations

from pathlib import Path

from .errors import first_line


def missing_parameters(info: dict) -> list[str]:
    """The parameters `from_pretrained(..., output_loading_info=True)` left at their initial values: missing from
    the files, or stored with another shape."""
    return sorted(map(str, info.get("missing_keys") or ())) + sorted(map(str, info.get("mismatched_keys") or ()))


def listed(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more."""
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return f"{', '.join(names[:shown])}{more}"


def load_causal_lm(folder: str | Path, what: str, error: type[Exception], **kwargs):
    """AutoModelForCausalLM.from_pretrained(folder, **kwargs), every parameter read from its files; anything else
    raises `error` with one line naming `what` (e.g. "the converted model OUT")."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    except Exception as e:   # noqa: BLE001  (a truncated or mis-shaped file: its reader's own exception types)
        raise error(f"cannot load {what}: {first_line(e)}") from None
    missing = missing_parameters(info)
    if missing:
        raise error(f"cannot load {what}: no tensor in its files for {listed(missing)} (transformers would have "
                    f"filled them with random values)")
    return model
