"""Our prefill, 32/8/128 causal (bf16, page 16), for Nsight Compute: each shape's wrapper is planned and run twice
(compile, warm-up), then once more, so the last launch of each shape is the one to profile:
    ncu --kernel-name regex:prefill_sm90 --launch-skip 4 --launch-count 2 --section WarpStateStats \
        python3 benchmarks/ncu_prefill.py 8x512+4096 16x1024+0
Stalls per SASS instruction (one shape; -lineinfo from PAGEDINFER_LINEINFO):
    PAGEDINFER_LINEINFO=1 ncu --kernel-name regex:prefill_sm90 --launch-skip 2 --launch-count 1 --set full \
        --import-source yes -o $OUT/extend python3 benchmarks/ncu_prefill.py 8x512+4096
    ncu -i $OUT/extend.ncu-rep --page source --csv --print-source sass > $OUT/extend-source.csv
With --flashinfer the same shapes run through FlashInfer's paged prefill wrapper (backend auto) instead, for the
same profile of its kernel (`--kernel-name regex:"[Pp]refill"`: that process runs no kernel of ours)."""
import sys

import torch
from common import case_inputs, flashinfer_prefill, planned_prefill


def main():
    args = [a for a in sys.argv[1:] if a != "--flashinfer"]
    theirs = len(args) < len(sys.argv) - 1
    runs = []
    for shape in args or ["8x512+4096", "16x1024+0"]:
        batch_new, prefix = shape.split("+")
        batch, new = map(int, batch_new.split("x"))
        case = case_inputs((32, 8, 128), batch, new + int(prefix), new)
        wrapper = flashinfer_prefill(case, "auto") if theirs else planned_prefill(case, custom=False)
        runs.append(lambda w=wrapper, c=case: w.run(c.q, c.kv))
    for _ in range(3):
        for run in runs:
            run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
