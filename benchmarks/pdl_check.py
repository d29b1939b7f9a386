"""Programmatic dependent launch on and off, in one process:
decode under CUDA-graph replay (20 calls; "layer": 20 x (append_kv of one token per request, then decode), as
an engine's layer runs them), verify eager (back-to-back launches), and the host cost of run(). Every variant
must give the same bits. Prints one table; writes pdl_check.json to $OUT.
    python3 benchmarks/pdl_check.py"""
import time

import torch
from common import case_inputs, planned_decode, planned_verify, save_and_print

from pagedinfer import bench, kernels
from pagedinfer.cache import append_kv
from pagedinfer.decode import DecodeWrapper
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


def graph_case(heads, batch, kv_len, with_append: bool):
    """Decode under graph replay in every variant, alone or after an append of one token per request (what an
    engine's layer runs); each variant must give the same bits."""
    case = case_inputs(heads, batch, kv_len)
    if with_append:
        _, kv_heads, head_dim = heads
        k_new, v_new = (torch.randn(batch, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        slots = case.ids[case.indptr[1:].long() - 1].long() * bench.PAGE + case.last.long() - 1  # last tokens
    ref, times = None, {}
    for v in VARIANTS:
        use(v)
        w = planned_decode(DecodeWrapper, case)
        out = torch.full_like(case.q, float("nan"))

        def call():
            if with_append:
                append_kv(k_new, v_new, case.kv, slots)
            w.run(case.q, case.kv, out=out)
        times[v[0]] = bench.graph_us(call)
        ref = out.clone() if ref is None else ref
        assert torch.equal(out, ref), f"{v[0]} output differs"
    return times


def verify_case(heads, batch, drafts, kv_len):
    case = case_inputs(heads, batch, kv_len, drafts)
    times = {}
    for v in VARIANTS:
        use(v)
        times[v[0]] = bench._timed_run(planned_verify(VerifyWrapper, case), case.q, case.kv)[1]
    return times


def host_us(variant, calls=2000):
    """Host time of one eager run() (no sync): what a layer pays in Python and the launch."""
    use(variant)
    case = case_inputs((32, 8, 128), 1, 2048)
    w = DecodeWrapper("cuda")
    w.plan(case.table, 32, 8, 128)
    out = torch.empty_like(case.q)
    w.run(case.q, case.kv, out=out)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        w.run(case.q, case.kv, out=out)
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main():
    rows = []
    for kind, shapes in (("decode", DECODE), ("layer", LAYER)):
        for heads, b, n in shapes:
            rows.append((f"{kind} graph {'/'.join(map(str, heads))} {b}x{n}", graph_case(heads, b, n, kind == "layer")))
            torch.cuda.empty_cache()
    for heads, b, d, n in VERIFY:
        rows.append((f"verify eager {'/'.join(map(str, heads))} {b}x{d}x{n}", verify_case(heads, b, d, n)))
        torch.cuda.empty_cache()
    rows.append(("host us per run()", {v[0]: host_us(v) for v in VARIANTS}))
    save_and_print("pdl_check", rows, [v[0] for v in VARIANTS])


if __name__ == "__main__":
    main()
