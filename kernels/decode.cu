// Paged GQA decode: one query token per request against that request's paged K/V, on tensor cores.
//
// Grid: (kv heads, work items): the heads of one item run side by side, so the DRAM rows a page spreads
// over are read at about the same time. A work item is a token range [begin, end) of one request (the whole request,
// or one chunk of it when plan() splits long requests so that small batches still fill the GPU). One CTA
// serves every query head of its KV head, so each K/V row is read from memory once per group: the group's
// query heads are the 16 rows of the mma.sync m16n8k16 A operand (zero-padded), keys the columns.
//
// Pipeline: K and V tiles of TILE tokens stream global -> shared with 16-byte cp.async, STAGES deep; each
// of the 4 warps takes 16 tokens of a tile: S = Q K^T (ldmatrix), online softmax in base 2 on the
// accumulators, O += P V (ldmatrix.trans). The warps' states merge through shared memory at the end.
// A chunk's partial (output, LSE) goes to the workspace; the last CTA of a request (an atomic counter)
// merges them, so a split request still costs one launch.
#include "common.cuh"

namespace decode_detail {

#define NEG_INF (-__int_as_float(0x7f800000))
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int WARP_TOKENS = 16;
constexpr int TILE = WARPS * WARP_TOKENS;  // tokens per pipeline stage; plan() splits in multiples of it
constexpr float LN2 = 0.6931471805599453f;

// Work item, 8 ints, written by plan(): the request, where its page ids start, its token range, and where a
// split request keeps its partial results.
struct Item {
  int req, row_start, begin, end;
  int slot;        // partial slot of this chunk, or -1 when the item is the whole request
  int first_slot;  // first partial slot of the request
  int chunks;      // chunks of the request
  int pad;
};

template <int HEAD_DIM>
struct Shape {
  static constexpr int VPR = HEAD_DIM / 8;                          // 16-byte vectors per K/V row
  static constexpr int PITCH = HEAD_DIM + 8;                        // padded rows: ldmatrix is conflict-free
  static constexpr int STAGE_ELEMS = 2 * TILE * PITCH;              // K then V
  static constexpr int ROW_STEP = THREADS / VPR;                   // rows one pass of the copying threads covers
  static constexpr int CPT = (TILE + ROW_STEP - 1) / ROW_STEP;      // (K, V) rows per copying thread per stage
  static constexpr int KSTEPS = HEAD_DIM / 16;
  static constexpr int NTILES = HEAD_DIM / 8;
};

}  // namespace decode_detail

// STAGES and the dynamic shared memory (STAGES * STAGE_ELEMS * 2 bytes) are chosen by plan().
template <typename T, int HEAD_DIM, int GROUP, int PAGE_SIZE, bool SOFT_CAP, int STAGES>
__global__ void __launch_bounds__(decode_detail::THREADS)
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
       float qk_scale, float cap_log2) {
  using namespace decode_detail;
  typedef Shape<HEAD_DIM> S;
  static_assert(GROUP >= 1 && GROUP <= 16, "a GQA group fills at most the 16 rows of one mma");
  if (blockIdx.y >= *num_items) return;  // CUDA-graph mode launches the largest grid the buffers allow
  const Item it = items[blockIdx.y];
  const int kv_head = blockIdx.x, kv_heads = gridDim.x, q_heads = kv_heads * GROUP;
  const int q_head0 = kv_head * GROUP;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment coordinates: row group and column pair

  extern __shared__ __align__(16) unsigned char smem_raw[];
  u16* tiles = reinterpret_cast<u16*>(smem_raw);

  // The query heads as A fragments: rows g and g + 8, columns 2*t4 (+1) and 2*t4 + 8 (+1) of each k-step.
  u32 qa[S::KSTEPS][4];
  {
    const u16* q0 = q + it.req * q_stride_req + (i64)q_head0 * q_stride_head + 2 * t4;
#pragma unroll
    for (int ks = 0; ks < S::KSTEPS; ++ks) {
      const u16* lo = q0 + (i64)g * q_stride_head + ks * 16;
      const u16* hi = lo + 8 * q_stride_head;
      qa[ks][0] = g < GROUP ? *reinterpret_cast<const u32*>(lo) : 0u;
      qa[ks][1] = g + 8 < GROUP ? *reinterpret_cast<const u32*>(hi) : 0u;
      qa[ks][2] = g < GROUP ? *reinterpret_cast<const u32*>(lo + 8) : 0u;
      qa[ks][3] = g + 8 < GROUP ? *reinterpret_cast<const u32*>(hi + 8) : 0u;
    }
  }

  const int n_tiles = (it.end - it.begin + TILE - 1) / TILE;
  const i64 head_off = (i64)kv_head * head_stride;
  // The first ROW_STEP * VPR threads copy: rows row0 + k * ROW_STEP, vector `vec`, of every tile, K and V.
  constexpr int ROW_STEP = S::ROW_STEP;
  const bool copier = tid < ROW_STEP * S::VPR;
  const int vec = tid % S::VPR;
  const int row0 = tid / S::VPR;
  const u16* k_src = k_cache + head_off + vec * 8;
  const u16* v_src = v_cache + head_off + vec * 8;
  u16* const dst0 = tiles + row0 * S::PITCH + vec * 8;
  // Page ids of this thread's rows for one tile (-1 past the end). They are fetched one iteration before
  // the copies that use them, so their latency hides behind a tile of compute instead of stalling it.
  auto fetch_pages = [&](int t, int (&pages)[S::CPT]) {
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      const int row = row0 + k * ROW_STEP;
      const int token = it.begin + t * TILE + row;
      pages[k] = (copier && row < TILE && token < it.end) ? page_ids[it.row_start + token / PAGE_SIZE] : -1;
    }
  };
  auto issue_tile = [&](int t, int stage, const int (&pages)[S::CPT]) {
    const unsigned first_token = it.begin + t * TILE + row0;
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      if (copier && (TILE % ROW_STEP == 0 || row0 + k * ROW_STEP < TILE)) {
        const bool ok = pages[k] >= 0;
        const i64 off = ok ? (i64)pages[k] * page_stride +
                                 (i64)((first_token + k * ROW_STEP) % PAGE_SIZE) * token_stride : 0;
        u16* d = dst0 + stage * S::STAGE_ELEMS + k * ROW_STEP * S::PITCH;
        cp_async16(d, k_src + off, ok);
        cp_async16(d + TILE * S::PITCH, v_src + off, ok);
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

  float o[S::NTILES][4];
#pragma unroll
  for (int n = 0; n < S::NTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // rows g and g + 8

  // ldmatrix row addresses of this lane inside a warp's 16-token slice (see the fragment layouts above).
  const int k_row = lane % 8 + (lane / 16) * 8, k_col = ((lane / 8) % 2) * 8;
  const int v_row = lane % 8 + ((lane / 8) % 2) * 8, v_col = (lane / 16) * 8;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (t + STAGES - 1 < n_tiles) issue_tile(t + STAGES - 1, (t + STAGES - 1) % STAGES, pages);
    cp_async_commit();
    if (t + STAGES < n_tiles) fetch_pages(t + STAGES, pages);

    const u16* ks = tiles + (t % STAGES) * S::STAGE_ELEMS + warp * WARP_TOKENS * S::PITCH;
    const u16* vs = ks + TILE * S::PITCH;
    const int first = it.begin + t * TILE + warp * WARP_TOKENS;
    if (first >= it.end) continue;  // this warp's slice of the last tile is empty

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < S::KSTEPS; ++kk) {
      u32 b[4];
      ldmatrix_x4(b, ks + k_row * S::PITCH + kk * 16 + k_col);
      mma_16816<T>(s[0], qa[kk], b[0], b[1]);
      mma_16816<T>(s[1], qa[kk], b[2], b[3]);
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * qk_scale;
        if (SOFT_CAP) x = cap_log2 * (1.f - 2.f / (1.f + fast_exp2(x * 2.885390081777927f)));  // tanh
        s[n][e] = first + n * 8 + 2 * t4 + (e & 1) < it.end ? x : NEG_INF;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 1 && GROUP <= 8) break;  // rows 8..15 are padding
      float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float base = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf) before any valid key
      const float rescale = fast_exp2(m[h] - base);
      m[h] = m_new;
      l[h] *= rescale;
#pragma unroll
      for (int n = 0; n < S::NTILES; ++n) {
        o[n][2 * h] *= rescale;
        o[n][2 * h + 1] *= rescale;
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = fast_exp2(s[n][2 * h + e] - base);
          s[n][2 * h + e] = p;
          l[h] += p;
        }
    }
    const u32 pa[4] = {Half<T>::pack2(s[0][0], s[0][1]), Half<T>::pack2(s[0][2], s[0][3]),
                       Half<T>::pack2(s[1][0], s[1][1]), Half<T>::pack2(s[1][2], s[1][3])};
#pragma unroll
    for (int kk = 0; kk < S::KSTEPS; ++kk) {
      u32 b[4];
      ldmatrix_x4_trans(b, vs + v_row * S::PITCH + kk * 16 + v_col);
      mma_16816<T>(o[2 * kk], pa, b[0], b[1]);
      mma_16816<T>(o[2 * kk + 1], pa, b[2], b[3]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps' states through shared memory (the pipeline buffers are free now).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  float* sm_o = reinterpret_cast<float*>(smem_raw);      // [WARPS][GROUP][HEAD_DIM]
  float* sm_ml = sm_o + WARPS * GROUP * HEAD_DIM;        // [WARPS][GROUP][2]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
    if (row < GROUP) {
      float* dst = sm_o + (warp * GROUP + row) * HEAD_DIM + 2 * t4;
#pragma unroll
      for (int n = 0; n < S::NTILES; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
      if (t4 == 0) {
        sm_ml[(warp * GROUP + row) * 2] = m[h];
        sm_ml[(warp * GROUP + row) * 2 + 1] = l[h];
      }
    }
  }
  __syncthreads();

  const bool whole = it.slot < 0;
  for (int idx = tid; idx < GROUP * HEAD_DIM / 2; idx += THREADS) {
    const int head = idx / (HEAD_DIM / 2), dim = 2 * (idx % (HEAD_DIM / 2));
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_ml[(w * GROUP + head) * 2]);
    float den = 0.f, x = 0.f, y = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float wt = fast_exp2(sm_ml[(w * GROUP + head) * 2] - mx);  // 0 for a warp that saw no key
      const float2 v = *reinterpret_cast<const float2*>(sm_o + (w * GROUP + head) * HEAD_DIM + dim);
      den += wt * sm_ml[(w * GROUP + head) * 2 + 1];
      x += wt * v.x;
      y += wt * v.y;
    }
    const float inv = 1.f / den, lse2 = mx + __log2f(den);
    const i64 row = q_head0 + head;
    if (whole) {
      *reinterpret_cast<u32*>(out + it.req * out_stride_req + row * out_stride_head + dim) =
          Half<T>::pack2(x * inv, y * inv);
      if (lse != nullptr && dim == 0) lse[(i64)it.req * q_heads + row] = lse2 * LN2;
    } else {
      *reinterpret_cast<float2*>(partial_o + ((i64)it.slot * q_heads + row) * HEAD_DIM + dim) =
          make_float2(x * inv, y * inv);
      if (dim == 0) partial_lse[(i64)it.slot * q_heads + row] = lse2;
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
  __threadfence();  // see the other CTAs' partial results
  // Each thread merges four dims of one head over all chunks: an online log-sum-exp merge whose loads (the
  // chunk's LSE and output) do not depend on the running state, so the unrolled loop keeps them in flight.
  for (int idx = tid; idx < GROUP * HEAD_DIM / 4; idx += THREADS) {
    const int head = idx / (HEAD_DIM / 4), d4 = idx % (HEAD_DIM / 4);
    const i64 row = q_head0 + head;
    float mx = NEG_INF, den = 0.f;
    float4 num = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int c = 0; c < it.chunks; ++c) {
      const i64 slot = (i64)(it.first_slot + c) * q_heads + row;
      const float part_lse = __ldcg(partial_lse + slot);
      const float4 part = __ldcg(reinterpret_cast<const float4*>(partial_o + slot * HEAD_DIM) + d4);
      const float m_new = fmaxf(mx, part_lse);
      const float keep = fast_exp2(mx - m_new), w = fast_exp2(part_lse - m_new);
      mx = m_new;
      den = den * keep + w;
      num.x = num.x * keep + w * part.x;
      num.y = num.y * keep + w * part.y;
      num.z = num.z * keep + w * part.z;
      num.w = num.w * keep + w * part.w;
    }
    const float inv = 1.f / den;
    *reinterpret_cast<uint2*>(out + it.req * out_stride_req + row * out_stride_head + d4 * 4) =
        make_uint2(Half<T>::pack2(num.x * inv, num.y * inv), Half<T>::pack2(num.z * inv, num.w * inv));
    if (lse != nullptr && d4 == 0) lse[(i64)it.req * q_heads + row] = (mx + __log2f(den)) * LN2;
  }
}
