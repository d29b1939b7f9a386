#!/usr/bin/env bash
# An OpenAI-compatible vLLM server on pagedinfer's kernels (`--attention-backend CUSTOM`), asked one question.
#   bash examples/vllm_serve.sh [MODEL_DIR]      # default: SmolLM2-135M-Instruct, converted once
set -euo pipefail
MODEL=${1:-$(python3 -c "from pagedinfer.models import smollm2_path; print(smollm2_path())")}
PORT=${PORT:-8011}
# `vllm serve` is the same command; the module form also works where vLLM's scripts are not on PATH.
python3 -m vllm.entrypoints.cli.main serve "$MODEL" --attention-backend CUSTOM --port "$PORT" \
  --gpu-memory-utilization 0.3 --max-model-len 4096 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "localhost:$PORT/v1/chat/completions" -H "Content-Type: application/json" -d "{\"model\": \"$MODEL\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],
  \"max_tokens\": 32, \"temperature\": 0}"
echo
