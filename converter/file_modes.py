"""The modes of a folder the tools write: those any new folder and file get from the umask.

Why a module: every output is written in a folder made by tempfile.mkdtemp (mode 0700) and renamed into place
(converter/write.py replace_dir: care-convert's OUT, care-heal's HEALED and checkpoints; the GGUF cache), and
safetensors writes its files 0600. A checkpoint could then be read by its owner only, not by the account a
`vllm serve` runs as. Light (no torch): the GGUF cache imports it.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, "Umask:"), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def modes_from_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a new folder and file get from the umask (0755 / 0644 at the
    usual 022). Why: the temporary folder a tool writes in is made by tempfile.mkdtemp, mode 0700, and
    safetensors writes its files 0600; renamed into place as OUT, a checkpoint could be read by its owner only,
    not by the account a `vllm serve` runs as. Symbolic links are left as they are, and so is a file whose mode
    cannot be set (a filesystem without modes): the output is complete either way."""
    mask = current_umask()
    paths = [(str(folder), 0o777)]
    for root, dirs, files in os.walk(folder):
        paths += [(os.path.join(root, d), 0o777) for d in dirs] + [(os.path.join(root, f), 0o666) for f in files]
    for path, mode in paths:
        try:
            if not os.path.islink(path):
                os.chmod(path, mode & ~mask)
        except OSError:
            pass
