"""Decode: pagedinfer vs FlashInfer (BatchDecodeWithPagedKVCacheWrapper, CUDA-core and tensor-core, best of
the two) in one process on the same random paged caches (bf16, page size 16, pages randomly permuted, NHD).

Each case is timed eagerly (triton do_bench median, L2 flushed between calls) and as a CUDA graph holding 20
calls. GB/s counts the K/V bytes read; the byte floor is those bytes over the streaming-read ceiling
measured in the same run. Writes decode.json (benchmarks/results format) and decode.png to $OUT.

    python benchmarks/bench_decode.py [--quick]
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (anchor_parser, flashinfer_wanted, fmt, graph_us, median_us, plot_speedups,  # noqa: E402
                    read_ceiling_gbps, write_results)

from pagedinfer import csr_page_table  # noqa: E402
from pagedinfer.decode import DecodeWrapper  # noqa: E402

PAGE = 16
CASES = [((32, 8, 128), [(1, 2048), (1, 32768), (4, 8192), (16, 4096), (64, 2048), (64, 8192), (256, 1024),
                          (256, 4096), (128, 16384)]),
         ((9, 3, 64), [(1, 2048), (1, 32768), (4, 8192), (16, 4096), (64, 2048), (64, 8192), (256, 4096)])]


def make_inputs(hq, hk, d, batch, kv_len):
    pages_per = math.ceil(kv_len / PAGE)
    n = batch * pages_per
    kv = torch.randn(n, 2, PAGE, hk, d, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(n, device="cuda").int()
    indptr = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * pages_per
    last = torch.full((batch,), kv_len - (pages_per - 1) * PAGE, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    return kv, ids, indptr, last, q


def time_pagedinfer(hq, hk, d, batch, kv_len, kv, ids, indptr, last, q):
    wrapper = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
    table = csr_page_table(indptr, ids, last, PAGE)
    wrapper.plan(table, hq, hk, d, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
    out = torch.empty_like(q)
    wrapper.run(q, kv, out=out)
    return out.clone(), median_us(lambda: wrapper.run(q, kv, out=out)), graph_us(lambda: wrapper.run(q, kv, out=out))


def time_flashinfer(hq, hk, d, batch, kv_len, kv, ids, indptr, last, q, workspace):
    import flashinfer
    best = {}
    for tc in (False, True):
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=tc, use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
            paged_kv_indices_buffer=ids.clone(), paged_kv_last_page_len_buffer=last.clone())
        w.plan(indptr, ids, last, hq, hk, d, PAGE, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        out = torch.empty_like(q)
        w.run(q, kv, out=out)
        name = "flashinfer-tensor-core" if tc else "flashinfer-cuda-core"
        for kind, t in (("eager", median_us(lambda: w.run(q, kv, out=out))),
                        ("graph", graph_us(lambda: w.run(q, kv, out=out)))):
            if kind not in best or t < best[kind][1]:
                best[kind] = (name, t)
        best.setdefault("out", out.clone())
    return best


def compile_times(name: str) -> tuple[float, float]:
    """Seconds for the first NVRTC compile + load of one decode kernel, then its load from the disk cache by
    a second process; both timed after imports and CUDA start-up, in a fresh cache directory."""
    import subprocess
    import tempfile
    code = ("import time, torch, cupy; torch.zeros(1, device='cuda'); from pagedinfer import kernels;"
            f"t = time.perf_counter(); kernels.get_kernel('decode.cu', {name!r}); print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PAGEDINFER_CACHE_DIR=cache, PAGEDINFER_LOG_LEVEL="WARNING")
        return tuple(float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True).stdout) for _ in range(2))


def main():
    parser = anchor_parser()
    parser.add_argument("--quick", action="store_true", help="first two cases of each shape only")
    parser.add_argument("--shapes", default="", help="comma-separated BxL filter, e.g. 64x8192,1x2048")
    args = parser.parse_args()
    have_fi = flashinfer_wanted(args)
    ceiling = read_ceiling_gbps()
    workspace = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    records, rows = [], []
    for (hq, hk, d), sizes in CASES:
        for batch, kv_len in (sizes[:2] if args.quick else sizes):
            if args.shapes and f"{batch}x{kv_len}" not in args.shapes.split(","):
                continue
            inputs = make_inputs(hq, hk, d, batch, kv_len)
            kv_bytes = batch * kv_len * hk * d * 2 * 2
            floor_us = kv_bytes / (ceiling * 1e9) * 1e6
            ours, ours_eager, ours_graph = time_pagedinfer(hq, hk, d, batch, kv_len, *inputs)
            fi = time_flashinfer(hq, hk, d, batch, kv_len, *inputs, workspace) if have_fi else None
            diff = (ours.float() - fi["out"].float()).abs().max().item() if fi else float("nan")
            for kind, t in (("eager", ours_eager), ("graph", ours_graph)):
                rec = dict(op="decode", batch=batch, q_heads=hq, kv_heads=hk, head_dim=d, kv_len=kv_len, qo_len=1,
                           page_size=PAGE, mask="none", dtype="bf16", pagedinfer_us=t,
                           gbps=kv_bytes / (t * 1e-6) / 1e9, kv_bytes=kv_bytes, read_ceiling_gbps=ceiling,
                           floor_us=floor_us, graph=kind == "graph", max_abs_diff_vs_anchor=diff,
                           label=f"{hq}/{hk}/{d} {batch}x{kv_len} {kind}")
                if fi:
                    name, ft = fi[kind]
                    rec.update(anchor=name, anchor_us=ft, speedup=ft / t, anchor_gbps=kv_bytes / (ft * 1e-6) / 1e9)
                records.append(rec)
            e, g = records[-2], records[-1]
            rows.append((f"{hq}/{hk}/{d}", f"{batch}x{kv_len}", e.get("anchor_us"), ours_eager, e.get("speedup"),
                         g.get("anchor_us"), ours_graph, g.get("speedup"), e["gbps"], floor_us, diff))
            del inputs
            torch.cuda.empty_cache()
    from pagedinfer.decode import kernel_name
    first, cached = compile_times(kernel_name("bf16", 128, 4, 16, False))
    records.append(dict(op="compile", kernel=kernel_name("bf16", 128, 4, 16, False), first_compile_s=first,
                        cached_load_s=cached))
    path = write_results("decode" if have_fi else "decode-pagedinfer-only", records)
    plot_speedups("decode", [r for r in records if r.get("speedup") and r["graph"] == (r["batch"] <= 4)],
                  f"decode vs FlashInfer best, {torch.cuda.get_device_name()} (graph for batch<=4, else eager)")
    print(f"\nread ceiling {ceiling:.0f} GB/s; first compile {first:.2f} s, cached load {cached:.3f} s; results {path}")
    print(f"{'shape':<10}{'BxL':>10}{'FI us':>9}{'ours us':>9}{'x':>6}{'FI g':>8}{'ours g':>8}{'x':>6}"
          f"{'GB/s':>7}{'floor':>7}{'diff':>8}")
    for r in rows:
        print(f"{r[0]:<10}{r[1]:>10}{fmt(r[2]):>9}{fmt(r[3]):>9}{fmt(r[4], 2):>6}{fmt(r[5]):>8}{fmt(r[6]):>8}"
              f"{fmt(r[7], 2):>6}{fmt(r[8], 0):>7}{fmt(r[9]):>7}{fmt(r[10], 3):>8}")


if __name__ == "__main__":
    main()
