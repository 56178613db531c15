"""Shared pytest setup: the repo root on sys.path (tests import `tests.*` helpers), offline hubs,
and the synthetic calibration text the tiny-model conversions use."""
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CALIB_WORDS = ("the model cache attention key value rope layer latent rank token query head of and to in a "
               "is that for it as was with be by on not this are or from once upon time village sea").split()


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """6000 words drawn (seed 0) from a small vocabulary: enough tokens for calib_samples x calib_seqlen
    windows of the tiny models, deterministic so that conversions (and their ranks) are reproducible."""
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join(rng.choice(CALIB_WORDS) for _ in range(6000)))
    return p
