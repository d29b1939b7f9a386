"""Shared pieces of the kernel benchmarks: the streaming-read ceiling, timers, the results file, the plot."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_us(fn, *, warmup_ms=25, rep_ms=200) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_us(fn, calls: int = 20) -> float:
    """Per-call time of `calls` launches captured in one CUDA graph and replayed (how engines run decode)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_us(graph.replay) / calls


def anchor_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments every kernel benchmark takes; `flashinfer_wanted(args)` reads them."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--skip-anchor", action="store_true", help="time pagedinfer alone (no FlashInfer)")
    return parser


def flashinfer_wanted(args) -> bool:
    """FlashInfer runs as the anchor when it is installed and not skipped."""
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return not args.skip_anchor


def read_ceiling_gbps() -> float:
    """A streaming read of 2 GiB (fp32 sum), measured in the same run as the kernels."""
    x = torch.empty(2 * 2**30 // 4, dtype=torch.float32, device="cuda").normal_()
    t = median_us(lambda: x.sum())
    del x
    return 2 * 2**30 / (t * 1e-6) / 1e9


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "pagedinfer_git": os.environ.get("PAGEDINFER_GIT_SHA", "unknown")}
    for name in ("cupy", "flashinfer", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    import pagedinfer
    out["pagedinfer"] = pagedinfer.__version__
    return out


def write_results(name: str, records: list[dict], extra: dict | None = None) -> str:
    """benchmarks/results-format JSON to $OUT (or benchmarks/results) and returns its path."""
    out_dir = os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    doc = {"card": torch.cuda.get_device_name(), "versions": versions(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **(extra or {}), "records": records}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def plot_speedups(name: str, records: list[dict], title: str) -> str | None:
    """One bar per case: anchor time / pagedinfer time (above 1 is faster than the anchor)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [r["label"] for r in records]
    values = [r["speedup"] for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(records)), 4))
    ax.bar(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speedup over anchor (x)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_dir = os.environ.get("OUT") or RESULTS_DIR
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=120)
    return path


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
