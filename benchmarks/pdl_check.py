"""Decode under CUDA-graph replay (20 calls) with and without programmatic dependent launch, in one process.
    python3 benchmarks/pdl_check.py"""
import torch

from pagedinfer import bench, kernels
from pagedinfer.decode import DecodeWrapper
from pagedinfer.paged import csr_page_table


def graph_us(heads, batch, kv_len):
    q_heads, kv_heads, head_dim = heads
    kv, ids, indptr, last = bench.make_inputs(heads, batch, kv_len)
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    table = csr_page_table(indptr, ids, last, bench.PAGE)
    w = DecodeWrapper("cuda", use_cuda_graph=True, max_batch_size=batch, max_pages=ids.numel())
    w.plan(table, q_heads, kv_heads, head_dim, kv_lens_host=table.kv_lens().cpu(), indptr_host=indptr.cpu())
    out = torch.empty_like(q)
    return bench.graph_us(lambda: w.run(q, kv, out=out))


def main():
    shapes = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((9, 3, 64), 1, 2048)]
    for label, sources in (("pdl", ("decode.cu",)), ("plain", ()), ("pdl", ("decode.cu",))):
        kernels.PROGRAMMATIC_SOURCES = sources
        kernels._loaded.clear()
        print(label, " ".join(f"{h[0]}/{h[1]}/{h[2]} {b}x{n}: {graph_us(h, b, n):.2f} us" for h, b, n in shapes))


if __name__ == "__main__":
    main()
