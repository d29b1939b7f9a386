// %globaltimer stamps for benchmarks/timeline.py, compiled in only with -DPAGEDINFER_TIMELINE (nothing
// otherwise). Thread 0 of each working CTA keeps stamp i at point i of the kernel (0 entry, 1 after the wait for
// the kernel before, 2 item loaded, 3 first tile in shared memory, 4 last tile done, 5 result or partial
// stored, 6 merge won, 7 merged, 8 half of its tiles done), and at 9 its multiprocessor (%smid + 1), and writes
// them to timeline[launch parity][CTA] as it leaves; the merge of request 0's first row block flips the parity,
// so the last two launches are kept.
#pragma once

#ifdef PAGEDINFER_TIMELINE
constexpr int TIMELINE_COLUMNS = 10;  // nine stamps, then the multiprocessor (benchmarks/timeline.py COLUMNS)
__device__ unsigned long long timeline[2][65536][TIMELINE_COLUMNS];
__device__ int timeline_calls;
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define STAMP(i) stamps[i] = now_ns()
// Once `x` (a loaded value) has arrived.
#define STAMP_AFTER(i, x) do { asm volatile("" :: "r"(x)); stamps[i] = now_ns(); } while (0)
__device__ __forceinline__ unsigned long long sm_id() {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  return sm + 1ull;
}
#define TIMELINE_BEGIN unsigned long long stamps[TIMELINE_COLUMNS] = {0, 0, 0, 0, 0, 0, 0, 0, 0, sm_id()}; STAMP(0)
#define TIMELINE_WAITED STAMP(1); const int call = timeline_calls
#define STAMPS_OUT(flip) do { if (threadIdx.x == 0) { \
    for (int i_ = 0; i_ < TIMELINE_COLUMNS; ++i_) \
      timeline[call & 1][blockIdx.y * gridDim.x + blockIdx.x][i_] = stamps[i_]; \
    if ((flip) && blockIdx.x == 0) timeline_calls = call + 1; } } while (0)
#define TIMELINE_END(flip) __syncthreads(); STAMP(7); STAMPS_OUT(flip)
#else
#define STAMP(i)
#define STAMP_AFTER(i, x)
#define TIMELINE_BEGIN
#define TIMELINE_WAITED
#define STAMPS_OUT(flip)
#define TIMELINE_END(flip)
#endif
