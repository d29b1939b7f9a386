"""Programmatic dependent launch on and off, in one process:
decode under CUDA-graph replay (20 calls; "layer": 20 x (append_kv of one token per request, then decode), as
an engine's layer runs them), verify eager (back-to-back launches), and the host cost of run(). Every variant
must give the same bits. Prints one table; writes pdl_check.json to $OUT.
    python3 benchmarks/pdl_check.py"""
import json
import os
import time

import torch

from pagedinfer import bench, kernels
from pagedinfer.cache import append_kv
from pagedinfer.decode import DecodeWrapper
from pagedinfer.paged import csr_page_table
from pagedinfer.verify import VerifyWrapper

DECODE = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((32, 8, 128), 16, 4096),
          ((32, 8, 128), 64, 8192), ((9, 3, 64), 1, 2048), ((9, 3, 64), 1, 32768)]
VERIFY = [((32, 8, 128), 1, 8, 32768), ((32, 8, 128), 64, 8, 4096), ((32, 8, 128), 64, 4, 2048)]
# (label, sources launched programmatically)
VARIANTS = [("plain", ()), ("pdl", ("decode.cu", "cache.cu"))]
LAYER = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 64, 2048)]


def use(variant):
    kernels.PROGRAMMATIC_SOURCES = variant[1]
    kernels._loaded.clear()


def decode_case(heads, batch, kv_len):
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    ref = None
    times = {}
    for v in VARIANTS:
        use(v)
        w = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
        w.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
        out = torch.full_like(q, float("nan"))
        times[v[0]] = bench.graph_us(lambda: w.run(q, kv, out=out))
        ref = out.clone() if ref is None else ref
        assert torch.equal(out, ref), f"{v[0]} output differs"
    return times


def layer_case(heads, batch, kv_len):
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(batch, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = (ids[indptr[1:].long() - 1].long() * bench.PAGE + last.long() - 1)  # each request's last token
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    ref, times = None, {}
    for v in VARIANTS:
        use(v)
        w = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
        w.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
        out = torch.full_like(q, float("nan"))

        def layer():
            append_kv(k_new, v_new, kv, slots)
            w.run(q, kv, out=out)
        times[v[0]] = bench.graph_us(layer)
        ref = out.clone() if ref is None else ref
        assert torch.equal(out, ref), f"{v[0]} output differs"
    return times


def verify_case(heads, batch, drafts, kv_len):
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    q = torch.randn(batch * drafts, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * drafts
    times = {}
    for v in VARIANTS:
        use(v)
        w = VerifyWrapper("cuda")
        w.plan(qo_indptr, table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(),
               indptr_host=indptr.cpu())
        times[v[0]] = bench._timed_run(w, q, kv)[1]
    return times


def host_us(variant, calls=2000):
    """Host time of one eager run() (no sync): what a layer pays in Python and the launch."""
    use(variant)
    kv, ids, indptr, last = bench.make_inputs((32, 8, 128), 1, 2048)
    q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    w = DecodeWrapper("cuda")
    w.plan(csr_page_table(indptr, ids, last, bench.PAGE), 32, 8, 128)
    out = torch.empty_like(q)
    w.run(q, kv, out=out)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        w.run(q, kv, out=out)
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main():
    rows = []
    for heads, b, n in DECODE:
        rows.append((f"decode graph {'/'.join(map(str, heads))} {b}x{n}", decode_case(heads, b, n)))
        torch.cuda.empty_cache()
    for heads, b, n in LAYER:
        rows.append((f"layer graph {'/'.join(map(str, heads))} {b}x{n}", layer_case(heads, b, n)))
        torch.cuda.empty_cache()
    for heads, b, d, n in VERIFY:
        rows.append((f"verify eager {'/'.join(map(str, heads))} {b}x{d}x{n}", verify_case(heads, b, d, n)))
        torch.cuda.empty_cache()
    rows.append(("host us per run()", {v[0]: host_us(v) for v in VARIANTS}))
    with open(os.path.join(os.environ.get("OUT", "."), "pdl_check.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    names = [v[0] for v in VARIANTS]
    print(f"{'us':36s} " + " ".join(f"{n:>13s}" for n in names))
    for label, t in rows:
        print(f"{label:36s} " + " ".join(f"{t[n]:13.2f}" for n in names))


if __name__ == "__main__":
    main()
