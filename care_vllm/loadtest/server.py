"""Start and stop a real `vllm serve` subprocess on loopback, and read facts from its /metrics.

Why a context manager: a benchmark must never leave a server running (SIGTERM, then SIGKILL after
a grace period), and must fail with the server's own log tail when it does not come up.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` CLI of the running interpreter's environment."""
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.read().decode()


def scrape_metrics(base_url: str) -> dict[str, float | dict]:
    """Prometheus text -> {sample name: value}; `vllm:cache_config_info` keeps its labels."""
    out: dict[str, float | dict] = {}
    for fam in text_string_to_metric_families(fetch(f"{base_url}/metrics")):
        for s in fam.samples:
            if s.name == "vllm:cache_config_info":
                out[s.name] = dict(s.labels)
            elif not s.labels or set(s.labels) <= {"engine", "model_name"}:
                out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def kv_cache_tokens(base_url: str) -> int | None:
    """Tokens the engine's KV cache holds: num_gpu_blocks x block_size from cache_config_info."""
    info = scrape_metrics(base_url).get("vllm:cache_config_info")
    if not isinstance(info, dict):
        return None
    try:
        return int(info["num_gpu_blocks"]) * int(info["block_size"])
    except (KeyError, ValueError):
        return None


class VllmServer:
    """`with VllmServer(model, log, extra_args) as srv:` -> srv.base_url ("http://127.0.0.1:PORT")."""

    def __init__(self, model: str | Path, log_path: Path, extra_args: list[str] | None = None,
                 served_name: str | None = None, startup_timeout: float = 600.0, env: dict | None = None):
        self.model, self.log_path = str(model), Path(log_path)
        self.served_name = served_name or Path(self.model).name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = [*vllm_command(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                     "--served-model-name", self.served_name, *(extra_args or [])]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VllmServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"vllm serve {self.model} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                fetch(f"{self.base_url}/health", timeout=2)
                return self
            except OSError:
                time.sleep(1.0)
        self._stop()
        raise TimeoutError(f"vllm serve {self.model} not ready after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"
