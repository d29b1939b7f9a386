// What every attention kernel shares: the work items plan() writes (each with its request's numbers), the
// masks, and the merge of a split request's partial results by the last of its CTAs.
#pragma once
#include "common.cuh"

namespace attention {

#define NEG_INF (-__int_as_float(0x7f800000))
constexpr float LN2 = 0.6931471805599453f;

// A request's numbers: where its query tokens start in q/out, how many there are, its KV length (its own
// tokens included, at the end) and the byte offset of its packed tree or custom mask.
struct __align__(16) Request {
  int qo_start, qo_len, kv_len, mask_offset;
};

// Work item, 12 ints, written by plan(): the request, where its page ids start, its key range, where a split
// key range keeps its partial results, which rows, and the request's numbers (in the item, so that the page
// ids and the queries load right after it: a table of requests was one dependent load more).
struct __align__(16) Item {  // three 16-byte loads
  int req, row_start, begin, end;
  int slot;        // partial slot of this chunk, or -1 when the item is the whole key range
  int first_slot;  // first partial slot of its (request, row block); also names its merge counter
  int chunks;      // chunks of its (request, row block)
  int row_block;   // which ROWS query rows of the request
  Request rq;
};

enum Mask { NO_MASK = 0, CAUSAL = 1, TREE = 2, CUSTOM = 3 };

// Bit (token * kv_len + key) of a request's packed custom mask.
__device__ __forceinline__ bool custom_bit(const unsigned char* mask, int offset, int kv_len, int token, int key) {
  const i64 bit = (i64)token * kv_len + key;
  return (mask[offset + (bit >> 3)] >> (bit & 7)) & 1;
}

// Where the chunk of partial slot `slot` leaves row `row` of its partial result: [slots, kv heads, ROWS] rows.
template <int ROWS>
__device__ __forceinline__ i64 partial_row(int slot, int kv_head, int kv_heads, int row) {
  return ((i64)slot * kv_heads + kv_head) * ROWS + row;
}

// A barrier over the CTA, or over its first THREADS_IN threads (named barrier 15) where the others have left.
template <int THREADS_IN>
__device__ __forceinline__ void sync_threads_in() {
  if constexpr (THREADS_IN == 0) __syncthreads();
  else asm volatile("bar.sync 15, %0;" :: "n"(THREADS_IN) : "memory");
}

// After a chunk stored its partial result: true in every thread of the CTA (or of its first THREADS_IN
// threads) that finished its (request, row block, KV head) last, which then merges all chunks. Resets the
// counter for the next launch. Thread 0's count is an acquire-release atomic: it releases this CTA's partial
// (the barrier before it puts every thread's stores ahead, and release is cumulative) and, in the last CTA,
// acquires the others' (the barrier after it orders every thread's loads behind). A fence on each side
// instead put a second MEMBAR before the last CTA's loads (H200, graph replay: decode 1 x 2048 6.62 -> 6.34 us,
// 9/3/64 1 x 2048 6.04 -> 5.73; benchmarks/results/merge-acqrel-ab.json).
template <int THREADS_IN = 0>
__device__ __forceinline__ bool last_chunk(const Item& it, int* counters, int kv_head, int kv_heads) {
  __shared__ int is_last;
  sync_threads_in<THREADS_IN>();
  if (threadIdx.x == 0) {
    int* counter = counters + (i64)it.first_slot * kv_heads + kv_head;
    int before;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
    is_last = before == it.chunks - 1;
    if (is_last) *counter = 0;  // ready for the next launch (or graph replay)
  }
  sync_threads_in<THREADS_IN>();
  return is_last;
}

// Merges dims 4 * d4 .. + 3 of row `row` of a (request, row block) (pair = row * HEAD_DIM / 4 + d4) over all
// its chunks' partial (output, base-2 LSE) into out and lse. `lanes` consecutive threads (a power of two up to
// 32) share the chunks, each taking every lanes-th, 16 at a time: a block's loads are issued together
// (past the last chunk they reread it at weight 0, so no remainder runs them one by one), then folded into an
// online log-sum-exp; the lanes then combine theirs through shuffles. Every lane of the warp calls it (the
// shuffles); `real` is false where a lane group has no pair.
template <typename T, int ROWS, int HEAD_DIM, int GROUP>
__device__ __forceinline__ void merge_pair(const Item& it, const Request& rq, int row0, int pair, bool real,
                                           int lanes, int kv_head, int kv_heads, const float* partial_o,
                                           const float* partial_lse, u16* out, i64 out_stride_tok,
                                           i64 out_stride_head, float* lse) {
  const int row = pair / (HEAD_DIM / 4), d4 = pair % (HEAD_DIM / 4), sub = threadIdx.x % lanes;
  float mx = NEG_INF, den = 0.f;
  float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
  // Adds a partial of LSE m2 (base 2), weight sum den2 and weighted output num2.
  auto fold = [&](float m2, float den2, float4 num2) {
    const float m_new = fmaxf(mx, m2);
    const float base = m_new == NEG_INF ? 0.f : m_new;  // chunks where the row saw no key weigh 0
    const float keep = fast_exp2(mx - base), w = fast_exp2(m2 - base);
    mx = m_new;
    den = den * keep + den2 * w;
    num.x = num.x * keep + w * num2.x;
    num.y = num.y * keep + w * num2.y;
    num.z = num.z * keep + w * num2.z;
    num.w = num.w * keep + w * num2.w;
  };
  constexpr int BLOCK = 16;
  const int n_chunks = real ? it.chunks : 0;
  // The first chunk's row; a chunk's is `slot_rows` rows further (partial_row's layout).
  const i64 first_row = partial_row<ROWS>(it.first_slot, kv_head, kv_heads, row);
  const int slot_rows = kv_heads * ROWS;
  const float* first_lse = partial_lse + first_row;
  const float4* first_o = reinterpret_cast<const float4*>(partial_o + first_row * HEAD_DIM) + d4;
  for (int c0 = sub; c0 < n_chunks; c0 += BLOCK * lanes) {
    float part_lse[BLOCK];
    float4 part[BLOCK];
#pragma unroll
    for (int j = 0; j < BLOCK; ++j) {  // past the last chunk: the last one's again, weighed 0 (no branches)
      const int c = c0 + j * lanes;
      const i64 step = min(c, n_chunks - 1) * slot_rows;
      part_lse[j] = c < n_chunks ? __ldcg(first_lse + step) : NEG_INF;
      part[j] = __ldcg(first_o + step * (HEAD_DIM / 4));
    }
    // The block's own log-sum-exp (every load is needed for its max, so they are all in flight at once),
    // then folded in; a chunk's output is normalised (weight sum 1).
    float block_max = NEG_INF;
#pragma unroll
    for (int j = 0; j < BLOCK; ++j) block_max = fmaxf(block_max, part_lse[j]);
    const float base = block_max == NEG_INF ? 0.f : block_max;
    float block_den = 0.f;
    float4 block_num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int j = 0; j < BLOCK; ++j) {
      const float w = fast_exp2(part_lse[j] - base);
      block_den += w;
      block_num.x += w * part[j].x;
      block_num.y += w * part[j].y;
      block_num.z += w * part[j].z;
      block_num.w += w * part[j].w;
    }
    fold(block_max, block_den, block_num);
  }
  for (int o = lanes / 2; o > 0; o /= 2)
    fold(__shfl_xor_sync(0xffffffffu, mx, o), __shfl_xor_sync(0xffffffffu, den, o),
         make_float4(__shfl_xor_sync(0xffffffffu, num.x, o), __shfl_xor_sync(0xffffffffu, num.y, o),
                     __shfl_xor_sync(0xffffffffu, num.z, o), __shfl_xor_sync(0xffffffffu, num.w, o)));
  if (!real || sub != 0) return;
  const int r = row0 + row;
  const float inv = den > 0.f ? 1.f / den : 0.f;
  const int token = rq.qo_start + r / GROUP, qh = kv_head * GROUP + r % GROUP;
  *reinterpret_cast<uint2*>(out + (i64)token * out_stride_tok + (i64)qh * out_stride_head + d4 * 4) =
      make_uint2(Half<T>::pack2(num.x * inv, num.y * inv), Half<T>::pack2(num.z * inv, num.w * inv));
  if (lse != nullptr && d4 == 0)
    lse[(i64)token * kv_heads * GROUP + qh] = den > 0.f ? (mx + __log2f(den)) * LN2 : NEG_INF;
}

// Merges the (row, 4 dims) pairs [begin, end) of a block's rows: all of them in the last chunk's CTA, or a
// share in each of merge_split's CTAs (decode.cu). Each pair gets as many lanes as leave every pair one lane
// group in a single pass, so that a few pairs over many chunks load them all at once.
// (THREADS_IN: as last_chunk's.)
template <typename T, int ROWS, int HEAD_DIM, int GROUP, int THREADS_IN = 0>
__device__ __forceinline__ void merge_chunks(const Item& it, const Request& rq, int row0, int begin, int end,
                                             int kv_head, int kv_heads, const float* partial_o,
                                             const float* partial_lse, u16* out, i64 out_stride_tok,
                                             i64 out_stride_head, float* lse) {
  const int threads = THREADS_IN ? THREADS_IN : blockDim.x;
  int lanes = 1;
  while (lanes < 32 && lanes < it.chunks && 2 * lanes * (end - begin) <= threads) lanes *= 2;
  for (int first = begin; first < end; first += threads / lanes) {
    const int pair = first + (int)threadIdx.x / lanes;
    merge_pair<T, ROWS, HEAD_DIM, GROUP>(it, rq, row0, pair, pair < end, lanes, kv_head, kv_heads, partial_o,
                                         partial_lse, out, out_stride_tok, out_stride_head, lse);
  }
}

}  // namespace attention
