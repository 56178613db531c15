#!/usr/bin/env bash
# heal_run.sh NAME SOURCE TOKENS -- convert SOURCE at KV 0.5 (care, uniform ranks) and heal it for
# TOKENS on the Debian corpus train split, evaluating held-out perplexity on the test split
# (step 0 = unhealed; the teacher = the original). Used by step.sh h1/h3 on the GPU machine; runs on
# the CPU too with DEVICE=cpu (small TOKENS) as a dry run.
#   DEVICE (cuda)  CORPUS (/tmp/care/corpus)  WORK (/tmp/care/heal)  EVALS (10)  EVAL_TOKENS (131072)
#   BATCH (32) ACCUM (2) SEQLEN (512): 64 windows x 512 tokens per update, the care-heal default
#   CALIB ("--calib-samples 256 --calib-seqlen 256"): care-convert calibration arguments
#   EXTRA: more care-heal arguments
set -euo pipefail
NAME=${1:?NAME}; SRC=${2:?SOURCE}; TOKENS=${3:?TOKENS}
DEVICE=${DEVICE:-cuda}; CORPUS=${CORPUS:-/tmp/care/corpus}; WORK=${WORK:-/tmp/care/heal}
BATCH=${BATCH:-32}; ACCUM=${ACCUM:-2}; SEQLEN=${SEQLEN:-512}; EVALS=${EVALS:-10}
PY=${PY:-python3}
mkdir -p "$WORK"
CONV=$WORK/$NAME-kv0.5
if [ ! -f "$CONV/config.json" ]; then
  $PY -m converter.cli "$SRC" "$CONV" --calib "$CORPUS"/*.train.txt --kv-ratio 0.5 --ranks uniform \
      ${CALIB:---calib-samples 256 --calib-seqlen 256} --device "$DEVICE" --overwrite
fi
steps=$($PY -c "import sys; from converter.heal_options import parse_tokens; t=parse_tokens('$TOKENS'); print(max(1, -(-t // ($BATCH*$ACCUM*$SEQLEN))))")
every=$(( steps / EVALS > 0 ? steps / EVALS : 1 ))
$PY -m converter.heal_cli "$CONV" "$WORK/$NAME-healed" --teacher "$SRC" --text "$CORPUS"/*.train.txt --tokens "$TOKENS" \
    --device "$DEVICE" --batch-size "$BATCH" --grad-accum "$ACCUM" --seqlen "$SEQLEN" \
    --eval-text "$CORPUS"/*.test.txt --eval-teacher --eval-every "$every" --eval-tokens "${EVAL_TOKENS:-131072}" \
    --overwrite --no-progress ${EXTRA:-}
$PY - "$WORK/$NAME-healed/heal_log.json" <<'PYEOF'
import json, sys
log = json.load(open(sys.argv[1]))
print(f"teacher (original) ppl {log['teacher_ppl']:.3f}; {log['seconds']:.0f} s training")
for e in log["eval"]:
    print(f"  tokens {e['tokens']:>11,}  ppl {e['ppl']:.3f}  ({100 * (e['ppl'] / log['teacher_ppl'] - 1):+.1f} % vs original)")
PYEOF
