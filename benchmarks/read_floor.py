"""What reading the bare bytes costs under the benchmarks' own timing, beside the kernels that must read them.
For each case the same K/V cache is read by a plain streaming kernel (16-byte loads, four in flight per thread,
no other work) and by torch.sum, and attended by ours (under each compile-time variant, ab.py's NAME=DEFINES
form) and FlashInfer:
- verify (FlashInfer fa2 and auto), eager, timed after a dirty L2 flush (256 MB written, as triton's do_bench
  and so bench_verify.py) and after a clean one (256 MB read);
- decode under CUDA-graph replay (20 calls, as bench_decode.py times batch 1-4), ours only.
A ratio target below the plain read of the same bytes cannot be met by any kernel that reads each byte once.
Prints one table; writes read_floor.json to $OUT.
    python3 benchmarks/read_floor.py [NAME=DEFINES ...]"""
import sys

import cupy
import torch
from ab import parse, use
from common import case_inputs, flashinfer_prefill, planned_decode, planned_verify, save_and_print

from pagedinfer import bench
from pagedinfer.decode import DecodeWrapper
from pagedinfer.verify import VerifyWrapper

VERIFY = [((9, 3, 64), 64, 4, 2048), ((32, 8, 128), 1, 8, 32768), ((32, 8, 128), 64, 4, 2048),
          ((32, 8, 128), 64, 8, 4096), ((32, 8, 128), 16, 16, 8192)]
DECODE = [((32, 8, 128), 1, 2048), ((32, 8, 128), 1, 32768), ((32, 8, 128), 4, 8192), ((9, 3, 64), 1, 2048)]
FLUSH_BYTES = 256 * 2**20
READ_SOURCE = r"""
extern "C" __global__ void stream_read(const uint4* __restrict__ p, long long n, unsigned* out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {  // four loads in flight before any use
    const uint4 a = __ldg(p + i), b = __ldg(p + i + stride);
    const uint4 c = __ldg(p + i + 2 * stride), d = __ldg(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = __ldg(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;  // a use the compiler cannot drop
}
"""


def stream_read(tensor: torch.Tensor):
    """A call that reads every byte of `tensor` once (one wave of 2048 threads per multiprocessor)."""
    kernel = cupy.RawKernel(READ_SOURCE, "stream_read")
    sink = torch.zeros(1, dtype=torch.int32, device=tensor.device)
    n = tensor.numel() * tensor.element_size() // 16
    grid = torch.cuda.get_device_properties(tensor.device).multi_processor_count * 4

    def call():
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):  # torch's stream, captured in graphs
            kernel((grid,), (512,), (cupy.uint64(tensor.data_ptr()), cupy.int64(n), cupy.uint64(sink.data_ptr())))
    return call


def after_flush_us(fn, flush, reps: int = 200) -> float:
    """Median of `reps` calls, each timed alone after `flush()`."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[reps // 2] * 1e3


def main():
    variants = [("baseline", {})] + [parse(a) for a in sys.argv[1:]]
    scratch = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    flushes = {"dirty flush": scratch.zero_, "clean flush": lambda: scratch.sum()}
    rows = []
    for heads, batch, drafts, kv_len in VERIFY:
        case = case_inputs(heads, batch, kv_len, drafts)
        calls = {}
        for name, defines in variants:
            use(defines)
            calls[name] = lambda w=planned_verify(VerifyWrapper, case): w.run(case.q, case.kv)
        use({})
        for backend in ("fa2", "auto"):
            calls[backend] = lambda w=flashinfer_prefill(case, backend): w.run(case.q, case.kv)
        calls["read"] = stream_read(case.kv)
        calls["sum"] = lambda: case.kv.sum()
        for mode, flush in flushes.items():
            rows.append((f"verify {'/'.join(map(str, heads))} {batch}x{drafts}x{kv_len} {mode}",
                         {name: after_flush_us(fn, flush) for name, fn in calls.items()}))
        del case, calls
        torch.cuda.empty_cache()
    for heads, batch, kv_len in DECODE:
        case = case_inputs(heads, batch, kv_len)
        times = {}
        for name, defines in variants:
            use(defines)
            wrapper, out = planned_decode(DecodeWrapper, case), torch.empty_like(case.q)
            times[name] = bench.graph_us(lambda: wrapper.run(case.q, case.kv, out=out))
        use({})
        times["read"] = bench.graph_us(stream_read(case.kv))
        times["sum"] = bench.graph_us(lambda: case.kv.sum())
        rows.append((f"decode graph {'/'.join(map(str, heads))} {batch}x{kv_len}", times))
        del case
        torch.cuda.empty_cache()
    columns = [n for n, _ in variants] + ["fa2", "auto", "read", "sum"]
    save_and_print("read_floor", [(label, {c: times.get(c, float("nan")) for c in columns}) for label, times in rows],
                   columns, variants=variants)


if __name__ == "__main__":
    main()
