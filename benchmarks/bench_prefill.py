"""Prefill / extend: pagedinfer vs FlashInfer's BatchPrefillWithPagedKVCacheWrapper (backends auto and fa2,
best of the two) and torch SDPA on contiguous K/V, causal, bf16, page size 16, same random paged caches.
TFLOP/s counts only unmasked work. Writes prefill.json (benchmarks/results format) and prefill.png to $OUT.
The code is `pagedinfer.bench` (also run by `pagedinfer bench --preset prefill`).

    python benchmarks/bench_prefill.py [--skip-anchor]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import anchor_parser, flashinfer_wanted, report  # noqa: E402

from pagedinfer.bench import run_prefill  # noqa: E402
from pagedinfer.bench_cases import PRESETS  # noqa: E402


def main():
    anchor = "flashinfer" if flashinfer_wanted(anchor_parser().parse_args()) else None
    report("prefill" if anchor else "prefill-no-flashinfer", "prefill", run_prefill(PRESETS["prefill"], anchor))


if __name__ == "__main__":
    main()
