"""Decode: pagedinfer vs FlashInfer (BatchDecodeWithPagedKVCacheWrapper, CUDA-core and tensor-core, best of
the two) in one process on the same random paged caches (bf16, page size 16, pages randomly permuted, NHD).

Each case is timed eagerly (triton do_bench median, L2 flushed between calls) and as a CUDA graph holding 20
calls. GB/s counts the K/V bytes read; the byte floor is those bytes over the streaming-read ceiling
measured in the same run. Writes decode.json (benchmarks/results format) and decode.png to $OUT.
The code is `pagedinfer.bench` (also run by `pagedinfer bench --preset decode`).

    python benchmarks/bench_decode.py [--quick] [--shapes 64x8192,1x2048] [--skip-anchor]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import anchor_parser, flashinfer_wanted, report, selected  # noqa: E402

from pagedinfer.bench import run_decode  # noqa: E402
from pagedinfer.bench_cases import PRESETS  # noqa: E402


def main():
    parser = anchor_parser()
    parser.add_argument("--quick", action="store_true", help="first two cases of each shape only")
    parser.add_argument("--shapes", default="", help="comma-separated BxL filter, e.g. 64x8192,1x2048")
    args = parser.parse_args()
    cases = selected([(heads, sizes[:2] if args.quick else sizes) for heads, sizes in PRESETS["decode"]], args.shapes)
    anchor = "flashinfer" if flashinfer_wanted(args) else None
    report("decode" if anchor else "decode-pagedinfer-only", "decode", run_decode(cases, anchor))


if __name__ == "__main__":
    main()
