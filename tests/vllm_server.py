"""Start/stop `vllm serve` as a subprocess for the tests.

`VLLMServer(model, *extra_args)` picks a free port on 127.0.0.1, starts `vllm serve` (the venv's
entry point, i.e. with the care_vllm plugin loaded through its `vllm.general_plugins` entry point),
waits for /health with a bounded timeout, keeps the log in a file, and stops the whole process
group with SIGTERM (SIGKILL after a grace period) on `stop()` / context exit / interpreter exit.
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_BIN = Path(sys.executable).with_name("vllm")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


class VLLMServer:
    def __init__(self, model: str | Path, *args: str, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None):
        self.model = str(model)
        self.args = list(args)
        self.port = free_port()
        self.log_path = Path(log_path) if log_path else Path(self.model).with_name(
            Path(self.model).name + f".serve.{self.port}.log")
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    # the repo's packages first, whatever the editable install recorded
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VLLMServer":
        cmd = [str(VLLM_BIN), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=str(ROOT))
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float = 400.0) -> "VLLMServer":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve {self.model} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vllm serve {self.model} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def kv_cache_tokens(self) -> int:
        """The token capacity vLLM reports when it allocates the KV cache ("KV cache size: N tokens")."""
        m = re.findall(r"KV cache size: ([\d,]+) tokens", self.log_text())
        if not m:
            raise ServerError(f"no 'KV cache size' line in the log of {self.model}")
        return int(m[-1].replace(",", ""))

    def kv_layer_shapes(self) -> dict[int, tuple[int, ...]]:
        """{layer index: KV tensor shape} from the lines care_vllm logs as the engine binds each layer's cache."""
        return {int(m.group(1)): tuple(int(x) for x in m.group(2).split(",") if x.strip())
                for m in re.finditer(r"care_mla KV cache model\.layers\.(\d+)\.self_attn\.attn: shape \(([\d, ]+)\)",
                                     self.log_text())}

    def stop(self, grace: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VLLMServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
