#!/usr/bin/env bash
# Nsight Compute over benchmarks/ncu_pair.py (the last launch of each NVTX range); CSV to $OUT/ncu_pair.csv.
#   bash benchmarks/ncu_pair.sh [--decode 1x32768 --verify 1x8x32768]   # arguments go to ncu_pair.py
#   NCU_SECTIONS="SpeedOfLight WarpStateStats" bash benchmarks/ncu_pair.sh ...   # whole sections, not METRICS
set -uo pipefail
OUT=${OUT:-/tmp/pagedinfer-out}
METRICS=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,\
lts__t_sector_hit_rate.pct,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,\
launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,launch__grid_size,launch__block_size,\
launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__inst_executed.sum,lts__t_sectors_srcunit_tex_op_read.sum
WHAT="--metrics $METRICS"
[ -n "${NCU_SECTIONS:-}" ] && WHAT="--page details $(printf -- '--section %s ' $NCU_SECTIONS)"
ncu --nvtx --nvtx-include "decode-ours/" --nvtx-include "decode-fi/" --nvtx-include "verify-ours/" \
  --nvtx-include "verify-fi/" $WHAT --csv python3 benchmarks/ncu_pair.py "$@" >"$OUT/ncu_pair.csv" 2>"$OUT/ncu_pair.err"
echo "ncu exit $?"
python3 - "$OUT/ncu_pair.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, data = rows[0], rows[1:]
ki, mi, vi, ni = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value"), head.index("ID")
by = collections.OrderedDict()
for r in data:
    by.setdefault((r[ni], r[ki][:40]), {})[r[mi]] = r[vi]
for (i, k), m in by.items():
    print(i, k)
    for name, v in m.items():
        print(f"   {name:60s} {v}")
PY
