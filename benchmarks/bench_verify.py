"""Speculative verify: pagedinfer vs FlashInfer's prefill wrapper (backend fa2, and auto = fa3 on an H100),
causal drafts and a packed tree mask, in one process on the same random paged caches (bf16, page size 16,
pages randomly permuted, NHD). Eager timings (triton do_bench median). GB/s counts the K/V bytes read.
Writes verify.json (benchmarks/results format) and verify.png to $OUT.
The code is `pagedinfer.bench` (also run by `pagedinfer bench --preset verify`).

    python benchmarks/bench_verify.py [--shapes 64x4x2048,1x8x32768] [--skip-anchor]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import anchor_parser, flashinfer_wanted, report, selected  # noqa: E402

from pagedinfer.bench import run_verify  # noqa: E402
from pagedinfer.bench_cases import PRESETS  # noqa: E402


def main():
    parser = anchor_parser()
    parser.add_argument("--shapes", default="", help="comma-separated BxDxL filter, e.g. 64x4x2048,1x8x32768")
    args = parser.parse_args()
    cases = selected(PRESETS["verify"], args.shapes)
    anchor = "flashinfer" if flashinfer_wanted(args) else None
    report("verify" if anchor else "verify-pagedinfer-only", "verify", run_verify(cases, anchor))


if __name__ == "__main__":
    main()
