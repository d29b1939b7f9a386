#!/usr/bin/env bash
# One call on the GPU host (no network): install pagedinfer from this checkout without dependencies, run the
# GPU tests, then any benchmark scripts named as arguments. Logs and JSON go to $OUT.
#   bash benchmarks/gpu.sh                         # GPU tests only
#   bash benchmarks/gpu.sh benchmarks/bench_x.py   # GPU tests, then a benchmark
#   SKIP_TESTS=1 bash benchmarks/gpu.sh ...       # benchmarks only
set -uo pipefail
OUT=${OUT:-/tmp/pagedinfer-out}
mkdir -p "$OUT"
export PAGEDINFER_CACHE_DIR=${PAGEDINFER_CACHE_DIR:-/tmp/pagedinfer-cache}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
if [ -d .whl ]; then  # carried wheels (FlashInfer for the benchmarks): installed beside the host's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$OUT/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  python3 -m pytest -m gpu -q -ra -p no:cacheprovider tests ${PYTEST_ARGS:-} >"$OUT/gpu-tests.log" 2>&1 || status=1
  grep -E "passed|failed|error" "$OUT/gpu-tests.log" | tail -5
  [ $status -eq 0 ] || grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -20
fi
if [ -n "${SANITIZE:-}" ]; then  # compute-sanitizer over the named tests, e.g. SANITIZE="-k sanitizer_sweep"
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
      -m gpu tests $SANITIZE >"$OUT/sanitizer-$tool.log" 2>&1; echo "compute-sanitizer $tool: exit $?"
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer-$tool.log" | tail -2
  done
fi
for script in "$@"; do
  echo "== $script"
  python3 $script || status=1  # unquoted: "bench.py --flag" passes its flags
done
exit $status
