# Sourced by the GPU-host scripts (`source benchmarks/engine_env.sh vllm|sglang`): the engine's bundle on
# PYTHONPATH (the caller exits 2 while pieces are missing, see bundle_install.sh), the kernel cache, and this
# checkout installed without dependencies.
line=$(bash benchmarks/bundle_install.sh "$1") || exit $?
eval "$line"
export PAGEDINFER_CACHE_DIR=${PAGEDINFER_CACHE_DIR:-/tmp/pagedinfer-cache}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
