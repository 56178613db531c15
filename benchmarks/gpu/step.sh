#!/usr/bin/env bash
# step.sh STEP -- one device call of the GPU runbook (benchmarks/gpu/README.md). Runs ON the GPU machine,
# in the repo root, with the .gpu/<folder> that STEP needs named in `carry`. Results go to $OUT
# (at most 8 files come back: JSON/markdown plus one logs tarball per step).
#
#   v1      carry .gpu/v1: stash vLLM part 1, unpack the tokenizer; then the backlog's pending `convert`
#           items (conversion speed, no vLLM needed) that fit before HARD_S (default 300 s)
#   v2      carry .gpu/v2: install vLLM (part 2; skipped when the warm machine has it) + gguf; then the
#           backlog's pending correctness / throughput / serve items that fit before HARD_S (default 450 s).
#           With time left in the lease, `step.sh v2` again (no carry) runs the next items.
#   h1      carry .gpu/h1: qwen3-small + corpus; heal qwen3-small (KV 0.5, TOKENS_QWEN)      (healing)
#   h2      carry .gpu/h2: SmolLM2 GGUF pieces a, b (stashed only)                           (healing)
#   h3      carry .gpu/h3: SmolLM2 pieces c, d; convert SmolLM2 at KV 0.5, heal (TOKENS)     (healing)
# What is pending and how long each item should take: `python benchmarks/gpu/backlog.py` (no device).
# The machine stays warm only 30 s between calls: issue the next call at once. Everything a step
# needs from an earlier one is checked first, with a one-line error naming what is missing.
set -uo pipefail
STEP=${1:?usage: step.sh v1|v2|h1|h2|h3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
W=${CARE_TMP:-/tmp/care}            # work folder on the device (kept while the machine is warm)
DEVICE=${DEVICE:-cuda}              # DRY=1 DEVICE=cpu CARE_TMP=... : CPU dry run (no vLLM install, toy sizes)
OUT=${OUT:-$W-out}
mkdir -p "$OUT" "$W/parts"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
       VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} CARE_SHARED=$W/shared DEVICE CORPUS=$W/corpus WORK=$W/heal
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
die() { echo "step $STEP: $*" >&2; exit 2; }

stash() {  # copy what this call carried into $W/parts (kept while the machine is warm)
  [ -d ".gpu/$1" ] || die ".gpu/$1 was not carried (name it in carry)"
  cp -r ".gpu/$1/." $W/parts/
}
install_repo() {  # the plugin's entry point must be registered for vllm to load it
  [ -f $W/.repo_installed ] || [ -n "${DRY:-}" ] && return 0
  python3 -m pip install -q --no-deps --no-build-isolation -e . >$W/pip.log 2>&1 \
    || { tail -20 $W/pip.log; die "pip install -e . failed"; }
  touch $W/.repo_installed
}
need_vllm() {
  python3 -c "import vllm" 2>/dev/null || die "vLLM is not installed on this machine: run steps v1 and v2 first (back to back)"
}
smollm2_gguf() {  # join the 4 pieces once all have arrived
  local g=$W/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$g" ]; then
    for i in 0 1 2 3; do [ -f $W/parts/smollm2.gguf.part$i ] || die "SmolLM2 piece $i missing (steps h2, h3 carry them)"; done
    cat $W/parts/smollm2.gguf.part{0,1,2,3} > "$g.tmp"
    [ "$(sha256sum "$g.tmp" | cut -d' ' -f1)" = "$(cat $W/parts/smollm2.gguf.sha256)" ] || die "SmolLM2 GGUF sha256 mismatch"
    mv "$g.tmp" "$g"
  fi
  echo "$g"
}
pack_logs() {  # one tarball of the step's logs (files under $OUT must stay <= 8)
  tar -czf "$OUT/$STEP-logs.tar.gz" -C $W --exclude='*.safetensors' --exclude='*.gguf' --exclude='site*' \
      --exclude='*.pt' "$@" 2>/dev/null
  ls -la "$OUT"
}
backlog() {  # the backlog's pending items of step $1 that fit before $2 s into this call
  local left=$(( $2 - $(elapsed) - 15 ))    # 15 s to pack the logs
  python3 benchmarks/gpu/backlog.py run --step "$1" --hard-stop-s "$left" --out "$OUT" --work "$W" \
      --tokenizer "$W/tok" --device "$DEVICE" --speed-args "${SPEED_ARGS:-}" --corr-args "${CORR_ARGS:-}" \
      --perf-args "${PERF_ARGS:-}" ${BACKLOG_ARGS:-} 2>&1 | tee $W/backlog_$1.log | grep -v "it/s\]" | cut -c1-400
}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

case "$STEP" in
v1)
  stash v1
  mkdir -p $W/tok $W/shared/models && cp $W/parts/tok/* $W/tok/
  ln -sfn $W/tok $W/shared/models/llama3-small   # tests/tiny_models.py reads its tokenizer there
  install_repo
  backlog v1 "${HARD_S:-300}"
  pack_logs $(cd $W && ls *.log)
  ;;
v2)
  [ -d .gpu/v2 ] && stash v2
  if [ -z "${DRY:-}" ] && ! python3 -c "import vllm" 2>/dev/null; then
    [ -f $W/parts/install.sh ] || die "vLLM part 2 missing: carry .gpu/v2"
    (cd $W/parts && VERIFY=0 DEST=/tmp/site bash install.sh) > $W/install.log 2>&1 || { tail -20 $W/install.log; die "vLLM install failed"; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $W/parts/gguf-*.whl >/dev/null 2>&1 || true
  fi
  install_repo
  need_vllm
  [ -f $W/tok/tokenizer.json ] || die "tokenizer missing: run step v1 first (same warm machine)"
  backlog v2 "${HARD_S:-450}"
  pack_logs $(cd $W && ls *.log) corr perf
  ;;
h1)
  stash h1
  install_repo
  [ -d $W/corpus ] || xz -dc $W/parts/corpus.tar.xz | tar -xf - -C $W
  bash benchmarks/gpu/heal_run.sh qwen3-small $W/parts/qwen3-small "${TOKENS_QWEN:-20M}" 2>&1 | tee $W/heal_qwen3.log | grep -v "it/s\]" | tail -30
  cp $W/heal/qwen3-small-healed/heal_log.json "$OUT/heal_qwen3-small.json" 2>/dev/null
  cp $W/heal/qwen3-small-healed/heal_curve.png "$OUT/heal_qwen3-small.png" 2>/dev/null
  pack_logs heal_qwen3.log
  ;;
h2)
  stash h2
  ls -la $W/parts
  ;;
h3)
  stash h3
  install_repo
  [ -d $W/corpus ] || die "corpus missing: run step h1 first"
  python3 -c "import gguf" 2>/dev/null || die "gguf missing: run step v2 first (it installs the wheel)"
  bash benchmarks/gpu/heal_run.sh smollm2-135m "$(smollm2_gguf)" "${TOKENS:-20M}" 2>&1 | tee $W/heal_smollm2.log | grep -v "it/s\]" | tail -30
  cp $W/heal/smollm2-135m-healed/heal_log.json "$OUT/heal_smollm2-135m.json" 2>/dev/null
  cp $W/heal/smollm2-135m-healed/heal_curve.png "$OUT/heal_smollm2-135m.png" 2>/dev/null
  pack_logs heal_smollm2.log
  ;;
*) die "unknown step (v1|v2|h1|h2|h3)";;
esac
echo "step $STEP done in $(elapsed) s"
