"""How plan()'s choices change decode and verify times: the wave size (target CTAs) scaled by each `--mult`,
the shortest chunk by each `--min-chunk`, the pipeline depth of decode.cu by each `--stages` (fewer stages,
more CTAs per SM) and the most CTAs per SM by each `--ctas-per-sm` (shared memory padded so that no more fit;
the wave shrinks with it), on the shapes where they matter. Ours only, by default; `--flashinfer` adds FlashInfer's
best in the same run. Prints one table and writes sweep_plan-<ops>.json to $OUT.

    python benchmarks/sweep_plan.py [--mult 0.5 1 2 4 8] [--min-chunk 64 128] [--stages 2 3] [--ctas-per-sm 1 2]
        [--ops verify] [--flashinfer]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from common import case_inputs, planned_decode, planned_verify

from pagedinfer import bench
from pagedinfer import decode as decode_module
from pagedinfer.decode import DecodeWrapper
from pagedinfer.verify import VerifyWrapper

DECODE = [((32, 8, 128), b, n) for b, n in [(1, 2048), (1, 32768), (4, 8192), (64, 8192), (256, 4096), (128, 16384)]]
DECODE += [((9, 3, 64), b, n) for b, n in [(1, 2048), (16, 4096), (64, 2048), (64, 8192), (256, 4096)]]
VERIFY = [((32, 8, 128), b, d, n) for b, d, n in [(64, 4, 2048), (64, 8, 4096), (16, 16, 8192), (1, 8, 32768)]]
VERIFY += [((9, 3, 64), 64, 4, 2048)]


def patched(cls, mult: float, min_chunk: int | None, stages: int | None, ctas_per_sm: int | None):
    """A subclass whose plans use `mult` times the wave size, the given shortest chunk, pipeline depth and most
    CTAs per SM (0 or None: plan()'s own)."""
    class Patched(cls):
        def _config(self, *args):
            real, real_ctas = decode_module._stages, decode_module._ctas_per_sm
            if stages:  # kernel_name and decode_spec read the depth and shared memory from _stages
                decode_module._stages = lambda head_dim, rows=1: (
                    stages, stages * (real(head_dim)[1] // real(head_dim)[0]))
            if ctas_per_sm:  # and the CTAs per SM from _ctas_per_sm
                decode_module._ctas_per_sm = lambda head_dim, rows: ctas_per_sm
            try:
                group, scale, cap, window, spec, kernel, target, merger = super()._config(*args)
            finally:
                decode_module._stages, decode_module._ctas_per_sm = real, real_ctas
            if min_chunk:
                spec = dataclasses.replace(spec, min_chunk=min_chunk)
            return group, scale, cap, window, spec, kernel, max(1, int(target * mult)), merger
    return Patched


def decode_us(heads, batch, kv_len, cls):
    case = case_inputs(heads, batch, kv_len)
    wrapper = planned_decode(cls, case)
    out = torch.empty_like(case.q)
    return bench.graph_us(lambda: wrapper.run(case.q, case.kv, out=out)), case


def verify_us(heads, batch, drafts, kv_len, cls):
    case = case_inputs(heads, batch, kv_len, drafts)
    return bench._timed_run(planned_verify(cls, case), case.q, case.kv)[1], case


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mult", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    p.add_argument("--min-chunk", type=int, nargs="+", default=[128])
    p.add_argument("--stages", type=int, nargs="+", default=[0], help="0: plan()'s own choice")
    p.add_argument("--ctas-per-sm", type=int, nargs="+", default=[0], help="0: plan()'s own; 99: as many as fit")
    p.add_argument("--flashinfer", action="store_true")
    p.add_argument("--ops", nargs="+", default=["decode", "verify"])
    args = p.parse_args()
    rows = []
    variants = [(m, c, st, n) for m in args.mult for c in args.min_chunk for st in args.stages
                for n in args.ctas_per_sm]
    cases = ([("decode", *c) for c in DECODE] if "decode" in args.ops else []) + \
            ([("verify", *c) for c in VERIFY] if "verify" in args.ops else [])
    workspace = bench._workspace("flashinfer") if args.flashinfer else None
    for op, heads, *size in cases:
        times, c = {}, None
        for v in variants:
            if op == "decode":
                times[v], c = decode_us(heads, *size, patched(DecodeWrapper, *v))
            else:
                times[v], c = verify_us(heads, *size, patched(VerifyWrapper, *v))
        fi = None
        if args.flashinfer:
            if op == "decode":
                fi = bench._decode_flashinfer(heads, c.kv, c.ids, c.indptr, c.last, c.q, workspace)[0]["graph"][1]
            else:
                fi = bench._verify_flashinfer(heads, c.kv, c.ids, c.indptr, c.last, c.q, size[1], size[2], None,
                                              "fa2", workspace)[1]
        label = f"{op} {'/'.join(map(str, heads))} {'x'.join(map(str, size))}"
        rows.append(dict(label=label, flashinfer_us=fi, times={"/".join(map(str, v)): t for v, t in times.items()}))
        del c
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, f"sweep_plan-{'-'.join(args.ops)}.json"), "w") as f:  # one per sweep
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    keys = ["/".join(map(str, v)) for v in variants]
    print(f"{'case (us; mult/chunk/stages/ctas)':34s} {'FI':>8s} " + " ".join(f"{k:>9s}" for k in keys))
    for r in rows:
        fi = f"{r['flashinfer_us']:8.1f}" if r["flashinfer_us"] else f"{'-':>8s}"
        print(f"{r['label']:34s} {fi} " + " ".join(f"{r['times'][k]:9.1f}" for k in keys))


if __name__ == "__main__":
    main()
