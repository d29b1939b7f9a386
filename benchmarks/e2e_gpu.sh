#!/usr/bin/env bash
# One device call of the E2E plan for an engine on the air-gapped GPU host. Carry one bundle piece per call
# (.bundle/<engine>/NN, see bundle_install.sh); once the bundle is complete the same call installs it, runs
# the adapter's GPU tests once, then `benchmarks/e2e.py` for the seconds left. Repeat the call (no piece
# needed) while it exits 2 (pieces missing) or 3 (plan not finished); the machine must stay warm between.
#   bash benchmarks/e2e_gpu.sh vllm|sglang [E2E_BUDGET_S]
set -uo pipefail
engine=$1
budget=${2:-480}
source benchmarks/engine_env.sh "$engine"
# A state tarball from an earlier machine (carried as .e2e-state/, see e2e.py copy_raw): resume from it.
if [ -f ".e2e-state/e2e-$engine-state.tar.gz" ] && [ ! -d "/tmp/e2e-$engine" ]; then
  mkdir -p "/tmp/e2e-$engine" && tar -xzf ".e2e-state/e2e-$engine-state.tar.gz" -C "/tmp/e2e-$engine"
fi
if [ ! -f "/tmp/adapter-tests-$engine.done" ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider "tests/test_adapter_$engine.py" 2>&1 | tail -15
  touch "/tmp/adapter-tests-$engine.done"
fi
python3 benchmarks/e2e.py --engine "$engine" --state "/tmp/e2e-$engine" --budget "$budget"
