#!/usr/bin/env bash
# An SGLang server on pagedinfer's kernels (`--attention-backend pagedinfer`), asked one question.
#   bash examples/sglang_serve.sh [MODEL_DIR]    # default: SmolLM2-135M-Instruct, converted once
set -euo pipefail
MODEL=${1:-$(python3 -c "from pagedinfer.models import smollm2_path; print(smollm2_path())")}
PORT=${PORT:-8012}
python3 -m sglang.launch_server --model-path "$MODEL" --attention-backend pagedinfer --port "$PORT" \
  --mem-fraction-static 0.3 --context-length 4096 --grammar-backend none &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "localhost:$PORT/v1/chat/completions" -H "Content-Type: application/json" -d "{\"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],
  \"max_tokens\": 32, \"temperature\": 0}"
echo
