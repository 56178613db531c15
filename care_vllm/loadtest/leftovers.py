"""What a stopped `vllm serve` leaves behind, and how VllmServer removes it.

Why: vLLM 0.32 does not remove its own rendezvous files when it stops, whether by SIGTERM to its group (how
VllmServer stops it), SIGTERM to the front end alone or Ctrl-C. Measured on CPU: every server left about seven ZMQ
IPC sockets (uuid-named, in VLLM_RPC_BASE_PATH, by default the temp folder) and the torch.distributed file store
`vllm_dist_<32 hex>` in the temp folder; a `--tensor-parallel-size 2` or `--pipeline-parallel-size 2` server on
CPU also left two 4 MiB shared-memory segments, `/dev/shm/vllm_dist_<hex>-tp:0-[0-1]-cpushm_<rank>`, which hold
memory until reboot. A day of test runs had left 7,000 sockets, 900 file stores and 300 MB of /dev/shm.

The sockets go to a private folder (`ipc_folder`, passed as VLLM_RPC_BASE_PATH) that is deleted at stop. The file
store's path is not chosen by the caller (vLLM draws it under tempfile.gettempdir(); redirecting TMPDIR would also
move torch inductor's global precompiled headers, 150 MB each, out of their shared cache), but every worker logs it
("distributed_init_method=file://..."), and the CPU worker names its shared-memory segments after its file name
(VLLM_DIST_IDENT): `remove_leftovers` deletes exactly the ones the server's own log names. A log without that line
(a quieter VLLM_LOGGING_LEVEL) leaves them, as before.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

SHM = Path("/dev/shm")
FILE_STORE = re.compile(r"distributed_init_method=file://(/\S*?/(vllm_dist_[0-9a-f]{32}))(?![0-9a-f])")


def ipc_folder() -> Path:
    """A new, empty folder for one server's IPC sockets, in the temp folder (short: a socket path is at most 107
    bytes)."""
    return Path(tempfile.mkdtemp(prefix="care-vllm-ipc-"))


def file_stores(log: str) -> dict[Path, str]:
    """{file store path: its name} for every torch.distributed file store a vLLM log says its workers used."""
    return {Path(m.group(1)): m.group(2) for m in FILE_STORE.finditer(log)}


def remove_leftovers(ipc: Path | None, log: str) -> None:
    """Delete the IPC folder `ipc` and the file stores and shared-memory segments `log` names. Call once the
    server's processes are gone (a segment still mapped is freed when it is unmapped)."""
    if ipc is not None:
        shutil.rmtree(ipc, ignore_errors=True)
    for path, name in file_stores(log).items():
        for leftover in [path, *SHM.glob(f"{name}-*")]:
            try:
                leftover.unlink()
            except OSError:   # gone already, or not ours to remove: leave it
                pass


def main(argv: list[str] | None = None) -> int:
    """`python -m care_vllm.loadtest.leftovers [--group PGID --grace S] IPC_DIR SERVER_LOG`: for a `vllm serve` a
    shell script ran in its own session (examples/quickstart.sh). With --group, first stop that process group as
    VllmServer.stop() does (server.signal_group and end_group: SIGTERM, up to S seconds, then SIGKILL for all but
    the resource tracker, which unlinks the shared memory a dead engine left). Then remove_leftovers. A log that
    cannot be read removes only the IPC folder."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m care_vllm.loadtest.leftovers", description=main.__doc__)
    ap.add_argument("ipc", type=Path, help="the folder the server was given as VLLM_RPC_BASE_PATH")
    ap.add_argument("log", type=Path, help="the server's log (stdout and stderr)")
    ap.add_argument("--group", type=int, metavar="PGID",
                    help="stop this process group first (the server's pid, started with setsid)")
    ap.add_argument("--grace", type=float, default=30.0,
                    help="seconds the group gets to end after SIGTERM before SIGKILL (default 30; a server that "
                         "never answered /health: 5, see VllmServer's starting_stop_grace)")
    args = ap.parse_args(argv)
    if args.group is not None:
        from care_vllm.loadtest.server import end_group, signal_group

        signal_group(args.group, signal.SIGTERM)
        end_group(args.group, args.grace)
    try:
        log = args.log.read_text(errors="replace")
    except OSError:
        log = ""
    remove_leftovers(args.ipc, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
