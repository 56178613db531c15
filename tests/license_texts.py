"""Calibration and held-out text for the quality tests: license texts every Debian system ships, two
for calibration and two others as held-out text (different documents, same register)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

LICENSES = Path("/usr/share/common-licenses")
CALIB = [LICENSES / "GPL-3", LICENSES / "LGPL-2.1"]
HELD_OUT = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0"]


def require_license_texts() -> None:
    """Skip, naming the missing file, where the system lacks one (CI's Debian image has them all)."""
    for f in CALIB + HELD_OUT:
        if not f.is_file():
            pytest.skip(f"missing {f}")


def held_out_kl(original, converted, tokenizer) -> float:
    """Mean KL(original || converted) of the next-token distributions over 8 held-out windows of 256
    tokens: how far a conversion moved the model, on text it was not calibrated on."""
    from converter import calib_data

    windows = calib_data.token_windows(tokenizer, calib_data.read_texts(HELD_OUT), 8, 256, 7)
    with torch.no_grad():
        p = torch.log_softmax(original(windows).logits.double(), -1)
        q = torch.log_softmax(converted(windows).logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
