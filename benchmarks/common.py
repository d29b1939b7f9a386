"""What the kernel benchmark scripts share on top of `pagedinfer.bench` (the code of `pagedinfer bench`): the
anchor switch, and results written to $OUT, else benchmarks/results; for the side-by-side scripts
(sweep_plan.py, pdl_check.py, ab.py) the inputs of one case, its planned wrappers and the printed table."""
from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch

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


# ---------------------------------------------------------------------------------------------- side by side

def case_inputs(heads, batch: int, kv_len: int, drafts: int = 1) -> SimpleNamespace:
    """One case's random cache (bench.make_inputs), its CSR table, and batch x drafts query tokens."""
    from pagedinfer.paged import csr_page_table
    q_heads, _, head_dim = heads
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    return SimpleNamespace(
        heads=heads, batch=batch, kv=kv, ids=ids, indptr=indptr, last=last,
        q=torch.randn(batch * drafts, q_heads, head_dim, device="cuda", dtype=torch.bfloat16),
        table=csr_page_table(indptr, ids, last, bench.PAGE),
        qo_indptr=torch.arange(0, batch + 1, dtype=torch.int32) * drafts)


def planned_decode(cls, case: SimpleNamespace):
    """A `cls` (DecodeWrapper or a subclass) in CUDA-graph mode, planned for the case: how batch 1-4 is timed."""
    w = cls("cuda", use_cuda_graph=True, max_batch_size=case.batch, max_pages=case.ids.numel())
    w.plan(case.table, *case.heads, kv_lens_host=case.table.kv_lens().cpu(), indptr_host=case.indptr.cpu())
    return w


def planned_verify(cls, case: SimpleNamespace):
    """A `cls` (VerifyWrapper or a subclass), eager, planned for the case's drafts."""
    w = cls("cuda")
    w.plan(case.qo_indptr, case.table, *case.heads, kv_lens_host=case.table.kv_lens().cpu(),
           indptr_host=case.indptr.cpu())
    return w


def flashinfer_prefill(case: SimpleNamespace, backend: str, layout: str = "NHD"):
    """FlashInfer's paged prefill wrapper (`backend` auto or fa2), planned causal for the case's query tokens on
    its cache stored `layout`; run it as `w.run(case.q, kv)`."""
    import flashinfer
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, layout, backend=backend)
    w.plan(case.qo_indptr.cuda(), case.indptr, case.ids, case.last, *case.heads, bench.PAGE, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    return w


def planned_prefill(case: SimpleNamespace, custom: bool):
    """A PrefillWrapper, eager, planned causal for the case's query tokens (the last of each request's keys),
    or with the causal pattern given as a packed custom mask."""
    from pagedinfer.prefill import PrefillWrapper
    qo_len, kv_len = int(case.qo_indptr[1]), int(case.table.kv_lens()[0])
    if custom:
        return bench.planned_causal_as_custom(case.heads, case.batch, qo_len, kv_len, case.qo_indptr, case.table)
    w = PrefillWrapper("cuda")
    w.plan(case.qo_indptr, case.table, *case.heads, causal=True, kv_lens_host=case.table.kv_lens().cpu(),
           indptr_host=case.indptr.cpu())
    return w


def save_and_print(name: str, rows: list, columns: list[str], **extra) -> None:
    """rows [(label, {column: us})] to $OUT (else the working directory)/<name>.json, then as a table."""
    with open(os.path.join(os.environ.get("OUT", "."), f"{name}.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), **extra, rows=rows), f, indent=1)
    print(f"{'us':36s} " + " ".join(f"{c:>13s}" for c in columns))
    for label, times in rows:
        print(f"{label:36s} " + " ".join(f"{times[c]:13.2f}" for c in columns))
