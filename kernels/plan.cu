// The work list of a CUDA-graph step, planned on the GPU: a batch of requests with qo_len query tokens each
// (decode: 1; speculative verification: 1 + drafts), no mask or causal among the drafts, a block table.
// It writes the items plan.py's split_kv would write for the same lengths, byte for byte, but reads the
// lengths where the engine keeps them (on the device), so the host neither waits for them nor sends a plan.
// The page ids of the pages in use go to the plan's own buffer, whose address the captured graph holds.
//
// One CTA of THREADS threads; thread t handles a contiguous run of work units (request, block of query rows).
#include "attention.cuh"

namespace plan_detail {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;

// Sum over the block; `scratch` holds WARPS values and is free again when this returns.
__device__ __forceinline__ i64 block_total(i64 x, i64* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  i64 total = 0;
#pragma unroll 8
  for (int w = 0; w < WARPS; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ int block_max(int x, i64* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  int top = 0;
#pragma unroll 8
  for (int w = 0; w < WARPS; ++w) top = max(top, (int)scratch[w]);
  __syncthreads();
  return top;
}

// Exclusive prefix sum of x over the threads in order; `scratch` holds WARPS values.
__device__ __forceinline__ int block_exclusive_scan(int x, i64* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += (int)scratch[w];
  __syncthreads();
  return before + inclusive - x;
}

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

}  // namespace plan_detail

// work: [item count, 11 unused | capacity items]; page_ids: the plan's copy of the table.
__global__ void __launch_bounds__(plan_detail::THREADS)
plan_uniform(const int* __restrict__ seq_lens, const int* __restrict__ block_table, i64 table_stride, int batch,
             int qo_len, int group, int rows, int page_size, int tile, int min_chunk, int budget, int window_left,
             int causal, int* __restrict__ work, int* __restrict__ page_ids) {
  using namespace plan_detail;
  __shared__ i64 scratch[WARPS];
  const int blocks = cdiv(qo_len * group, rows);  // work units per request
  const int units = batch * blocks;
  const int per = cdiv(units, THREADS);
  const int u0 = min(units, threadIdx.x * per), u1 = min(units, u0 + per);

  // Key range [begin, end) of unit u, as plan(): causal clamps the end, the window moves the start.
  auto range = [&](int u, int& begin, int& end) {
    const int req = u / blocks, block = u % blocks;
    const int len = max(seq_lens[req], qo_len), prefix = len - qo_len;
    const int first_tok = block * rows / group, last_tok = min(qo_len - 1, (block * rows + rows - 1) / group);
    end = causal ? min(len, prefix + last_tok + 1) : len;
    begin = window_left >= 0 ? max(0, prefix + first_tok - window_left) : 0;
  };
  // Chunk length in tiles: 0 keeps every unit whole (the batch alone fills the GPU).
  int chunk_tiles = 0;
  if (units < budget) {
    i64 sum = 0;
    int longest = 0;
    for (int u = u0; u < u1; ++u) {
      int b, e;
      range(u, b, e);
      sum += e - b;
      longest = max(longest, e - b);
    }
    sum = block_total(sum, scratch);
    longest = block_max(longest, scratch);
    auto fits = [&](int c) {  // all units in chunks of c tiles make at most `budget` items
      i64 n = 0;
      for (int u = u0; u < u1; ++u) {
        int b, e;
        range(u, b, e);
        n += cdiv(e - b, c * tile);
      }
      return block_total(n, scratch) <= budget;
    };
    int lo = max(1, cdiv(min_chunk, tile));
    int hi = max(lo, cdiv(longest, tile));
    lo = (int)min((i64)hi, max((i64)lo, (sum + (i64)tile * budget - 1) / ((i64)tile * budget)));
    if (fits(lo)) hi = lo;
    while (lo < hi) {  // the same uniform steps in every thread: the block stays converged
      const int mid = (lo + hi) / 2;
      if (fits(mid)) hi = mid;
      else lo = mid + 1;
    }
    chunk_tiles = lo;
  }
  // Each unit's chunk count and size (whole tiles, equal chunks), as split_kv.
  auto cut = [&](int u, int& begin, int& end, int& chunks, int& size) {
    range(u, begin, end);
    const int len = end - begin;
    chunks = chunk_tiles ? max(1, cdiv(len, chunk_tiles * tile)) : 1;
    size = max(tile, cdiv(cdiv(len, chunks), tile) * tile);
    chunks = max(1, cdiv(len, size));
  };
  int my_items = 0, my_slots = 0;
  for (int u = u0; u < u1; ++u) {
    int b, e, chunks, size;
    cut(u, b, e, chunks, size);
    my_items += chunks;
    my_slots += chunks > 1 ? chunks : 0;
  }
  int item = block_exclusive_scan(my_items, scratch);
  int slot = block_exclusive_scan(my_slots, scratch);
  attention::Item* items = reinterpret_cast<attention::Item*>(work + sizeof(attention::Item) / 4);
  for (int u = u0; u < u1; ++u) {
    int b, e, chunks, size;
    cut(u, b, e, chunks, size);
    const int req = u / blocks;
    for (int j = 0; j < chunks; ++j, ++item) {
      attention::Item it;
      it.req = req;
      it.row_start = (int)(req * table_stride);
      it.begin = b + j * size;
      it.end = min(it.begin + size, e);
      it.slot = chunks > 1 ? slot + j : -1;
      it.first_slot = chunks > 1 ? slot : -1;
      it.chunks = chunks;
      it.row_block = u % blocks;
      it.rq = attention::Request{req * qo_len, qo_len, max(seq_lens[req], qo_len), 0};
      items[item] = it;
    }
    slot += chunks > 1 ? chunks : 0;
  }
  if (threadIdx.x == THREADS - 1) work[0] = item;  // the last thread ends after every item

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < batch; i += WARPS) {
    const int pages = cdiv(max(seq_lens[i], qo_len), page_size);
    for (int p = lane; p < pages; p += 32) page_ids[i * table_stride + p] = block_table[i * table_stride + p];
  }
}
