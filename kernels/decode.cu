// Paged GQA attention for query tokens against their request's paged K/V, on tensor cores: decode (one
// token), speculative verification (up to 16 drafts, causal or a packed tree mask) and prefill (causal,
// none or a packed custom mask). The last qo_len keys of a request are its query tokens' own.
//
// Grid: (kv heads, work items): the heads of one item run side by side, so the DRAM rows a page spreads
// over are read at about the same time. Query rows are (token, head of the group) pairs, token-major. A
// work item is one block of up to 64 of those rows (M_TILES x 16) of one request over one range of keys:
// all the keys the rows can see, or one chunk of them when plan() splits a long request so that small
// batches still fill the GPU. One CTA serves every query head of its KV head, so each K/V row is read from
// memory once per group: query rows are the rows of the mma.sync m16n8k16 A operand (zero-padded), keys the
// columns.
//
// Pipeline: K and V tiles of TILE tokens stream global -> shared with 16-byte cp.async, STAGES deep. Each
// of the 4 warps owns one 16-row tile and 64 / (4 / M_TILES) tokens of every stage: S = Q K^T (ldmatrix),
// online softmax in base 2 on the accumulators, O += P V (ldmatrix.trans). Warps on the same rows merge
// through shared memory at the end. A chunk's partial (output, LSE) goes to the workspace; the last CTA of
// its (request, row block) merges them (an atomic counter), so a split request still costs one launch. With
// `merge_apart` the chunks only leave their partials, and merge_split (below, launched next) merges them with
// every chunk's CTA taking a share of the rows: one CTA alone merging many rows over many chunks is the tail
// of the launch (Nsight Compute, verify 1 x 8 drafts x 32768: 32 rows x 32 chunks per KV head).
#include "attention.cuh"
#include "timeline.cuh"

namespace decode_detail {

using namespace attention;
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int WARP_TOKENS = 16;
constexpr int TILE = WARPS * WARP_TOKENS;  // tokens per pipeline stage; plan() splits in multiples of it

// Row j of a tree mask (bit i set: draft j may attend draft i), bits j*qo_len .. of the request's segment.
__device__ __forceinline__ u32 tree_row(const unsigned char* mask, int offset, int qo_len, int j) {
  const int bit = j * qo_len, bytes = (qo_len * qo_len + 7) / 8;
  u32 w = 0;
#pragma unroll
  for (int k = 0; k < 3; ++k)
    if (bit / 8 + k < bytes) w |= u32(mask[offset + bit / 8 + k]) << (8 * k);
  return (w >> (bit % 8)) & ((1u << qo_len) - 1u);
}

template <int HEAD_DIM>
struct Shape {
  static constexpr int VPR = HEAD_DIM / 8;                          // 16-byte vectors per K/V row
  // Rows of whole 128-byte lines keep them whole in shared memory, their 16-byte vectors permuted (XOR with
  // the row mod 8), so that ldmatrix is conflict-free: padding the rows instead made cp.async read ~1.5x the
  // L2 sectors it needed (Nsight Compute). 80 and 96 (rows of 160 and 192 bytes) stay padded.
  static constexpr bool SWIZZLE = HEAD_DIM % 64 == 0;
  static constexpr int PITCH = SWIZZLE ? HEAD_DIM : HEAD_DIM + 8;
  static constexpr int STAGE_ELEMS = 2 * TILE * PITCH;              // K then V
  // Copying threads per row: for rows of whole 128-byte lines 8, each moving one vector of every line of the
  // row, so that a pass covers 16 rows (a page of 16 tokens: one page id and one address per row); else one
  // per vector.
  static constexpr int CPR = SWIZZLE ? 8 : VPR;
  static constexpr int LINES = VPR / CPR;                           // vectors a copying thread moves per row
  static constexpr int ROW_STEP = THREADS / CPR;                   // rows one pass of the copying threads covers
  static constexpr int CPT = (TILE + ROW_STEP - 1) / ROW_STEP;      // (K, V) rows per copying thread per stage
  static constexpr int KSTEPS = HEAD_DIM / 16;
  static constexpr int NTILES = HEAD_DIM / 8;
  // Element offset of vector `v` of row `r` in a K or V tile.
  static __device__ __forceinline__ int at(int r, int v) { return r * PITCH + (SWIZZLE ? v ^ (r & 7) : v) * 8; }
};

}  // namespace decode_detail

// STAGES and the dynamic shared memory (STAGES * STAGE_ELEMS * 2 bytes) are chosen by plan(); so is M_TILES
// (1, 2 or 4 tiles of 16 query rows per CTA: the warps split the tile's tokens M_TILES ways fewer), and
// HIGH_ROWS (false when no request has more than 8 rows: rows 8..15 of the one tile are padding).
template <typename T, int HEAD_DIM, int GROUP, int PAGE_SIZE, bool SOFT_CAP, int STAGES, int M_TILES, int MASK,
          bool HIGH_ROWS>
__global__ void __launch_bounds__(decode_detail::THREADS)
decode(const u16* __restrict__ q, i64 q_stride_tok, i64 q_stride_head,
       const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
       i64 page_stride, i64 token_stride, i64 head_stride, int num_pages,
       const int* __restrict__ page_ids, const attention::Item* __restrict__ items, const int* __restrict__ num_items,
       const unsigned char* __restrict__ mask_bits,  // packed tree or custom masks, per request
       u16* __restrict__ out, i64 out_stride_tok, i64 out_stride_head,
       float* __restrict__ lse,          // [tokens, q heads], natural log; null when not wanted
       float* __restrict__ partial_o,    // [slots, kv heads, M_TILES * 16, HEAD_DIM]
       float* __restrict__ partial_lse,  // [slots, kv heads, M_TILES * 16], base 2
       int* __restrict__ counters,       // [slots, kv heads], zero between launches
       float qk_scale, float cap_log2, int window_left, int merge_apart) {
  using namespace decode_detail;
  typedef Shape<HEAD_DIM> S;
  static_assert(M_TILES == 1 || M_TILES == 2 || M_TILES == 4, "the 4 warps split into M_TILES row tiles");
  constexpr int ROWS = M_TILES * 16;         // query rows of this CTA
  constexpr int PARTS = WARPS / M_TILES;     // warps on one row tile, each on its own tokens of a stage
  constexpr int SPAN = TILE / PARTS;         // tokens of a stage per warp: M_TILES steps of 16
  constexpr int JOINT = HEAD_DIM > 128 ? 1 : M_TILES;  // steps per softmax update (see the loop)
  TIMELINE_BEGIN;
  allow_next_kernel();
  wait_for_previous_kernel();
  TIMELINE_WAITED;
  // CUDA-graph mode launches the largest grid the buffers allow; the item is read beside the count (the
  // buffer holds the whole grid), one load latency less before the page ids.
  const int active = *num_items;
  const Item it = items[blockIdx.y];
  if (blockIdx.y >= active) return;
  const Request rq = it.rq;
  STAMP_AFTER(2, rq.kv_len);
  const int kv_head = blockIdx.x, kv_heads = gridDim.x, q_heads = kv_heads * GROUP;
  const int row0 = it.row_block * ROWS;
  const int q_head0 = kv_head * GROUP;
  const int prefix = rq.kv_len - rq.qo_len;  // keys every draft sees
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;     // mma fragment coordinates: row group and column pair
  const int mt = warp % M_TILES, part = warp / M_TILES;

  extern __shared__ __align__(128) unsigned char smem_raw[];  // whole 128-byte lines (see Shape)
  u16* tiles = reinterpret_cast<u16*>(smem_raw);

  // This thread's two fragment rows (g and g + 8 of its tile): query token and head of each.
  int tok[2], head[2];
  bool real[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + mt * 16 + g + 8 * h;
    tok[h] = r / GROUP;
    head[h] = r % GROUP;
    real[h] = tok[h] < rq.qo_len;
  }
  // Queries as A fragments: rows g and g + 8, columns 2*t4 (+1) and 2*t4 + 8 (+1) of each k-step.
  u32 qa[S::KSTEPS][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const u16* qp = q + (i64)(rq.qo_start + tok[h]) * q_stride_tok + (i64)(q_head0 + head[h]) * q_stride_head + 2 * t4;
#pragma unroll
    for (int ks = 0; ks < S::KSTEPS; ++ks) {
      qa[ks][h] = real[h] ? *reinterpret_cast<const u32*>(qp + ks * 16) : 0u;
      qa[ks][h + 2] = real[h] ? *reinterpret_cast<const u32*>(qp + ks * 16 + 8) : 0u;
    }
  }
  u32 tree[2] = {0u, 0u};
  if (MASK == TREE) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (real[h]) tree[h] = tree_row(mask_bits, rq.mask_offset, rq.qo_len, tok[h]);
  }
  // Steps that need the per-element mask: past the chunk end, over the drafts' own keys, or below the
  // window start of the last draft (earlier drafts' windows start earlier; plan() starts at the first's).
  const int window_until = window_left >= 0 ? rq.kv_len - 1 - window_left : -1;

  const int n_tiles = (it.end - it.begin + TILE - 1) / TILE;
  const i64 head_off = (i64)kv_head * head_stride;
  // The first ROW_STEP * CPR threads copy: rows row0 + k * ROW_STEP, vector `vec` of each 128-byte line (8
  // vectors apart), of every tile, K and V.
  constexpr int ROW_STEP = S::ROW_STEP;
  const bool copier = tid < ROW_STEP * S::CPR;
  const int vec = tid % S::CPR;
  const int crow0 = tid / S::CPR;
  const u16* k_src = k_cache + head_off + vec * 8;
  const u16* v_src = v_cache + head_off + vec * 8;
  // Page ids of this thread's rows for tile t, each looked up by `id_of(token)` (-1 past the end, and for an id
  // outside the cache: its rows read as zeros instead of faulting).
  auto tile_pages = [&](int t, int (&pages)[S::CPT], auto id_of) {
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      const int row = crow0 + k * ROW_STEP;
      const int token = it.begin + t * TILE + row;
      const int page = (copier && row < TILE && token < it.end) ? id_of(token) : -1;
      pages[k] = (unsigned)page < (unsigned)num_pages ? page : -1;
    }
  };
  auto issue_tile = [&](int t, const int (&pages)[S::CPT]) {
    const int stage = t % STAGES;
    const unsigned first_token = it.begin + t * TILE + crow0;
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      if (copier && (TILE % ROW_STEP == 0 || crow0 + k * ROW_STEP < TILE)) {
        const bool ok = pages[k] >= 0;
        const i64 off = ok ? (i64)pages[k] * page_stride +
                                 (i64)((first_token + k * ROW_STEP) % PAGE_SIZE) * token_stride : 0;
        u16* d = tiles + stage * S::STAGE_ELEMS + S::at(crow0 + k * ROW_STEP, vec);
#pragma unroll
        for (int b = 0; b < S::LINES; ++b) {  // at(row, vec + 8 b) = at(row, vec) + 64 b: the XOR keeps the line
          cp_async16(d + 64 * b, k_src + off + 64 * b, ok);
          cp_async16(d + 64 * b + TILE * S::PITCH, v_src + off + 64 * b, ok);
        }
      }
    }
  };

  // After the first tiles, page ids come through shared memory: those of tile t + LOOK are copied (4 bytes
  // each) with the K/V of tile t + STAGES - 1, so they have as long to arrive as the K/V. Fetched into
  // registers a tile ahead instead, they were the warps' top stall at head dim 64 (Nsight Compute); the ring
  // took decode 1 x 32768 from 53.4 to 52.4 us and verify 1 x 8 x 32768 from 72.5 to 70.9
  // (benchmarks/results/decode-ring-ab.json; where to use it: ring-where-ab.json).
  constexpr int LOOK = 2 * STAGES - 2;
  constexpr int PIDS = (TILE + PAGE_SIZE - 1) / PAGE_SIZE + 1;  // pages a tile of TILE tokens can touch
  __shared__ int id_ring[STAGES][PIDS];
  auto copy_ids = [&](int t) {
    if (tid < PIDS && t < n_tiles) {
      const int key = it.begin + t * TILE;
      const unsigned first = (unsigned)key / PAGE_SIZE, last = (unsigned)(min(key + TILE, it.end) - 1) / PAGE_SIZE;
      const unsigned p = first + tid;
      cp_async4(&id_ring[t % STAGES][tid], page_ids + it.row_start + min(p, last), p <= last);
    }
  };
  auto ring_pages = [&](int t, int (&pages)[S::CPT]) {
    const unsigned first = (unsigned)(it.begin + t * TILE) / PAGE_SIZE;
    tile_pages(t, pages, [&](int token) { return id_ring[t % STAGES][(unsigned)token / PAGE_SIZE - first]; });
  };
  // The first STAGES - 1 tiles in flight (one commit group each), their page ids read all at once: a short
  // request's time is mostly such chains of dependent loads.
  {
    int first[STAGES - 1][S::CPT];
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
      if (s < n_tiles) tile_pages(s, first[s], [&](int token) { return page_ids[it.row_start + token / PAGE_SIZE]; });
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_tiles) issue_tile(s, first[s]);
      copy_ids(s + STAGES - 1);
      cp_async_commit();
    }
  }

  float o[S::NTILES][4];
#pragma unroll
  for (int n = 0; n < S::NTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};  // rows g and g + 8

  // ldmatrix rows and vectors of this lane inside a warp's 16-token step (see the fragment layouts above).
  const int k_row = lane % 8 + (lane / 16) * 8, k_vec = (lane / 8) % 2;
  const int v_row = lane % 8 + ((lane / 8) % 2) * 8, v_vec = lane / 16;

  for (int t = 0; t < n_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (t == 0) STAMP(3);
    if (t == n_tiles / 2) STAMP(8);
    // Once every thread is done with the stage it overwrites: tile t + STAGES - 1's copies, with the page
    // ids of tile t + LOOK.
    if (t + STAGES - 1 < n_tiles) {
      int pages[S::CPT];
      ring_pages(t + STAGES - 1, pages);
      issue_tile(t + STAGES - 1, pages);
    }
    copy_ids(t + LOOK);
    cp_async_commit();

    // JOINT steps of 16 tokens share one softmax update: the output's rescale (a multiply per accumulator) is
    // paid once per JOINT * 16 keys (measured: verify with 4 row tiles 244 -> 218 us at 16x16x8192). Keys past
    // the chunk's end in a step are masked; their K/V rows were copied as zeros. Head dim 256 does one step at
    // a time: its output accumulators leave no registers for more scores.
#pragma unroll
    for (int step0 = 0; step0 < M_TILES; step0 += JOINT) {
      const int first0 = it.begin + t * TILE + part * SPAN + step0 * 16;
      if (first0 >= it.end) break;  // this warp's part of the last tile is used up
      const u16* ks0 = tiles + (t % STAGES) * S::STAGE_ELEMS + (part * SPAN + step0 * 16) * S::PITCH;

      float s[JOINT][2][4];
#pragma unroll
      for (int j = 0; j < JOINT; ++j) {
        const u16* ks = ks0 + j * 16 * S::PITCH;
#pragma unroll
        for (int n = 0; n < 2; ++n) s[j][n][0] = s[j][n][1] = s[j][n][2] = s[j][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < S::KSTEPS; ++kk) {
          u32 b[4];
          ldmatrix_x4(b, ks + S::at(k_row, 2 * kk + k_vec));
          mma_16816<T>(s[j][0], qa[kk], b[0], b[1]);
          mma_16816<T>(s[j][1], qa[kk], b[2], b[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < JOINT; ++j) {
        const int first = first0 + j * 16;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[j][n][e] * qk_scale;
            if (SOFT_CAP) x = cap_log2 * (1.f - 2.f / (1.f + fast_exp2(x * 2.885390081777927f)));  // tanh
            s[j][n][e] = x;
          }
        // One branch around the whole step (the same for the warp): tested per element, the tree mask's test
        // compiled to a branch per element that every step paid, which one CTA per SM could not hide (verify
        // 16 x 16 x 8192 tree at four stages: 234.2 us, now 201.9 against causal's 200.7). In one process
        // (benchmarks/results/edge-branch-ab*.json): decode 1 x 2048 graph 7.41 -> 7.06 us, verification of
        // one or two row tiles from 1.0% faster to 0.2% slower, causal verification of four 1.0-1.6% slower.
        if (MASK == CUSTOM || first + 16 > it.end || first + 16 > prefix || first < window_until) {
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = first + n * 8 + 2 * t4 + (e & 1), h = e / 2;
              const int draft = key - prefix;  // >= 0 for the drafts' own keys
              bool visible = key < it.end && (window_left < 0 || key >= prefix + tok[h] - window_left);
              if (MASK == CAUSAL) visible = visible && draft <= tok[h];
              if (MASK == TREE) visible = visible && (draft < 0 || ((tree[h] >> draft) & 1u));
              if (MASK == CUSTOM && visible)
                visible = real[h] && custom_bit(mask_bits, rq.mask_offset, rq.kv_len, tok[h], key);
              if (!visible) s[j][n][e] = NEG_INF;
            }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !HIGH_ROWS) break;
        float mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < JOINT; ++j)
          mx = fmaxf(mx, fmaxf(fmaxf(s[j][0][2 * h], s[j][0][2 * h + 1]), fmaxf(s[j][1][2 * h], s[j][1][2 * h + 1])));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[h], mx);
        const float base = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf) before any visible key
        const float rescale = fast_exp2(m[h] - base);
        m[h] = m_new;
        l[h] *= rescale;
#pragma unroll
        for (int n = 0; n < S::NTILES; ++n) {
          o[n][2 * h] *= rescale;
          o[n][2 * h + 1] *= rescale;
        }
#pragma unroll
        for (int j = 0; j < JOINT; ++j)
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = fast_exp2(s[j][n][2 * h + e] - base);
              s[j][n][2 * h + e] = p;
              l[h] += p;
            }
      }
#pragma unroll
      for (int j = 0; j < JOINT; ++j) {
        const u16* vs = ks0 + j * 16 * S::PITCH + TILE * S::PITCH;
        // P as the A operand, and for bf16 also what rounding P to 8 bits left over: V takes both, so the
        // output carries P at fp32 accuracy (backends that round P differ from each other by that rounding).
        // The second MMA is free while the kernel waits on memory (up to 2 row tiles; with 4 it cost 8%).
        u32 pa[4], pr[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float x = s[j][i / 2][2 * (i % 2)], y = s[j][i / 2][2 * (i % 2) + 1];
          pa[i] = Half<T>::pack2(x, y);
          const float2 kept = Half<T>::unpack2(pa[i]);
          pr[i] = Half<T>::pack2(x - kept.x, y - kept.y);
        }
#pragma unroll
        for (int kk = 0; kk < S::KSTEPS; ++kk) {
          u32 b[4];
          ldmatrix_x4_trans(b, vs + S::at(v_row, 2 * kk + v_vec));
          mma_16816<T>(o[2 * kk], pa, b[0], b[1]);
          mma_16816<T>(o[2 * kk + 1], pa, b[2], b[3]);
          if (Half<T>::COARSE && M_TILES < 4) {
            mma_16816<T>(o[2 * kk], pr, b[0], b[1]);
            mma_16816<T>(o[2 * kk + 1], pr, b[2], b[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  STAMP(4);

  // Merge the parts (warps on the same rows, different tokens) through shared memory.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  float* sm_o = reinterpret_cast<float*>(smem_raw);  // [PARTS][ROWS][HEAD_DIM]
  float* sm_ml = sm_o + PARTS * ROWS * HEAD_DIM;     // [PARTS][ROWS][2]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = mt * 16 + g + 8 * h;
    if (real[h]) {
      float* dst = sm_o + (part * ROWS + row) * HEAD_DIM + 2 * t4;
#pragma unroll
      for (int n = 0; n < S::NTILES; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * h], o[n][2 * h + 1]);
      if (t4 == 0) {
        sm_ml[(part * ROWS + row) * 2] = m[h];
        sm_ml[(part * ROWS + row) * 2 + 1] = l[h];
      }
    }
  }
  __syncthreads();

  const bool whole = it.slot < 0;
  const int rows_here = min(ROWS, rq.qo_len * GROUP - row0);
  // Eight dims per thread and pass, so that every store moves 16 bytes: at the end of a launch the stores
  // queue behind the other CTAs' copies, and 8-byte ones took verify 1 x 8 x 32768's last CTA 3.5 us to write
  // 32 rows (benchmarks/results/timeline-before-epilogue.json; the A/B: epilogue-stores-ab.json).
  constexpr int DV = 8;
  for (int idx = tid; idx < rows_here * HEAD_DIM / DV; idx += THREADS) {
    const int row = idx / (HEAD_DIM / DV), dim = DV * (idx % (HEAD_DIM / DV));
    float mx = NEG_INF;
#pragma unroll
    for (int p = 0; p < PARTS; ++p) mx = fmaxf(mx, sm_ml[(p * ROWS + row) * 2]);
    float den = 0.f, acc[DV];
#pragma unroll
    for (int d = 0; d < DV; ++d) acc[d] = 0.f;
    const float base = mx == NEG_INF ? 0.f : mx;  // a row that sees no key at all (an empty tree row)
#pragma unroll
    for (int p = 0; p < PARTS; ++p) {
      const float wt = fast_exp2(sm_ml[(p * ROWS + row) * 2] - base);  // 0 for a part that saw no key
      const float* v = sm_o + (p * ROWS + row) * HEAD_DIM + dim;
      den += wt * sm_ml[(p * ROWS + row) * 2 + 1];
#pragma unroll
      for (int d = 0; d < DV; d += 2) {
        const float2 x = *reinterpret_cast<const float2*>(v + d);
        acc[d] += wt * x.x;
        acc[d + 1] += wt * x.y;
      }
    }
    // Such a row gets output 0 and LSE -inf, like the reference.
    const float inv = den > 0.f ? 1.f / den : 0.f, lse2 = den > 0.f ? mx + __log2f(den) : NEG_INF;
#pragma unroll
    for (int d = 0; d < DV; ++d) acc[d] *= inv;
    const int r = row0 + row, token = rq.qo_start + r / GROUP, qh = q_head0 + r % GROUP;
    if (whole) {
      *reinterpret_cast<uint4*>(out + (i64)token * out_stride_tok + (i64)qh * out_stride_head + dim) =
          make_uint4(Half<T>::pack2(acc[0], acc[1]), Half<T>::pack2(acc[2], acc[3]),
                     Half<T>::pack2(acc[4], acc[5]), Half<T>::pack2(acc[6], acc[7]));
      if (lse != nullptr && dim == 0) lse[(i64)token * q_heads + qh] = lse2 * LN2;
    } else {
      const i64 at = partial_row<ROWS>(it.slot, kv_head, kv_heads, row);
      float4* dst = reinterpret_cast<float4*>(partial_o + at * HEAD_DIM + dim);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (dim == 0) partial_lse[at] = lse2;
    }
  }
  STAMP(5);
  if (whole || merge_apart || !last_chunk(it, counters, kv_head, kv_heads)) {
    STAMPS_OUT(whole);
    return;
  }
  STAMP(6);

  merge_chunks<T, ROWS, HEAD_DIM, GROUP>(it, rq, row0, 0, rows_here * HEAD_DIM / 4, kv_head, kv_heads, partial_o,
                                         partial_lse, out, out_stride_tok, out_stride_head, lse);
  TIMELINE_END(it.row_block == 0 && it.req == 0);
}

// After decode with merge_apart: CTA (KV head, item) of a split chunk merges its share of its (request, row
// block)'s (row, 4 dims) pairs over all the chunks, so the unit's merge is spread over as many CTAs as it has
// chunks. The grid and work buffers are decode's.
template <typename T, int ROWS, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(decode_detail::THREADS)
merge_split(const attention::Item* __restrict__ items, const int* __restrict__ num_items,
            const float* __restrict__ partial_o, const float* __restrict__ partial_lse, u16* __restrict__ out,
            i64 out_stride_tok, i64 out_stride_head, float* __restrict__ lse) {
  using namespace attention;
  allow_next_kernel();
  wait_for_previous_kernel();
  const int active = *num_items;
  const Item it = items[blockIdx.y];
  if (blockIdx.y >= active || it.slot < 0) return;
  const Request& rq = it.rq;
  const int row0 = it.row_block * ROWS, rows_here = min(ROWS, rq.qo_len * GROUP - row0);
  const int pairs = rows_here * HEAD_DIM / 4, share = it.slot - it.first_slot;
  const int begin = (int)((i64)share * pairs / it.chunks), end = (int)((i64)(share + 1) * pairs / it.chunks);
  merge_chunks<T, ROWS, HEAD_DIM, GROUP>(it, rq, row0, begin, end, blockIdx.x, gridDim.x, partial_o, partial_lse, out,
                                         out_stride_tok, out_stride_head, lse);
}
