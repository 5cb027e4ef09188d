#!/usr/bin/env bash
# End-to-end check on real hardware: vllm-tune find against real vLLM on an NVIDIA GPU, then start the
# emitted command and wait for /health. Needs: nvidia-smi, vLLM (pip install 'vllm-tune[vllm]'), no network.
# The model is a tiny Llama-architecture config run with --load-format dummy and --skip-tokenizer-init,
# so nothing is downloaded (the load probe sends token-id prompts, no tokenizer needed).
#   usage: scripts/gpu-e2e.sh [VLLM_CMD]        (default: vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CMD=${1:-vllm}
command -v nvidia-smi >/dev/null || { echo "gpu-e2e: no nvidia-smi: run this on a machine with an NVIDIA GPU" >&2; exit 2; }
TUNE=${TUNE:-.venv/bin/vllm-tune}
[ -x "$TUNE" ] || make install
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM -- "-$server_pid" 2>/dev/null || true; sleep 5; kill -KILL -- "-$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
model="$work/tiny-llama"
mkdir -p "$model"
cat > "$model/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
 "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768,
 "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
 "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}
JSON
export VLLM_TUNE_HOME="$work/home"
echo "== vllm-tune find on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
# fixed targets keep the load probe small: the tiny model's KV cache holds millions of tokens, and the
# context objective would prove hundreds of full-length sequences at once
"$TUNE" find --model "$model" --gpus 1 --vllm-cmd "$VLLM_CMD" --max-launches 6 --json \
  --context 16384 --seqs 16 -- --load-format dummy --skip-tokenizer-init > "$work/result.json"
python3 - "$work/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({k: r[k] for k in ("stable", "launches", "config", "command")}, indent=1))
sys.exit(0 if r["stable"] else 1)
PY
cmd=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["command"])' "$work/result.json")
port=${E2E_PORT:-18765}
echo "== starting the emitted command on port $port"
setsid bash -c "$cmd --port $port" > "$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 180); do
  if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then echo "gpu-e2e: OK, the emitted command serves"; exit 0; fi
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 5
done
echo "gpu-e2e: the emitted command did not become healthy; last log lines:" >&2
tail -20 "$work/serve.log" >&2
exit 1
