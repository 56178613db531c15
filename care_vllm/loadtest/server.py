"""Start and stop a real `vllm serve` subprocess on loopback, and read facts from its log and /metrics.

The one launcher of `vllm serve` in this repo: `care-bench` (this package), the tests
(tests/vllm_server.py, a thin layer that adds the repo root to PYTHONPATH and the offline
variables) and benchmarks/serve_cpu.py all start their servers through `VllmServer`.

Why a context manager (and `stop()` on every path): a benchmark or a test must never leave a server
running. The server runs in its own process group (vLLM forks an engine core and workers), stopped
with SIGTERM, then SIGKILL after a grace period; `stop()` is also registered with atexit for callers
that use start()/stop() by hand (module-scoped fixtures) and die in between. A server that exits or
does not come up fails with the server's own log tail, so the reason is in the error. A stopped server's
sockets, file store and shared memory, which vLLM leaves, are removed (leftovers.py).
"""
from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from prometheus_client.parser import text_string_to_metric_families

from care_vllm.loadtest.leftovers import ipc_folder, remove_leftovers

# vLLM's capacity line, logged once when the engine allocates the KV cache, e.g.
# "CPU KV cache size: 11,648 tokens, Maximum concurrency for 2,048 tokens per request: 5.69x".
KV_LINE = re.compile(r"(?:(\w+(?: \+ host)?) )?KV cache size: ([\d,]+) tokens"
                     r"(?:, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x)?")
# The line care_vllm logs as the engine binds each layer's KV tensor (care_vllm/models.py): its shape
# and, since the key/value split decode, the layer's decode form ("key/value split 25+38", "joint latent"),
# and since 2026-12-04 its MLA prefill backend ("CARE_CPU_MLA_PREFILL"; older logs lack it).
CARE_KV_LAYER = re.compile(r"care_mla KV cache model\.layers\.(\d+)\.self_attn\.attn: shape \(([\d, ]+)\)"
                           r"(?:.*?, decode ([^,\n]+))?(?:, prefill (\w+))?")


class ServerError(RuntimeError):
    """`vllm serve` exited during start-up, or its log lacks what was asked of it."""


class ServerTimeout(ServerError, TimeoutError):
    """`vllm serve` did not answer /health within the start-up timeout."""


# Ports for `vllm serve` come from below the kernel's ephemeral range (32768-60999 by default). A port the
# kernel hands out for `bind(0)` stays free only until someone else binds it, and every vLLM process binds
# such ports itself (engine-core ZMQ sockets, torch.distributed's master port): a second server starting
# beside the first took the port the first had picked ("[Errno 98] Address already in use"). 29500-29599
# (torch.distributed's and vLLM's data-parallel defaults) stay out of the range too.
SERVE_PORTS = range(20000, 29000)
PORT_IN_USE = "Address already in use"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(tries: int = 64) -> int:
    """A port on 127.0.0.1 that is free now, drawn at random from SERVE_PORTS (outside the range the
    kernel gives out to other processes' `bind(0)`); the kernel's choice if none of `tries` is free."""
    rng = random.SystemRandom()
    for _ in range(tries):
        port = rng.choice(SERVE_PORTS)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` CLI of the running interpreter's environment (the venv's entry point, so the
    care_vllm plugin is loaded through its `vllm.general_plugins` entry point)."""
    exe = Path(sys.executable).with_name("vllm")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vllm")
    # no console script (e.g. vLLM unpacked onto PYTHONPATH): the module behind it
    return [found] if found else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def fetch(url: str, body: dict | None = None, timeout: float = 5.0) -> str:
    """GET `url`, or POST `body` as JSON; the response text."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.read().decode()


def reset_prefix_cache(base_url: str, attempts: int = 5, timeout: float = 30.0) -> bool | None:
    """Empty the server's prefix cache (vLLM's `POST /reset_prefix_cache`, which `vllm serve` offers with
    VLLM_SERVER_DEV_MODE=1). Why: load levels run one after the other with the same prompts (the same
    seed), so without it every level after the first reads its prompts from the cache the previous one
    filled, and how much it finds depends on the block size (vLLM on CPU: 128 tokens for GQA, 16 for MLA;
    a 256-token prompt found 50 % vs 94 %), not on the model. True: emptied; None: the server has no such
    endpoint; False: it kept refusing (blocks still held by requests) `attempts` times."""
    for _ in range(attempts):
        req = urllib.request.Request(f"{base_url}/reset_prefix_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (loopback only)
                if json.loads(r.read().decode() or "{}").get("success", True):
                    return True
        except urllib.error.HTTPError as e:
            if e.code in (404, 405):
                return None
            raise
        time.sleep(1.0)
    return False


def scrape_metrics(base_url: str, timeout: float = 5.0) -> dict[str, float | dict]:
    """Prometheus text -> {sample name: value}; `vllm:cache_config_info` keeps its labels."""
    out: dict[str, float | dict] = {}
    for fam in text_string_to_metric_families(fetch(f"{base_url}/metrics", timeout=timeout)):
        for s in fam.samples:
            if s.name == "vllm:cache_config_info":
                out[s.name] = dict(s.labels)
            elif not s.labels or set(s.labels) <= {"engine", "model_name"}:
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def scrape_metric_by(base_url: str, name: str, label: str, timeout: float = 5.0) -> dict[str, float]:
    """One /metrics sample summed per value of one label, e.g. ("vllm:request_success_total", "engine") ->
    {"0": requests engine 0 finished, "1": ...} (scrape_metrics sums the engines together)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(fetch(f"{base_url}/metrics", timeout=timeout)):
        for s in fam.samples:
            if s.name == name:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + float(s.value)
    return out


def prefix_cache_counters(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """Prompt tokens looked up in the prefix cache and those found there so far (vLLM's
    `vllm:prefix_cache_{queries,hits}_total` counters): take the difference around a workload."""
    m = scrape_metrics(base_url, timeout)
    return {key: float(m.get(f"vllm:prefix_cache_{key}_total", 0.0)) for key in ("queries", "hits")}


def prefix_cache_use(before: dict[str, float], after: dict[str, float]) -> dict:
    """The prefix-cache lookups between two `prefix_cache_counters` readings: prompt tokens queried,
    tokens found, and their ratio (None when nothing was looked up, e.g. prefix caching off)."""
    queried, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queried_tokens": queried, "hit_tokens": hits, "hit_rate": hits / queried if queried else None}


def spec_decode_counters(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """Speculative decoding so far (vLLM's `vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total`;
    zeros without --speculative-config): take the difference around a workload."""
    m = scrape_metrics(base_url, timeout)
    return {key: float(m.get(f"vllm:spec_decode_num_{key}_total", 0.0))
            for key in ("drafts", "draft_tokens", "accepted_tokens")}


def spec_decode_use(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """Between two `spec_decode_counters` readings: drafts, drafted and accepted tokens, the
    acceptance rate and the mean accepted tokens per draft (None when nothing was drafted)."""
    d = {k: after[k] - before[k] for k in before}
    if not d["draft_tokens"]:
        return None
    return {**d, "acceptance_rate": d["accepted_tokens"] / d["draft_tokens"],
            "accepted_per_draft": d["accepted_tokens"] / d["drafts"] if d["drafts"] else None}


def cache_config_info(base_url: str, timeout: float = 5.0) -> dict[str, str] | None:
    """The labels of /metrics `vllm:cache_config_info` (num_gpu_blocks, block_size, cache_dtype, ...)."""
    info = scrape_metrics(base_url, timeout).get("vllm:cache_config_info")
    return info if isinstance(info, dict) else None


def kv_cache_tokens(base_url: str, timeout: float = 5.0) -> int | None:
    """Tokens the engine's KV cache holds: num_gpu_blocks x block_size from cache_config_info."""
    info = cache_config_info(base_url, timeout)
    if info is None:
        return None
    try:
        return int(info["num_gpu_blocks"]) * int(info["block_size"])
    except (KeyError, ValueError):
        return None


RESOURCE_TRACKER = "multiprocessing.resource_tracker"   # (in its command line: `-c from ... import main;main(fd)`)


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group `pid` leads; a group that is already gone is fine."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int):
    """The processes of group `pgid` that still run, as psutil.Process (a zombie waiting to be reaped does not count:
    it holds no memory, port or device)."""
    import psutil   # (a dependency of vLLM's; the extras name it too)

    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                yield proc
        except (OSError, psutil.Error):   # (gone since the listing)
            continue


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (group_members)."""
    return next(group_members(pgid), None) is not None


def wait_group_gone(pgid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for every process of group `pgid` to end; whether they did."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def end_group(pgid: int, wait: float) -> None:
    """Let the processes of group `pgid` end for up to `wait` s, then SIGKILL what is left and wait for that (30 s
    at most): whoever returns from this finds their memory, ports and device free.

    Python's multiprocessing resource tracker is spared the first SIGKILL: it ignores SIGTERM, ends by itself once
    the processes it serves are gone, and as it ends unlinks the shared memory they left. vLLM 0.32 leaves two
    segments (its engine's message queues, 240 and 160 MiB in size) and a semaphore in /dev/shm for it when its
    engine core dies while it starts; killed with the rest, the tracker left them there until reboot (measured on
    CPU: a server stopped while it started; the 12 such segments found on this machine held 404 KiB of RAM, the
    pages written, and 2.4 GB of apparent size)."""
    if wait_group_gone(pgid, wait):
        return
    kill_group_but_trackers(pgid)
    if not wait_group_gone(pgid, 10):
        signal_group(pgid, signal.SIGKILL)
        wait_group_gone(pgid, 30)


def kill_group_but_trackers(pgid: int) -> None:
    """SIGKILL every process of group `pgid` but multiprocessing's resource trackers (see end_group)."""
    import psutil

    for proc in group_members(pgid):
        try:
            if RESOURCE_TRACKER not in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
        except (OSError, psutil.Error):   # (gone since the listing)
            continue


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """Stop the process group `proc` leads (started with start_new_session): SIGTERM to the group, then end_group
    with what is left of `grace` once `proc` itself has ended, then reap `proc`. VllmServer.stop() and the GPU
    runbook's interrupted runs (benchmarks/gpu/perf.py run_logged) stop their groups this way."""
    deadline = time.monotonic() + grace
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    end_group(proc.pid, max(0.0, deadline - time.monotonic()))
    proc.wait(timeout=30)   # (reap it: killed, it is a zombie the group scan no longer counts)


def parse_kv_line(text: str) -> dict | None:
    """The last KV-capacity line of a vLLM log: {tokens, pool, max_model_len, max_concurrency, line}."""
    m = None
    for m in KV_LINE.finditer(text):
        pass
    if m is None:
        return None
    return {"tokens": int(m.group(2).replace(",", "")), "pool": m.group(1),
            "max_model_len": int(m.group(3).replace(",", "")) if m.group(3) else None,
            "max_concurrency": float(m.group(4)) if m.group(4) else None, "line": m.group(0)}


class VllmServer:
    """`with VllmServer(model, log, extra_args) as srv:` -> srv.base_url ("http://127.0.0.1:PORT").

    Or by hand: `srv.start()` ... `srv.wait_ready()` ... `srv.stop()` (start two, wait for each).
    `args` is the full command line (recorded by the benchmarks); `extra_args` go after
    `vllm serve MODEL --host --port [--served-model-name]`. `served_name=None` leaves vLLM's default
    (the model path). `env` is added to os.environ (with HF_HUB_OFFLINE=1), `cwd` is the server's
    working directory, `prefix` wraps the command (e.g. ["nice"]). `port=None` draws a free one (free_port);
    a port found taken when vLLM binds it is replaced by a fresh one, up to `port_retries` times (wait_ready).
    `stop_grace` is how long stop() lets a server that has answered end on SIGTERM before SIGKILL;
    `starting_stop_grace` is that time for one that never answered (see stop()).
    """

    def __init__(self, model: str | Path, log_path: str | Path | None = None, extra_args: Sequence[str] = (),
                 served_name: str | None = None, startup_timeout: float = 600.0, env: dict | None = None,
                 cwd: str | Path | None = None, prefix: Sequence[str] = (), poll_interval: float = 1.0,
                 stop_grace: float = 30.0, port_retries: int = 3, port: int | None = None,
                 starting_stop_grace: float = 5.0):
        self.model = str(model)
        self.served_name = served_name
        self.extra_args = list(extra_args)
        self.prefix = list(prefix)
        self._use_port(free_port() if port is None else port)
        # default: beside the model folder, one file per port (several servers of one model may run)
        self.log_path = Path(log_path) if log_path else Path(self.model).with_name(
            Path(self.model).name + f".serve.{self.port}.log")
        self.port_retries = port_retries
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.starting_stop_grace = starting_stop_grace
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.cwd = str(cwd) if cwd is not None else None
        self.proc: subprocess.Popen | None = None
        self.ipc: Path | None = None   # this server's VLLM_RPC_BASE_PATH while it runs (leftovers.py)
        self.startup_seconds: float | None = None
        self._log = None
        self._t0 = 0.0

    def _use_port(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.args = [*self.prefix, *vllm_command(), "serve", self.model, "--host", "127.0.0.1", "--port", str(port),
                     *(["--served-model-name", self.served_name] if self.served_name else []), *self.extra_args]

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, append: bool = False) -> "VllmServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab" if append else "wb")
        self._t0 = time.monotonic()
        self.startup_seconds = None   # (until /health answers: stop() then uses starting_stop_grace)
        env = self.env
        if "VLLM_RPC_BASE_PATH" not in env:   # (one the caller chose is theirs to clean)
            self.ipc = ipc_folder()
            env = {**env, "VLLM_RPC_BASE_PATH": str(self.ipc)}
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.cwd, start_new_session=True)
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float | None = None) -> "VllmServer":
        """Poll /health until it answers; on exit or timeout stop the group and raise with the log tail.

        A server that exits because its port was taken between `free_port()` and its own bind (another
        process's `bind(0)` got it) is restarted on a fresh port, up to `port_retries` times: `port`,
        `base_url` and `args` then name the port it serves on, and the log keeps both attempts. Each attempt
        gets the whole `timeout`, so the seconds a failed attempt took do not shorten the next one's wait."""
        if self.proc is None:
            raise ServerError(f"vllm serve {self.model}: wait_ready() before start()")
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                if self.port_retries > 0 and PORT_IN_USE in self.log_tail(20):
                    self._restart_on_a_fresh_port()
                    deadline = time.monotonic() + timeout
                    continue
                raise ServerError(f"vllm serve {self.model} exited with {rc}:\n{self.log_tail()}")
            try:
                fetch(f"{self.base_url}/health", timeout=2)
                self.startup_seconds = round(time.monotonic() - self._t0, 1)
                return self
            except OSError:
                time.sleep(self.poll_interval)
        self.stop()
        raise ServerTimeout(f"vllm serve {self.model} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _restart_on_a_fresh_port(self) -> None:
        """Start the stopped server again on a newly drawn port, saying why in its log (appended to)."""
        self.port_retries -= 1
        taken = self.port
        self._use_port(free_port())
        with open(self.log_path, "a") as log:
            log.write(f"care_vllm: port {taken} was taken before vllm serve bound it; restarting on port {self.port}\n")
        self.start(append=True)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` s; idempotent. Returns once every process of the
        group has ended, not just `vllm serve`: its workers outlive it by a second or more (measured on CPU), and
        until they end they hold the model's memory, on a GPU the device's, which the next server or benchmark
        would find taken. The group is signalled even when `vllm serve` itself already exited: its engine-core
        child may still hold the port. Then the sockets, file stores and shared memory vLLM leaves are removed
        (leftovers.py).

        A server that never answered /health gets `starting_stop_grace` (5 s) where that is the shorter. While
        vLLM 0.32's front end waits for its engine core's ready message, it sits in a ZMQ poll of up to
        VLLM_ENGINE_READY_TIMEOUT_S (600 s) that SIGTERM does not end: the engine core ends at once, so no message
        comes, and the front end's handler runs only when the poll times out (measured on CPU, SIGTERM 9 s into a
        start: with that timeout at 40 s, it exited 41.9 s later; stop() with the 30 s grace took 30.1 s). A server
        that is not up has no request to finish, and SIGKILL frees what it holds."""
        proc, self.proc = self.proc, None
        if grace is None:
            grace = self.stop_grace if self.startup_seconds is not None else min(self.stop_grace,
                                                                                  self.starting_stop_grace)
        if proc is not None and proc.poll() is not None:
            end_group(proc.pid, 0)   # leftover children of a dead server
        elif proc is not None:
            stop_group(proc, grace)
        if self._log is not None:
            self._log.close()
            self._log = None
            remove_leftovers(self.ipc, self.log_text())
            self.ipc = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:   # Ctrl-C or SIGTERM while it starts: __exit__ will not run
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the server says -----------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:]) or "(no log)"

    def kv_cache_log(self) -> dict | None:
        """vLLM's KV-capacity line from the log (see parse_kv_line), None before the cache exists."""
        return parse_kv_line(self.log_text())

    def kv_cache_tokens_from_log(self) -> int:
        """The token capacity vLLM reports when it allocates the KV cache ("KV cache size: N tokens")."""
        kv = self.kv_cache_log()
        if kv is None:
            raise ServerError(f"no 'KV cache size' line in the log of {self.model}")
        return kv["tokens"]

    def kv_cache_tokens_from_metrics(self) -> int | None:
        """num_gpu_blocks x block_size from /metrics (None where the server does not export it)."""
        return kv_cache_tokens(self.base_url)

    def kv_layer_shapes(self) -> dict[int, tuple[int, ...]]:
        """{layer index: KV tensor shape} from the lines care_vllm logs as the engine binds each layer's cache."""
        return {int(m.group(1)): tuple(int(x) for x in m.group(2).split(",") if x.strip())
                for m in CARE_KV_LAYER.finditer(self.log_text())}

    def kv_layer_decode_forms(self) -> dict[int, str]:
        """{layer index: the decode form care_vllm logged for it ("key/value split 5+9" or "joint latent")}."""
        return {int(m.group(1)): m.group(3).strip() for m in CARE_KV_LAYER.finditer(self.log_text()) if m.group(3)}

    def kv_layer_prefill_backends(self) -> dict[int, str]:
        """{layer index: the MLA prefill backend care_vllm logged for it (e.g. "CARE_CPU_MLA_PREFILL")}."""
        return {int(m.group(1)): m.group(4) for m in CARE_KV_LAYER.finditer(self.log_text()) if m.group(4)}
