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


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_dir(tmp_path_factory):
    """GGUF sources are dequantized into a cache (converter/gguf_cache.py): the tests' goes to a temporary
    folder, not the user's ~/.cache (tests that check the cache itself set their own)."""
    path = tmp_path_factory.mktemp("care_vllm_cache")
    old = os.environ.get("CARE_VLLM_CACHE")
    os.environ["CARE_VLLM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CARE_VLLM_CACHE", None)
    else:
        os.environ["CARE_VLLM_CACHE"] = old


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """6000 words drawn (seed 0) from a small vocabulary: enough tokens for calib_samples x calib_seqlen
    windows of the tiny models, deterministic so that conversions (and their ranks) are reproducible."""
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(" ".join(rng.choice(CALIB_WORDS) for _ in range(6000)))
    return p
