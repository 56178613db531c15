"""Calibration and held-out text for the quality tests: license texts every Debian system ships, two
for calibration and two others as held-out text (different documents, same register)."""
from __future__ import annotations

from pathlib import Path

import pytest

LICENSES = Path("/usr/share/common-licenses")
CALIB = [LICENSES / "GPL-3", LICENSES / "LGPL-2.1"]
HELD_OUT = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0"]


def require_license_texts() -> None:
    """Skip, naming the missing file, where the system lacks one (CI's Debian image has them all)."""
    for f in CALIB + HELD_OUT:
        if not f.is_file():
            pytest.skip(f"missing {f}")
