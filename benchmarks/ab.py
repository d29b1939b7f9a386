"""Compile-time variants of the attention kernels side by side in one process. Each argument NAME=D1,D2:v
compiles every kernel with those defines (-DD1=1 -DD2=v) and times the small decode batches under CUDA-graph
replay (20 calls) and verify eagerly, on the same inputs as the baseline (no defines). Every variant must give
outputs within bf16 tolerance of the baseline. Prints one table; writes ab.json to $OUT.
    python3 benchmarks/ab.py fence_once=PAGEDINFER_FENCE_ONCE [more variants]"""
import json
import os
import sys

import torch

from pagedinfer import bench, kernels
from pagedinfer.decode import DecodeWrapper
from pagedinfer.paged import csr_page_table
from pagedinfer.verify import VerifyWrapper

DECODE = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((32, 8, 128), 64, 8192),
          ((9, 3, 64), 1, 2048)]
VERIFY = [((32, 8, 128), 1, 8, 32768), ((32, 8, 128), 64, 8, 4096), ((32, 8, 128), 16, 16, 8192)]


def parse(argument: str) -> tuple[str, dict]:
    name, _, spec = argument.partition("=")
    defines = {}
    for d in filter(None, spec.split(",")):
        key, _, value = d.partition(":")
        defines[key] = value or 1
    return name, defines


def use(defines: dict) -> None:
    kernels._loaded.clear()
    kernels.get_kernel = lambda source, name, **kw: use.real(source, name, **{**kw, "defines": defines})


use.real = kernels.get_kernel


def timed(variants, make, time_it) -> dict:
    """{variant: us} for one case; `make()` plans a wrapper, `time_it(wrapper, out)` times it."""
    times, ref = {}, None
    for name, defines in variants:
        use(defines)
        wrapper, q = make()
        out = torch.full_like(q, float("nan"))
        times[name] = time_it(wrapper, q, out)
        if ref is None:
            ref = out.float()
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, f"{name}: output differs from the baseline by {err:.3g}"
    return times


def main():
    variants = [("baseline", {})] + [parse(a) for a in sys.argv[1:]]
    rows = []
    for heads, batch, kv_len in DECODE:
        q_heads, kv_heads, head_dim = heads
        kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
        q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        table = csr_page_table(indptr, ids, last, bench.PAGE)

        def make():
            w = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
            w.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
            return w, q
        t = timed(variants, make, lambda w, q_, out: bench.graph_us(lambda: w.run(q_, kv, out=out)))
        rows.append((f"decode graph {'/'.join(map(str, heads))} {batch}x{kv_len}", t))
        del kv
        torch.cuda.empty_cache()
    for heads, batch, drafts, kv_len in VERIFY:
        q_heads, kv_heads, head_dim = heads
        kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
        q = torch.randn(batch * drafts, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        table = csr_page_table(indptr, ids, last, bench.PAGE)
        qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32) * drafts

        def make():
            w = VerifyWrapper("cuda")
            w.plan(qo_indptr, table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(),
                   indptr_host=indptr.cpu())
            return w, q
        t = timed(variants, make,
                  lambda w, q_, out: (w.run(q_, kv, out=out), bench.median_us(lambda: w.run(q_, kv, out=out)))[1])
        rows.append((f"verify eager {'/'.join(map(str, heads))} {batch}x{drafts}x{kv_len}", t))
        del kv
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "."), "ab.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), variants=variants, rows=rows), f, indent=1)
    names = [n for n, _ in variants]
    print(f"{'us':36s} " + " ".join(f"{n:>12s}" for n in names))
    for label, t in rows:
        print(f"{label:36s} " + " ".join(f"{t[n]:12.2f}" for n in names))


if __name__ == "__main__":
    main()
