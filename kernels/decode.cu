// Paged GQA decode: one query token per request against that request's paged K/V.
//
// Grid: (work items, kv heads). A work item is a token range [begin, end) of one request (the whole request,
// or one chunk of it when plan() splits long requests so that small batches still fill the GPU). One CTA
// serves every query head of its KV head, so each K/V row is read from memory once per group.
//
// Pipeline: K and V tiles of TILE tokens stream global -> shared with 16-byte cp.async, STAGES deep; each
// thread then reads its rows' 16-byte slices from shared memory once and applies them to all its heads.
// Online softmax in base 2 (log2(e) folded into the query scale). A chunk's partial (output, LSE) goes to
// the workspace; the last CTA of a request (an atomic counter) merges them, so there is one launch.
#include "common.cuh"

namespace decode_detail {

#define NEG_INF (-__int_as_float(0x7f800000))

constexpr int THREADS = 256;
constexpr int STAGES = 4;
constexpr float LN2 = 0.6931471805599453f;

constexpr int pow2_at_least(int x) { return x <= 8 ? 8 : x <= 16 ? 16 : 32; }

// Work item, 8 ints, written by plan(): the request, where its page ids start, its token range, and where a
// split request keeps its partial results.
struct Item {
  int req, row_start, begin, end;
  int slot;        // partial slot of this chunk, or -1 when the item is the whole request
  int first_slot;  // first partial slot of the request
  int chunks;      // chunks of the request
  int pad;
};

template <int HEAD_DIM, int GROUP>
struct Shape {
  static constexpr int VPR = HEAD_DIM / 8;                 // 16-byte vectors per K/V row
  static constexpr int TPR = pow2_at_least(VPR);           // threads per row (a power of two, within a warp)
  static constexpr int HG = GROUP <= 4 ? 1 : GROUP <= 8 ? 2 : 4;  // head groups: threads per row slice
  static constexpr int HPT = (GROUP + HG - 1) / HG;        // query heads per thread
  static constexpr int R = THREADS / (TPR * HG);           // rows processed side by side
  static constexpr int TILE = 512 / TPR;                   // tokens per pipeline stage (16 KB for D=128)
  static constexpr int RPT = TILE / R;                     // rows per thread per tile
  static constexpr int COPIES = 2 * TILE * VPR;            // 16-byte copies per stage (K and V)
  static constexpr int CPT = (COPIES + THREADS - 1) / THREADS;  // copies per thread per stage
  static constexpr int STAGE_ELEMS = 2 * TILE * HEAD_DIM;
  static_assert(TILE % R == 0, "tile must hold whole row passes");
};

}  // namespace decode_detail

template <typename T, int HEAD_DIM, int GROUP, int PAGE_SIZE, bool SOFT_CAP>
__global__ void __launch_bounds__(decode_detail::THREADS, 2)
decode(const u16* __restrict__ q, i64 q_stride_req, i64 q_stride_head,
       const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
       i64 page_stride, i64 token_stride, i64 head_stride,
       const int* __restrict__ page_ids, const decode_detail::Item* __restrict__ items,
       const int* __restrict__ num_items,
       u16* __restrict__ out, i64 out_stride_req, i64 out_stride_head,
       float* __restrict__ lse,          // [batch, q heads], natural log; null when not wanted
       float* __restrict__ partial_o,    // [slots, q heads, HEAD_DIM]
       float* __restrict__ partial_lse,  // [slots, q heads], base 2
       int* __restrict__ counters,       // [batch, kv heads], zero between launches
       float q_scale, float cap_log2) {
  using namespace decode_detail;
  typedef Shape<HEAD_DIM, GROUP> S;
  if (blockIdx.x >= *num_items) return;  // CUDA-graph mode launches the largest grid the buffers allow
  const Item it = items[blockIdx.x];
  const int kv_head = blockIdx.y, kv_heads = gridDim.y;
  const int tid = threadIdx.x;
  const int lane = tid % S::TPR;                 // which 16-byte slice of the row
  const int row_slot = (tid / S::TPR) % S::R;    // which rows
  const int hg = tid / (S::TPR * S::R);          // which heads
  const bool active = lane < S::VPR;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* tiles = reinterpret_cast<u16*>(smem_raw);

  // This thread's query slices, pre-scaled so that scores come out in base 2 (or in cap units).
  float qf[S::HPT][8];
#pragma unroll
  for (int j = 0; j < S::HPT; ++j) {
    const int head = hg * S::HPT + j;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (active && head < GROUP)
      raw = *reinterpret_cast<const uint4*>(q + it.req * q_stride_req +
                                            (i64)(kv_head * GROUP + head) * q_stride_head + lane * 8);
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = Half<T>::unpack2(w[e]);
      qf[j][2 * e] = f.x * q_scale;
      qf[j][2 * e + 1] = f.y * q_scale;
    }
  }

  const int n_tiles = (it.end - it.begin + S::TILE - 1) / S::TILE;
  const i64 head_off = (i64)kv_head * head_stride;
  // Page ids of this thread's copies for one tile (-1 past the end). They are fetched one iteration before
  // the copies that use them, so their latency hides behind a tile of compute instead of stalling it.
  auto fetch_pages = [&](int t, int (&pages)[S::CPT]) {
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      const int c = k * THREADS + tid;
      const int token = it.begin + t * S::TILE + (c % (S::TILE * S::VPR)) / S::VPR;
      pages[k] = (c < S::COPIES && token < it.end) ? page_ids[it.row_start + token / PAGE_SIZE] : -1;
    }
  };
  auto issue_tile = [&](int t, int stage, const int (&pages)[S::CPT]) {
    u16* dst = tiles + stage * S::STAGE_ELEMS;
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      const int c = k * THREADS + tid;
      if (S::COPIES % THREADS == 0 || c < S::COPIES) {
        const int kv = c / (S::TILE * S::VPR);
        const int row = (c % (S::TILE * S::VPR)) / S::VPR, vec = c % S::VPR;
        const int token = it.begin + t * S::TILE + row;
        const u16* base = kv ? v_cache : k_cache;
        const u16* src = pages[k] < 0 ? base
            : base + pages[k] * page_stride + (i64)(token % PAGE_SIZE) * token_stride + head_off + vec * 8;
        cp_async16(dst + (kv * S::TILE + row) * HEAD_DIM + vec * 8, src, pages[k] >= 0);
      }
    }
  };

  int pages[S::CPT];
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) {
      fetch_pages(s, pages);
      issue_tile(s, s, pages);
    }
    cp_async_commit();
  }
  if (STAGES - 1 < n_tiles) fetch_pages(STAGES - 1, pages);

  float m[S::HPT], d[S::HPT], o[S::HPT][8];
#pragma unroll
  for (int j = 0; j < S::HPT; ++j) {
    m[j] = NEG_INF;
    d[j] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[j][e] = 0.f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (t + STAGES - 1 < n_tiles) issue_tile(t + STAGES - 1, (t + STAGES - 1) % STAGES, pages);
    cp_async_commit();
    if (t + STAGES < n_tiles) fetch_pages(t + STAGES, pages);

    const u16* k_tile = tiles + (t % STAGES) * S::STAGE_ELEMS;
    const u16* v_tile = k_tile + S::TILE * HEAD_DIM;
    float s[S::RPT][S::HPT];
#pragma unroll
    for (int i = 0; i < S::RPT; ++i) {
      const int row = row_slot + i * S::R;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (active) raw = *reinterpret_cast<const uint4*>(k_tile + row * HEAD_DIM + lane * 8);
      const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
      float kf[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = Half<T>::unpack2(w[e]);
        kf[2 * e] = f.x;
        kf[2 * e + 1] = f.y;
      }
#pragma unroll
      for (int j = 0; j < S::HPT; ++j) {
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(qf[j][e], kf[e], acc);
        s[i][j] = acc;
      }
    }
    // Sum the slices of each row: the TPR lanes of a row are adjacent lanes of one warp.
#pragma unroll
    for (int i = 0; i < S::RPT; ++i)
#pragma unroll
      for (int j = 0; j < S::HPT; ++j)
#pragma unroll
        for (int off = S::TPR / 2; off > 0; off >>= 1) s[i][j] += __shfl_xor_sync(0xffffffffu, s[i][j], off);

#pragma unroll
    for (int i = 0; i < S::RPT; ++i) {
      const bool valid = it.begin + t * S::TILE + row_slot + i * S::R < it.end;
#pragma unroll
      for (int j = 0; j < S::HPT; ++j) {
        float x = s[i][j];
        if (SOFT_CAP) x = cap_log2 * (1.f - 2.f / (1.f + fast_exp2(x * 2.885390081777927f)));  // tanh
        s[i][j] = valid ? x : NEG_INF;
      }
    }
#pragma unroll
    for (int j = 0; j < S::HPT; ++j) {
      float m_new = m[j];
#pragma unroll
      for (int i = 0; i < S::RPT; ++i) m_new = fmaxf(m_new, s[i][j]);
      const float base = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf) before any valid row
      const float rescale = fast_exp2(m[j] - base);
      m[j] = m_new;
      d[j] *= rescale;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[j][e] *= rescale;
#pragma unroll
      for (int i = 0; i < S::RPT; ++i) {
        s[i][j] = fast_exp2(s[i][j] - base);
        d[j] += s[i][j];
      }
    }
#pragma unroll
    for (int i = 0; i < S::RPT; ++i) {
      const int row = row_slot + i * S::R;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (active) raw = *reinterpret_cast<const uint4*>(v_tile + row * HEAD_DIM + lane * 8);
      const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = Half<T>::unpack2(w[e]);
#pragma unroll
        for (int j = 0; j < S::HPT; ++j) {
          o[j][2 * e] = fmaf(s[i][j], f.x, o[j][2 * e]);
          o[j][2 * e + 1] = fmaf(s[i][j], f.y, o[j][2 * e + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the R row slots of each head through shared memory (the pipeline buffers are free now).
  float* sm_o = reinterpret_cast<float*>(smem_raw);                   // [HG][R][HPT][TPR*8]
  float* sm_md = sm_o + S::HG * S::R * S::HPT * S::TPR * 8;           // [HG][R][HPT][2]
  const int slot_base = (hg * S::R + row_slot) * S::HPT;
#pragma unroll
  for (int j = 0; j < S::HPT; ++j) {
    if (active) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_o[(slot_base + j) * S::TPR * 8 + lane * 8 + e] = o[j][e];
    }
    if (lane == 0) {
      sm_md[(slot_base + j) * 2] = m[j];
      sm_md[(slot_base + j) * 2 + 1] = d[j];
    }
  }
  __syncthreads();

  const bool whole = it.slot < 0;
  const int q_head0 = kv_head * GROUP;
  for (int idx = tid; idx < GROUP * HEAD_DIM; idx += THREADS) {
    const int head = idx / HEAD_DIM, dim = idx % HEAD_DIM;
    const int g = head / S::HPT, j = head % S::HPT;
    float mx = NEG_INF;
#pragma unroll 4
    for (int r = 0; r < S::R; ++r) mx = fmaxf(mx, sm_md[((g * S::R + r) * S::HPT + j) * 2]);
    float den = 0.f, num = 0.f;
#pragma unroll 4
    for (int r = 0; r < S::R; ++r) {
      const int sl = (g * S::R + r) * S::HPT + j;
      const float w = fast_exp2(sm_md[sl * 2] - mx);  // 0 for slots that saw no key
      den += w * sm_md[sl * 2 + 1];
      num += w * sm_o[sl * S::TPR * 8 + dim];
    }
    const float value = num / den;
    const float lse2 = mx + __log2f(den);
    if (whole) {
      out[it.req * out_stride_req + (i64)(q_head0 + head) * out_stride_head + dim] =
          static_cast<u16>(Half<T>::pack2(value, 0.f) & 0xffffu);
      if (lse != nullptr && dim == 0) lse[(i64)it.req * kv_heads * GROUP + q_head0 + head] = lse2 * LN2;
    } else {
      partial_o[((i64)it.slot * kv_heads * GROUP + q_head0 + head) * HEAD_DIM + dim] = value;
      if (dim == 0) partial_lse[(i64)it.slot * kv_heads * GROUP + q_head0 + head] = lse2;
    }
  }
  if (whole) return;

  // Split request: the last of its CTAs for this KV head merges every chunk's partial result.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* counter = counters + it.req * kv_heads + kv_head;
    is_last = atomicAdd(counter, 1) == it.chunks - 1;
    if (is_last) *counter = 0;  // ready for the next launch (or graph replay)
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Chunk LSEs of this KV head's query heads go to shared memory in one parallel round; then each thread
  // merges four dims of one head over all chunks, with the chunks' loads independent and in flight together.
  float* sm_lse = reinterpret_cast<float*>(smem_raw);  // [chunks][GROUP]
  const int q_heads = kv_heads * GROUP;
  for (int i = tid; i < it.chunks * GROUP; i += THREADS)
    sm_lse[i] = __ldcg(partial_lse + (i64)(it.first_slot + i / GROUP) * q_heads + q_head0 + i % GROUP);
  __syncthreads();
  for (int idx = tid; idx < GROUP * HEAD_DIM / 4; idx += THREADS) {
    const int head = idx / (HEAD_DIM / 4), d4 = idx % (HEAD_DIM / 4);
    float mx = NEG_INF;
    for (int c = 0; c < it.chunks; ++c) mx = fmaxf(mx, sm_lse[c * GROUP + head]);
    float den = 0.f;
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int c = 0; c < it.chunks; ++c) {
      const float w = fast_exp2(sm_lse[c * GROUP + head] - mx);
      const float4 part = __ldcg(reinterpret_cast<const float4*>(
          partial_o + ((i64)(it.first_slot + c) * q_heads + q_head0 + head) * HEAD_DIM) + d4);
      den += w;
      num.x += w * part.x;
      num.y += w * part.y;
      num.z += w * part.z;
      num.w += w * part.w;
    }
    const float inv = 1.f / den;
    *reinterpret_cast<uint2*>(out + it.req * out_stride_req + (i64)(q_head0 + head) * out_stride_head + d4 * 4) =
        make_uint2(Half<T>::pack2(num.x * inv, num.y * inv), Half<T>::pack2(num.z * inv, num.w * inv));
    if (lse != nullptr && d4 == 0) lse[(i64)it.req * q_heads + q_head0 + head] = (mx + __log2f(den)) * LN2;
  }
}
