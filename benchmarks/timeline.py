"""Where a decode or verify launch spends its time: every kernel compiled with PAGEDINFER_TIMELINE (thread 0 of
each working CTA of decode.cu stamps %globaltimer: entry, after the wait for the kernel before, item loaded,
first tile in shared memory, last tile done, result or partial stored, merge won, merged, half its tiles done;
and its multiprocessor) plus any defines named as NAME=D1,D2 (ab.py's form). For each case it prints each stamp's
min / median / max over the working CTAs, in us, and how many CTAs shared a multiprocessor with another working
CTA (with their median 'loop done' against the others'); the JSON also has every working CTA's stamps for the
decode cases:
- decode under CUDA-graph replay (20 calls), for the last call, from the end of the call before (its last
  stamp): the kernel-to-kernel gap is in the first rows;
- verify eagerly, once after an L2 flush (as bench.median_us times it), from the launch's first entry stamp.
    python3 benchmarks/timeline.py [defines]   # writes timeline.json to $OUT"""
import json
import os
import sys

import cupy
import numpy as np
import torch
from ab import parse, use
from common import case_inputs, planned_decode, planned_verify

from pagedinfer import bench
from pagedinfer.decode import DecodeWrapper
from pagedinfer.verify import VerifyWrapper

DECODE = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((9, 3, 64), 1, 2048)]
VERIFY = [((9, 3, 64), 64, 4, 2048), ((32, 8, 128), 1, 8, 32768)]
STAMPS = ["entry", "waited", "item", "first tile", "loop done", "stored", "merge won", "merged", "half way"]
COLUMNS = len(STAMPS) + 1  # then the multiprocessor + 1 (kernels/timeline.cuh)
TABLE_BYTES = 2 * 65536 * COLUMNS * 8


def read_timeline(wrapper):
    """(stamps of the last launch, of the one before): [working CTAs, COLUMNS + 1], ns, 0 where a CTA did not stamp,
    then the CTA's index in the grid (blockIdx.y * gridDim.x + blockIdx.x). The kernel alternates two tables (a
    launch's merge of request 0 flips them); the later one is the last."""
    raw = np.frombuffer(_copy(_timeline(wrapper), TABLE_BYTES), np.uint64).reshape(2, 65536, COLUMNS).astype(np.int64)
    tables = [np.concatenate([t, np.arange(65536)[:, None]], 1) for t in raw]
    tables = [t[t[:, 0] > 0] for t in tables]
    return sorted(tables, key=lambda t: t[:, :len(STAMPS)].max() if t.size else 0, reverse=True)


def _timeline(wrapper):
    return wrapper._plan["kernel"]._function.module.get_global_var("timeline")


def clear_timeline(wrapper) -> None:
    torch.cuda.synchronize()
    cupy.cuda.runtime.memset(_timeline(wrapper), 0, TABLE_BYTES)


def _copy(pointer: int, nbytes: int) -> bytes:
    host = np.empty(nbytes, np.uint8)
    torch.cuda.synchronize()
    cupy.cuda.runtime.memcpy(host.ctypes.data, pointer, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
    return host.tobytes()


def summary(rows: np.ndarray, origin: int) -> dict:
    out = {}
    for i, name in enumerate(STAMPS):
        col = rows[:, i][rows[:, i] > 0]
        if col.size:
            us = (col - origin) / 1e3
            out[name] = (float(us.min()), float(np.median(us)), float(us.max()), int(col.size))
    sm = rows[:, len(STAMPS)]
    sms, ctas = np.unique(sm, return_counts=True)
    shared = np.isin(sm, sms[ctas > 1])
    done = (rows[:, STAMPS.index("loop done")] - origin) / 1e3
    out["sharing an SM"] = (int(shared.sum()), float(np.median(done[shared])) if shared.any() else None,
                            float(np.median(done[~shared])) if (~shared).any() else None)
    return out


def show(label: str, per_call_us: float, stamps: dict) -> None:
    print(f"{label}: {per_call_us:.2f} us per call")
    for name in STAMPS:
        if name in stamps:
            lo, mid, hi, n = stamps[name]
            print(f"  {name:14s} {lo:8.2f} {mid:8.2f} {hi:8.2f}   ({n} CTAs)")
    n, together, alone = stamps["sharing an SM"]
    if n:
        print(f"  {n} CTAs shared an SM with another working CTA: median 'loop done' {together:.2f} us"
              + (f" (the others {alone:.2f})" if alone is not None else ""))


def main():
    defines = {"PAGEDINFER_TIMELINE": 1}
    for argument in sys.argv[1:]:
        defines.update(parse(argument)[1])
    use(defines)
    results = []
    for heads, batch, kv_len in DECODE:
        case = case_inputs(heads, batch, kv_len)
        w = planned_decode(DecodeWrapper, case)
        clear_timeline(w)
        out = torch.empty_like(case.q)
        per_call = bench.graph_us(lambda: w.run(case.q, case.kv, out=out))
        last, before = read_timeline(w)
        origin = int(before[:, :len(STAMPS)].max())
        stamps = summary(last, origin)
        label = f"decode graph {'/'.join(map(str, heads))} {batch}x{kv_len}"
        show(label, per_call, stamps)
        ctas = [[int(r[-1]), int(r[len(STAMPS)]) - 1] + [round((int(x) - origin) / 1e3, 3) if x else None
                                                        for x in r[:len(STAMPS)]] for r in last]
        results.append(dict(case=label, us=per_call, stamps=stamps, ctas=ctas))  # [index, SM, stamps...]
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for heads, batch, drafts, kv_len in VERIFY:
        case = case_inputs(heads, batch, kv_len, drafts)
        w = planned_verify(VerifyWrapper, case)
        out = torch.empty_like(case.q)
        per_call = bench.median_us(lambda: w.run(case.q, case.kv, out=out))
        clear_timeline(w)
        flush.zero_()
        w.run(case.q, case.kv, out=out)
        last, _ = read_timeline(w)
        stamps = summary(last, int(last[:, 0].min()))
        label = f"verify eager {'/'.join(map(str, heads))} {batch}x{drafts}x{kv_len}"
        show(label, per_call, stamps)
        results.append(dict(case=label, us=per_call, stamps=stamps))
    with open(os.path.join(os.environ.get("OUT", "."), "timeline.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), defines=defines, stamps=STAMPS, results=results), f,
                  indent=1)


if __name__ == "__main__":
    main()
