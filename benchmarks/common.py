"""What the kernel benchmark scripts share on top of `pagedinfer.bench` (the code of `pagedinfer bench`): the
anchor switch, and results written to $OUT, else benchmarks/results."""
from __future__ import annotations

import argparse
import os

from pagedinfer import bench
from pagedinfer.bench import graph_us, median_us, read_ceiling_gbps, versions  # noqa: F401  (for other benchmarks)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def out_dir() -> str:
    return os.environ.get("OUT") or RESULTS_DIR


def anchor_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments every kernel benchmark takes; `flashinfer_wanted(args)` reads them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--skip-anchor", action="store_true", help="time pagedinfer alone (no FlashInfer)")
    return parser


def selected(cases: list, shapes: str) -> list:
    """`cases` [(heads, [size, ...]), ...] cut to the sizes named in `shapes` ("64x8192,1x2048": each size's
    numbers joined by x); all of them when it is empty."""
    wanted = shapes.split(",") if shapes else None
    return [(heads, [size for size in sizes if not wanted or "x".join(map(str, size)) in wanted])
            for heads, sizes in cases]


def flashinfer_wanted(args) -> bool:
    """FlashInfer runs as the anchor when it is installed and not skipped."""
    return not args.skip_anchor and bench.flashinfer_installed()


def write_results(name: str, records: list[dict], extra: dict | None = None) -> str:
    """benchmarks/results-format JSON to $OUT (or benchmarks/results); returns its path."""
    return bench.write_results(out_dir(), name, records, extra)


def plot_speedups(name: str, records: list[dict], title: str) -> str | None:
    """One bar per record: anchor time / pagedinfer time (above 1 is faster than the anchor)."""
    return bench.plot_speedups(out_dir(), name, records, title)


def report(name: str, op: str, records: list[dict]) -> None:
    """<name>.json and <op>.png to $OUT (or benchmarks/results), then the summary line and the table."""
    bench.report(out_dir(), name, op, records)
