#!/usr/bin/env bash
# On the air-gapped GPU host: `pagedinfer demo` (vLLM, CUSTOM vs TRITON_ATTN), or the per-step profile of
# vLLM decode (benchmarks/profile_vllm_step.py, CUSTOM and TRITON_ATTN). Carry one piece of
# .bundle/vllm per call (see bundle_install.sh: exit 2 while pieces are missing); the call that completes the
# bundle, and every later one while the machine stays warm, runs the job. Logs and JSON go to $OUT.
#   bash benchmarks/demo_gpu.sh demo
#   bash benchmarks/demo_gpu.sh profile [profile_vllm_step.py arguments; default --fast]
set -uo pipefail
job=${1:-demo}
shift
profile_args=${*:---fast}
source benchmarks/engine_env.sh vllm
OUT=${OUT:-/tmp/pagedinfer-out}
mkdir -p "$OUT"
if [ "$job" = demo ]; then
  timeout "${DEMO_TIMEOUT:-540}" python3 -m pagedinfer.cli demo > "$OUT/demo.log" 2>&1
  echo "pagedinfer demo: exit $?"
  grep -v -E "^(INFO|WARNING|DEBUG)|^\(EngineCore|^\[|it/s\]|^$" "$OUT/demo.log" | tail -40
else
  model=$(python3 -c "from pagedinfer.models import smollm2_path; print(smollm2_path(progress=lambda m: None))")
  for backend in CUSTOM TRITON_ATTN; do
    timeout 270 python3 benchmarks/profile_vllm_step.py --model "$model" --backend "$backend" $profile_args \
      --out "$OUT/profile-$backend.json" > "$OUT/profile-$backend.log" 2>&1
    echo "$backend: exit $?"
    grep -A40 '^{' "$OUT/profile-$backend.log" | grep -v -E "^\[|Warning"
  done
fi
