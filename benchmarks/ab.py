"""Compile-time variants of the attention kernels side by side in one process. Each argument NAME=D1,D2:v
compiles every kernel with those defines (-DD1=1 -DD2=v); a define written @VAR:v sets the environment
variable VAR=v for that variant's plans instead (e.g. @PAGEDINFER_MERGE_APART:0). It times the small decode
batches under CUDA-graph replay (20 calls), verify and prefill (causal, and the causal pattern as a custom
mask) eagerly, on the same inputs as the baseline (no defines). Every variant must give outputs within bf16
tolerance of the baseline. `--fa2` adds FlashInfer's fa2 prefill wrapper to the verify rows, as a last column.
Prints one table; writes ab.json to $OUT.
    python3 benchmarks/ab.py [--ops=decode,verify,prefill] [--fa2] fence_once=PAGEDINFER_FENCE_ONCE [more variants]"""
import os
import sys

import torch
from common import case_inputs, flashinfer_prefill, planned_decode, planned_prefill, planned_verify, save_and_print

from pagedinfer import bench, kernels
from pagedinfer.decode import DecodeWrapper
from pagedinfer.verify import VerifyWrapper

DECODE = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((32, 8, 128), 64, 8192),
          ((9, 3, 64), 1, 2048), ((9, 3, 64), 1, 32768)]
VERIFY = [((32, 8, 128), 1, 8, 32768), ((32, 8, 128), 64, 8, 4096), ((32, 8, 128), 16, 16, 8192),
          ((32, 8, 128), 64, 4, 2048), ((32, 8, 128), 256, 4, 1024), ((9, 3, 64), 64, 4, 2048)]
PREFILL = [((32, 8, 128), 1, 4096, 4096), ((32, 8, 128), 16, 1024, 1024), ((32, 8, 128), 8, 512, 4608),
           ((9, 3, 64), 8, 2048, 2048)]  # heads, batch, new tokens, kv_len
OPS = ("decode", "verify", "prefill")


def parse(argument: str) -> tuple[str, dict]:
    name, _, spec = argument.partition("=")
    defines = {}
    for d in filter(None, spec.split(",")):
        key, _, value = d.partition(":")
        defines[key] = value or 1
    return name, defines


def use(defines: dict) -> None:
    for key in use.environment:
        os.environ.pop(key, None)
    use.environment = {k[1:]: str(v) for k, v in defines.items() if k.startswith("@")}
    os.environ.update(use.environment)
    compiled = {k: v for k, v in defines.items() if not k.startswith("@")}
    kernels._loaded.clear()
    kernels.get_kernel = lambda source, name, **kw: use.real(source, name, **{**kw, "defines": compiled})


use.real = kernels.get_kernel
use.environment = {}


def eager_us(case, wrapper, out) -> float:
    wrapper.run(case.q, case.kv, out=out)
    return bench.median_us(lambda: wrapper.run(case.q, case.kv, out=out))


def timed(variants, case, make, time_it) -> dict:
    """{variant: us} for one case; `make(case)` plans a wrapper, `time_it(case, wrapper, out)` times its run
    into out."""
    times, ref = {}, None
    for name, defines in variants:
        use(defines)
        wrapper = make(case)
        out = torch.full_like(case.q, float("nan"))
        times[name] = time_it(case, wrapper, out)
        if ref is None:
            ref = out.float()
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, f"{name}: output differs from the baseline by {err:.3g}"
    return times


def main():
    args = sys.argv[1:]
    ops = args.pop(0)[len("--ops="):].split(",") if args and args[0].startswith("--ops=") else OPS
    fa2 = "--fa2" in args
    variants = [("baseline", {})] + [parse(a) for a in args if a != "--fa2"]
    rows = []
    for heads, batch, kv_len in DECODE if "decode" in ops else []:
        case = case_inputs(heads, batch, kv_len)
        t = timed(variants, case, lambda c: planned_decode(DecodeWrapper, c),
                  lambda c, w, out: bench.graph_us(lambda: w.run(c.q, c.kv, out=out)))
        rows.append((f"decode graph {'/'.join(map(str, heads))} {batch}x{kv_len}", t))
        del case
        torch.cuda.empty_cache()
    for heads, batch, drafts, kv_len in VERIFY if "verify" in ops else []:
        case = case_inputs(heads, batch, kv_len, drafts)
        t = timed(variants, case, lambda c: planned_verify(VerifyWrapper, c), eager_us)
        if fa2:
            anchor = flashinfer_prefill(case, "fa2")
            t["fa2"] = bench.median_us(lambda: anchor.run(case.q, case.kv))
        rows.append((f"verify eager {'/'.join(map(str, heads))} {batch}x{drafts}x{kv_len}", t))
        del case
        torch.cuda.empty_cache()
    for heads, batch, qo_len, kv_len in PREFILL if "prefill" in ops else []:
        case = case_inputs(heads, batch, kv_len, qo_len)
        for custom in (False, True):
            t = timed(variants, case, lambda c, custom=custom: planned_prefill(c, custom), eager_us)
            rows.append((f"prefill {'custom' if custom else 'causal'} {'/'.join(map(str, heads))} "
                         f"{batch}x{qo_len}+{kv_len - qo_len}", t))
        del case
        torch.cuda.empty_cache()
    save_and_print("ab", rows, [n for n, _ in variants] + (["fa2"] if fa2 else []), variants=variants)


if __name__ == "__main__":
    main()
