// What every attention kernel shares: the work items plan() writes, the per-request table, the masks, and
// the merge of a split request's partial results by the last of its CTAs.
#pragma once
#include "common.cuh"

namespace attention {

#define NEG_INF (-__int_as_float(0x7f800000))
constexpr float LN2 = 0.6931471805599453f;

// Work item, 8 ints, written by plan(): the request, where its page ids start, its key range, where a split
// key range keeps its partial results, and which rows.
struct __align__(16) Item {  // two 16-byte loads
  int req, row_start, begin, end;
  int slot;        // partial slot of this chunk, or -1 when the item is the whole key range
  int first_slot;  // first partial slot of its (request, row block); also names its merge counter
  int chunks;      // chunks of its (request, row block)
  int row_block;   // which ROWS query rows of the request
};

// Per request: where its query tokens start in q/out, how many there are, its KV length (its own tokens
// included, at the end) and the byte offset of its packed tree or custom mask.
struct __align__(16) Request {
  int qo_start, qo_len, kv_len, mask_offset;
};

enum Mask { NO_MASK = 0, CAUSAL = 1, TREE = 2, CUSTOM = 3 };

// The K/V pipeline of a kernel that streams tiles of keys DEPTH - 1 tiles ahead: `fetch(t, pages)` reads the
// page ids of tile t into registers, `issue(t, pages)` starts its copies (into the kernel's stage for tile t,
// t % its stage count). Page ids are fetched one tile ahead of their copies, so their latency hides behind a
// tile of compute. Before the loop: the first DEPTH - 1 tiles in flight (one commit group each) and the next
// one's page ids. Their page ids are read all at once: a short request's time is mostly such chains of
// dependent loads.
template <int DEPTH, typename Pages, typename Fetch, typename Issue>
__device__ __forceinline__ void pipeline_start(int n_tiles, Pages& pages, Fetch fetch, Issue issue) {
  Pages first[DEPTH - 1];
#pragma unroll
  for (int s = 0; s < DEPTH - 1; ++s)
    if (s < n_tiles) fetch(s, first[s]);
#pragma unroll
  for (int s = 0; s < DEPTH - 1; ++s) {
    if (s < n_tiles) issue(s, first[s]);
    cp_async_commit();
  }
  if (DEPTH - 1 < n_tiles) fetch(DEPTH - 1, pages);
}

// At the top of iteration t, once every thread is done with the stage the next copy overwrites: the copy of
// tile t + DEPTH - 1 starts, and the page ids of the tile after it are fetched.
template <int DEPTH, typename Pages, typename Fetch, typename Issue>
__device__ __forceinline__ void pipeline_next(int t, int n_tiles, Pages& pages, Fetch fetch, Issue issue) {
  if (t + DEPTH - 1 < n_tiles) issue(t + DEPTH - 1, pages);
  cp_async_commit();
  if (t + DEPTH < n_tiles) fetch(t + DEPTH, pages);
}

// Bit (token * kv_len + key) of a request's packed custom mask.
__device__ __forceinline__ bool custom_bit(const unsigned char* mask, int offset, int kv_len, int token, int key) {
  const i64 bit = (i64)token * kv_len + key;
  return (mask[offset + (bit >> 3)] >> (bit & 7)) & 1;
}

// Where a split chunk leaves row `row` of its partial result: [slots, kv heads, ROWS] rows.
template <int ROWS>
__device__ __forceinline__ i64 partial_row(const Item& it, int kv_head, int kv_heads, int row) {
  return ((i64)it.slot * kv_heads + kv_head) * ROWS + row;
}

// A barrier over the CTA, or over its first THREADS_IN threads (named barrier 15) where the others have left.
template <int THREADS_IN>
__device__ __forceinline__ void sync_threads_in() {
  if constexpr (THREADS_IN == 0) __syncthreads();
  else asm volatile("bar.sync 15, %0;" :: "n"(THREADS_IN) : "memory");
}

// After a chunk stored its partial result: true in every thread of the CTA (or of its first THREADS_IN
// threads) that finished its (request, row block, KV head) last, which then merges all chunks. Resets the
// counter for the next launch.
template <int THREADS_IN = 0>
__device__ __forceinline__ bool last_chunk(const Item& it, int* counters, int kv_head, int kv_heads) {
  __shared__ int is_last;
  sync_threads_in<THREADS_IN>();  // every thread's stores come before thread 0's fence, which covers them (cumulative)
  if (threadIdx.x == 0) {
    __threadfence();
    int* counter = counters + (i64)it.first_slot * kv_heads + kv_head;
    is_last = atomicAdd(counter, 1) == it.chunks - 1;
    if (is_last) *counter = 0;  // ready for the next launch (or graph replay)
  }
  sync_threads_in<THREADS_IN>();
  const bool last = is_last;
  if (last) __threadfence();  // see the other CTAs' partial results
  return last;
}

// Merges dims 4 * d4 .. + 3 of row `row` of a (request, row block) over all its chunks' partial (output,
// base-2 LSE) into out and lse, 16 chunks at a time: a block's loads are issued together (predicated past the
// last chunk, so no remainder runs them one by one), then folded into an online log-sum-exp.
template <typename T, int ROWS, int HEAD_DIM, int GROUP>
__device__ __forceinline__ void merge_pair(const Item& it, const Request& rq, int row0, int row, int d4, int kv_head,
                                           int kv_heads, const float* partial_o, const float* partial_lse, u16* out,
                                           i64 out_stride_tok, i64 out_stride_head, float* lse) {
  const int r = row0 + row;
  float mx = NEG_INF, den = 0.f;
  float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
  constexpr int BLOCK = 16;
  for (int c0 = 0; c0 < it.chunks; c0 += BLOCK) {
    float part_lse[BLOCK];
    float4 part[BLOCK];
#pragma unroll
    for (int j = 0; j < BLOCK; ++j) {
      const i64 at = ((i64)(it.first_slot + c0 + j) * kv_heads + kv_head) * ROWS + row;
      const bool real = c0 + j < it.chunks;
      part_lse[j] = real ? __ldcg(partial_lse + at) : NEG_INF;  // weighs 0
      part[j] = real ? __ldcg(reinterpret_cast<const float4*>(partial_o + at * HEAD_DIM) + d4)
                     : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < BLOCK; ++j) {
      const float m_new = fmaxf(mx, part_lse[j]);
      const float base = m_new == NEG_INF ? 0.f : m_new;  // chunks where the row saw no key weigh 0
      const float keep = fast_exp2(mx - base), w = fast_exp2(part_lse[j] - base);
      mx = m_new;
      den = den * keep + w;
      num.x = num.x * keep + w * part[j].x;
      num.y = num.y * keep + w * part[j].y;
      num.z = num.z * keep + w * part[j].z;
      num.w = num.w * keep + w * part[j].w;
    }
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;
  const int token = rq.qo_start + r / GROUP, qh = kv_head * GROUP + r % GROUP;
  *reinterpret_cast<uint2*>(out + (i64)token * out_stride_tok + (i64)qh * out_stride_head + d4 * 4) =
      make_uint2(Half<T>::pack2(num.x * inv, num.y * inv), Half<T>::pack2(num.z * inv, num.w * inv));
  if (lse != nullptr && d4 == 0)
    lse[(i64)token * kv_heads * GROUP + qh] = den > 0.f ? (mx + __log2f(den)) * LN2 : NEG_INF;
}

// Merges the (row, 4 dims) pairs [begin, end) of a block's rows, one pair per thread at a time: all of them
// in the last chunk's CTA, or a share in each of merge_split's CTAs (decode.cu).
// (THREADS_IN: as last_chunk's.)
template <typename T, int ROWS, int HEAD_DIM, int GROUP, int THREADS_IN = 0>
__device__ __forceinline__ void merge_chunks(const Item& it, const Request& rq, int row0, int begin, int end,
                                             int kv_head, int kv_heads, const float* partial_o,
                                             const float* partial_lse, u16* out, i64 out_stride_tok,
                                             i64 out_stride_head, float* lse) {
  for (int idx = begin + threadIdx.x; idx < end; idx += THREADS_IN ? THREADS_IN : blockDim.x)
    merge_pair<T, ROWS, HEAD_DIM, GROUP>(it, rq, row0, idx / (HEAD_DIM / 4), idx % (HEAD_DIM / 4), kv_head,
                                         kv_heads, partial_o, partial_lse, out, out_stride_tok, out_stride_head, lse);
}

}  // namespace attention
