"""Start/stop `vllm serve` as a subprocess for the tests: a thin layer over
care_vllm.loadtest.server.VllmServer (the one launcher; see its docstring for why it stops the whole
process group, SIGTERM then SIGKILL, on `stop()` / context exit / interpreter exit).

`VLLMServer(model, *extra_args)` picks a free port on 127.0.0.1, starts the venv's `vllm serve` (the
care_vllm plugin loaded through its `vllm.general_plugins` entry point) from the repo root with the
repo first on PYTHONPATH (whatever the editable install recorded, the tests serve this checkout),
offline, without usage stats and with long HTTP keep-alive, waits for /health with a bounded timeout,
and keeps the log in a file (default: beside the model folder). `kv_cache_tokens()` is the capacity
vLLM logs.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from care_vllm.loadtest.server import ServerError, VllmServer, free_port

__all__ = ["ROOT", "ServerError", "VLLMServer", "assert_tp_ranks_cache_full_widths", "free_port", "one_core_per_rank",
           "running_in_group", "worker_kv_shapes"]

ROOT = Path(__file__).resolve().parents[1]


class VLLMServer(VllmServer):
    def __init__(self, model: str | Path, *args: str, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, **options):
        super().__init__(model, log_path, args, startup_timeout=400.0, cwd=ROOT, stop_grace=20.0, **options,
                         env={"TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                              # idle keep-alive connections outlive the clients' own 5 s expiry: uvicorn's default
                              # (also 5 s) could close one just as a client reused it ("Server disconnected
                              # without sending a response", seen under TP's slower steps)
                              "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "120",
                              "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                                            if p),
                              **(env or {})})

    def kv_cache_tokens(self) -> int:
        """The token capacity vLLM reports when it allocates the KV cache ("KV cache size: N tokens")."""
        return self.kv_cache_tokens_from_log()


def worker_kv_shapes(log: str, kind: str | None) -> dict[int, dict[int, tuple[int, ...]]]:
    """{rank: {layer: KV tensor shape}} from the line care_vllm logs as each layer's cache is bound, in the
    workers of a `--tensor-parallel-size` (kind "TP") or `--pipeline-parallel-size` (kind "PP") server; kind None:
    {worker pid: ...} for workers that log no rank (each engine of `--data-parallel-size` is rank 0 of its own)."""
    worker = r"Worker pid=(\d+)" if kind is None else rf"Worker_{kind}(\d) pid=\d+"
    line = re.compile(rf"\({worker}\).*care_mla KV cache model\.layers\.(\d+)\.self_attn\.attn: "
                      r"shape \(([\d, ]+)\)")
    shapes: dict[int, dict[int, tuple[int, ...]]] = {}
    for m in line.finditer(log):
        shapes.setdefault(int(m.group(1)), {})[int(m.group(2))] = tuple(int(x) for x in m.group(3).split(","))
    return shapes


def assert_tp_ranks_cache_full_widths(log: str, cfg: dict) -> None:
    """Both workers of a `--tensor-parallel-size 2` server bound every layer's KV tensor at that layer's whole width,
    r_K + r_V + d_r from the checkpoint's config.json (`cfg`): TP splits the heads, never the latent, which every
    rank caches."""
    widths = [k + v + cfg["qk_rope_head_dim"] for k, v in zip(cfg["k_ranks"], cfg["v_ranks"])]
    bound = worker_kv_shapes(log, "TP")
    assert sorted(bound) == [0, 1], f"both TP workers must report their KV tensors, got ranks {sorted(bound)}"
    for rank, layers in bound.items():
        assert [layers[l][-1] for l in range(len(widths))] == widths, f"rank {rank}: {layers} != {widths}"


def running_in_group(pgid: int) -> list[str]:
    """`ps` lines of the processes of group `pgid` that still run (zombies, which hold nothing, left out): read with
    ps, not with the psutil scan VllmServer.stop() waits with."""
    ps = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,comm="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if line.split()[1] == str(pgid) and not line.split()[2].startswith("Z")]


def one_core_per_rank() -> dict[str, str]:
    """The environment of a two-rank (`--tensor-parallel-size 2` / `--pipeline-parallel-size 2`) or two-engine
    (`--data-parallel-size 2`) CPU server: vLLM's CPU workers pin their OpenMP threads and by default also reserve a
    core for the front end, which leaves nothing for a second rank on a 2-core machine: one core per rank."""
    cpus = sorted(os.sched_getaffinity(0))
    first, second = cpus[0], cpus[1 % len(cpus)]
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{first}|{second}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
