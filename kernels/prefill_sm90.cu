// Paged GQA prefill on Hopper's warpgroup tensor cores (wgmma, sm_90a): ragged query tokens against their
// request's paged K/V, masks none / causal / packed custom, sliding window, soft cap, LSE. Same work items,
// requests and outputs as kernels/decode.cu (which serves every other architecture and head dim).
//
// A work item is 128 query rows ((token, head of the group) pairs, token-major) of one request and KV head,
// against a range of its keys. The CTAs are persistent: one wave, each taking (item, KV head) pairs from one
// queue, so the next pair's queries and keys stream in while the current one finishes. Three warpgroups
// (FA3's schedule):
// - a producer (threads 256-383) streams K and V tiles of 128 tokens global -> shared with 16-byte cp.async
//   through STAGES stages, laid out as wgmma wants them: 64-dim column blocks of 128-byte rows, 16-byte
//   chunks swizzled by the row (XOR of row % 8), so the tensor cores read each tile straight from shared
//   memory with no bank conflicts. Mbarriers say when a stage is full (producer -> consumers) and empty.
// - two consumers of 64 query rows each. The queries sit in shared memory in a K tile's layout (S = Q K^T,
//   wgmma m64n128k16, both operands K-major); P, converted from S's accumulators (their layout is the A
//   operand's), is the register A operand of O += P V (V transposed). Each consumer overlaps the softmax
//   of tile t with its P V of tile t - 1, and the two take turns on the tensor cores (named barriers), so
//   one's GEMMs run under the other's softmax.
// setmaxnreg moves registers from the producer (56) to the consumers (224).
#include "attention.cuh"

namespace prefill_sm90 {

using namespace attention;
constexpr int WARPGROUPS = 2;          // consumers: 64 query rows each
constexpr int THREADS = (WARPGROUPS + 1) * 128;  // and the producer
constexpr int COPIERS = 128;           // the producer's threads
constexpr int ROWS = WARPGROUPS * 64;  // query rows per CTA
constexpr int TILE = 128;              // keys per pipeline stage; plan() splits in multiples of it
static_assert(ROWS == TILE, "the Q tile is laid out as a K tile");

// A compile-time flag as a value: a generic lambda called with Flag<true>() and Flag<false>() is two copies.
template <bool B> struct Flag { static constexpr bool value = B; };
constexpr int ATOM_ROWS = 8;           // rows of one 1024-byte swizzle atom

template <int HEAD_DIM>
struct Shape {
  static constexpr int BLOCKS = HEAD_DIM / 64;             // 64-dim (128-byte) column blocks of a row
  static constexpr int BLOCK_BYTES = TILE * 128;           // one column block of a tile
  static constexpr int TILE_BYTES = BLOCKS * BLOCK_BYTES;  // K or V
  // A producer thread copies 16-byte chunk `vec` (of 8) of each column block of its rows, so that a pass of
  // the threads covers 16 rows: one page of 16 tokens, one page id and one address per row for both blocks.
  static constexpr int ROW_STEP = COPIERS / 8;             // rows one pass of the producer's threads covers
  static constexpr int CPT = TILE / ROW_STEP;              // rows per thread per tile
  static constexpr int KSTEPS = HEAD_DIM / 16;
};

// ------------------------------------------------------------------------------------------ sync

__device__ __forceinline__ void mbar_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
// Arrives once this thread's cp.async copies so far have landed (counted in the barrier's init count).
__device__ __forceinline__ void mbar_arrive_copies(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
  asm volatile("{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT_%=;\n}" :: "r"(bar), "r"(parity) : "memory");
}
// Named barriers 1 and 2: consumer 0 and 1's turn on the tensor cores (its 128 threads sync, the other's arrive).
__device__ __forceinline__ void turn_wait(int id) { asm volatile("bar.sync %0, 256;" :: "r"(id) : "memory"); }
__device__ __forceinline__ void turn_pass(int id) { asm volatile("bar.arrive %0, 256;" :: "r"(id) : "memory"); }

// ------------------------------------------------------------------------------------------ wgmma

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets (>> 4).
// Shared addresses are under 2^18, so the 14-bit address field holds addr >> 4 whole, and a descriptor moves
// by `bytes` with one add to its low word (desc_at): the compiler folds the constant offsets of a tile's
// instructions into that add instead of building each descriptor anew.
__device__ __forceinline__ unsigned long long smem_desc(u32 addr, u32 leading, u32 stride) {
  return (unsigned long long)(addr >> 4) | ((unsigned long long)(leading >> 4) << 16) |
         ((unsigned long long)(stride >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ unsigned long long desc_at(unsigned long long desc, u32 bytes) {
  return desc + (bytes >> 4);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory");
}

// Keeps the compiler from moving accesses of an accumulator across the asynchronous tensor-core work.
__device__ __forceinline__ void pin(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

#define PI_WGMMA_D32                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PI_WGMMA_OUTS(d)                                                                                   \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),           \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),         \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),         \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// d[64 x 64] (+)= a[64 x 16] (registers) * b[16 x 64] (shared memory, descriptor), fp32 accumulate.
// TRANS_B: b is stored N-major (V), else K-major (K). d's layout per warp (rows 16 w .. 16 w + 15): d[4j],
// d[4j+1] at row lane/4, columns 8j + 2(lane%4) + {0, 1}; d[4j+2], d[4j+3] at row lane/4 + 8.
#define PI_WGMMA_64X64(TYPE)                                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                              \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " PI_WGMMA_D32                 \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}"                                             \
               : PI_WGMMA_OUTS(d)                                                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B))
template <int TRANS_B>
__device__ __forceinline__ void wgmma_64x64(bf16, float (&d)[32], const u32 (&a)[4], unsigned long long desc,
                                            int accumulate) {
  PI_WGMMA_64X64("bf16");
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_64x64(fp16, float (&d)[32], const u32 (&a)[4], unsigned long long desc,
                                            int accumulate) {
  PI_WGMMA_64X64("f16");
}

// O += P V for both 64-dim column blocks of head dim 128 in one instruction per k-step (m64n128k16, V N-major:
// the leading byte offset steps from one column block to the next; measured 1-5% faster than two m64n64k16).
// d0, d1: the blocks' accumulators, each in the m64n64 layout above.
#define PI_WGMMA_D64                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "   \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "   \
  "%62, %63}"
#define PI_WGMMA_64X128_RS(TYPE)                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                              \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " PI_WGMMA_D64                \
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}"                                              \
               : PI_WGMMA_OUTS(d0), PI_WGMMA_OUTS(d1)                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
__device__ __forceinline__ void wgmma_64x128_trans(bf16, float (&d0)[32], float (&d1)[32], const u32 (&a)[4],
                                                   unsigned long long desc, int accumulate) {
  PI_WGMMA_64X128_RS("bf16");
}
__device__ __forceinline__ void wgmma_64x128_trans(fp16, float (&d0)[32], float (&d1)[32], const u32 (&a)[4],
                                                   unsigned long long desc, int accumulate) {
  PI_WGMMA_64X128_RS("f16");
}
// S = Q K^T for all 128 keys of a tile in one instruction per k-step (m64n128k16, both operands K-major in
// shared memory): Q's 64 x 16 slice is read once per k-step, not once per 64 keys (measured 0.3-4% faster
// than two m64n64k16). d0, d1: keys 0-63 and 64-127, each in the m64n64 layout above.
#define PI_WGMMA_64X128_SS(TYPE)                                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                              \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " PI_WGMMA_D64                \
               ", %64, %65, p, 1, 1, 0, 0;\n}"                                                             \
               : PI_WGMMA_OUTS(d0), PI_WGMMA_OUTS(d1)                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate))
__device__ __forceinline__ void wgmma_64x128_ss(bf16, float (&d0)[32], float (&d1)[32], unsigned long long desc_a,
                                                unsigned long long desc_b, int accumulate) {
  PI_WGMMA_64X128_SS("bf16");
}
__device__ __forceinline__ void wgmma_64x128_ss(fp16, float (&d0)[32], float (&d1)[32], unsigned long long desc_a,
                                                unsigned long long desc_b, int accumulate) {
  PI_WGMMA_64X128_SS("f16");
}

}  // namespace prefill_sm90

// STAGES and the dynamic shared memory ((STAGES * 2 + 1) * TILE_BYTES: the stages and the Q tile, + 1024 for
// alignment) are chosen by plan().
template <typename T, int HEAD_DIM, int GROUP, int PAGE_SIZE, bool SOFT_CAP, int STAGES, int MASK>
__global__ void __launch_bounds__(prefill_sm90::THREADS, 1)
prefill_sm90_kernel(const u16* __restrict__ q, i64 q_stride_tok, i64 q_stride_head,
                    const u16* __restrict__ k_cache, const u16* __restrict__ v_cache,
                    i64 page_stride, i64 token_stride, i64 head_stride,
                    int num_pages,  // unused here: decode.cu's bound on page ids (run() passes one argument list)
                    const int* __restrict__ page_ids, const attention::Item* __restrict__ items,
                    const int* __restrict__ num_items,
                    const unsigned char* __restrict__ mask_bits,
                    u16* __restrict__ out, i64 out_stride_tok, i64 out_stride_head,
                    float* __restrict__ lse, float* __restrict__ partial_o, float* __restrict__ partial_lse,
                    int* __restrict__ counters, float qk_scale, float cap_log2, int window_left,
                    int merge_apart) {  // always 0 here: this kernel merges its own chunks
  using namespace prefill_sm90;
  typedef Shape<HEAD_DIM> S;
  static_assert(HEAD_DIM % 64 == 0 && HEAD_DIM <= 128, "whole 128-byte swizzle rows; registers for <= 128");
  static_assert(MASK != TREE, "tree masks are verification's (decode.cu)");
  static_assert(STAGES >= 2, "a stage filling while another is read");
  // Work w of the queue is item w / kv_heads (plan() puts the long ones first, so the CTAs that drew short
  // ones take more) for KV head w % kv_heads. CUDA-graph mode: any item count up to the buffers' capacity.
  const int kv_heads = gridDim.x, q_heads = kv_heads * GROUP, works = *num_items * kv_heads;
  int* const queue = counters;  // the first counter; the split chunks' follow
  ++counters;
  const int tid = threadIdx.x, lane = tid % 32, warp = (tid / 32) % 4;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform to the compiler: descriptors in uniform registers
  const int g = lane / 4, t4 = lane % 4;

  extern __shared__ unsigned char smem_raw[];
  const u32 smem0 = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024-byte aligned

  // The work being served, and g0: how many tiles this CTA streamed before it (the ring's position).
  Item it;
  Request rq;
  int kv_head, q_head0, row0, prefix, n_tiles;
  u32 g0 = 0;
  auto take = [&](const Item& item, int head) {
    it = item;
    rq = item.rq;
    kv_head = head;
    q_head0 = head * GROUP;
    row0 = it.row_block * ROWS;
    prefix = rq.kv_len - rq.qo_len;
    // Warp-uniform to the compiler (the item comes from shared memory), so that the ring's stages and
    // phases, and with them the descriptors, stay in uniform registers.
    n_tiles = __shfl_sync(0xffffffffu, (it.end - it.begin + TILE - 1) / TILE, 0);
  };
  auto stage = [&](int t) { return (g0 + t) % STAGES; };          // of the item's tile t
  auto phase = [&](int t) { return (int)((g0 + t) / STAGES) & 1; };  // of its stage's barriers

  // Copies: thread tid moves 16-byte chunk `vec` of each column block of rows crow0 + k * ROW_STEP of every
  // tile, K and V (block b's chunk at + b * BLOCK_BYTES in shared memory, + b * 128 bytes in global).
  const int vec = tid % 8, crow0 = tid % COPIERS / 8;
  const u32 chunk_off = crow0 * 128 + ((vec ^ (crow0 % ATOM_ROWS)) << 4);
  // Byte addresses (of the work's KV head), so that a row's address is one 32 x 32 -> 64-bit multiply-add
  // on its page id (run() keeps the strides under 4 GiB).
  const char *k_head, *v_head;
  const u32 page_bytes = (u32)page_stride * 2u, token_bytes = (u32)token_stride * 2u;
  // The page id of each of the thread's rows of tile t, -1 past the item's end. With ROW_STEP a multiple
  // of PAGE_SIZE the rows' pages are consecutive entries of the table.
  auto fetch_pages = [&](int t, int (&pages)[S::CPT]) {
    const u32 first = it.begin + t * TILE + crow0;
    const int* ids = page_ids + it.row_start;
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      const u32 token = first + k * S::ROW_STEP;
      const u32 index = S::ROW_STEP % PAGE_SIZE == 0 ? first / PAGE_SIZE + k * (S::ROW_STEP / PAGE_SIZE)
                                                     : token / PAGE_SIZE;
      pages[k] = token < (u32)it.end ? __ldg(ids + index) : -1;
    }
  };
  // Tile t goes to stage(t).
  auto issue_tile = [&](int t, const int (&pages)[S::CPT]) {
    const u32 first = it.begin + t * TILE + crow0;
    const u32 k_dst = smem0 + stage(t) * 2 * S::TILE_BYTES + chunk_off;
#pragma unroll
    for (int k = 0; k < S::CPT; ++k) {
      // The slot in the page: the same for every row of the thread when ROW_STEP is a multiple of PAGE_SIZE.
      const u32 slot = (S::ROW_STEP % PAGE_SIZE == 0 ? first : first + k * S::ROW_STEP) % PAGE_SIZE * token_bytes;
      const unsigned long long off = (unsigned long long)(u32)max(pages[k], 0) * page_bytes + slot;
      // ROW_STEP is a multiple of 8: the swizzle of row crow0 + k * ROW_STEP is crow0's.
      const u32 d = k_dst + k * S::ROW_STEP * 128;
#pragma unroll
      for (int b = 0; b < S::BLOCKS; ++b) {
        cp_async16_page(d + b * S::BLOCK_BYTES, k_head + off + b * 128, pages[k]);
        cp_async16_page(d + b * S::BLOCK_BYTES + S::TILE_BYTES, v_head + off + b * 128, pages[k]);
      }
    }
  };

  // full[STAGES], empty[STAGES], then q_full and q_free (the Q tile's, once per item)
  __shared__ __align__(8) unsigned long long bars[2 * STAGES + 2];
  // The CTA's work k at [k % 2] for the consumers (req -1: none is left), written before q_full's phase k
  // completes; work_at: its queue position, for the producer's threads.
  __shared__ Item item_at[2];
  __shared__ int head_at[2], work_at[2];
  const u32 full0 = smem_addr(bars), empty0 = full0 + 8 * STAGES, q_full = empty0 + 8 * STAGES, q_free = q_full + 8;
  if (tid == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full0 + 8 * st, COPIERS);            // every producer thread, once its copies landed
      mbar_init(empty0 + 8 * st, WARPGROUPS * 128);  // every consumer thread, once its P V read the stage
    }
    mbar_init(q_full, COPIERS + 1);  // and the producer thread that wrote item_at
    mbar_init(q_free, WARPGROUPS * 128);  // every consumer thread, once its last S = Q K^T of an item is done
  }
  __syncthreads();
  // The queries go to shared memory behind the stages, laid out as a K tile (rows = the CTA's query rows):
  // the A operand of S = Q K^T is read from there, which keeps the consumers' registers for the overlap.
  const u32 q_tile = smem0 + STAGES * 2 * S::TILE_BYTES;
  // The producer: per item its queries, once both consumers' last S of the item before is done, then each
  // tile once both consumers are done with the tile STAGES before it in the ring. Past the last item, q_full
  // completes once more with item_at's req -1, which ends the consumers' loop.
  if (wg == WARPGROUPS) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 56;");
    // One thread takes from the queue. Each CTA takes until it draws past the end, so the takes number
    // works + CTAs in all: the last one resets the queue for the next launch (or graph replay).
    const bool taker = tid == WARPGROUPS * 128;
    auto take_work = [&]() {
      const int w = atomicAdd(queue, 1);
      if (w == works + (int)(gridDim.x * gridDim.y) - 1) *queue = 0;
      return w;
    };
    auto producers_sync = []() { asm volatile("bar.sync 3, %0;" :: "n"(COPIERS) : "memory"); };
    // Query row r of an item (row_block * ROWS + its row: (token, head of the group), token-major) of a
    // request, for the group of query heads from head0.
    auto query_row = [&](const Request& request, int head0, int r) {
      return q + (i64)(request.qo_start + r / GROUP) * q_stride_tok + (i64)(head0 + r % GROUP) * q_stride_head;
    };
    // Work w's queries to L2 (the taker's warp), while the consumers finish the item before: its Q tile is
    // copied only once their last S of that item is done, and from DRAM the copy's latency showed at the
    // start of every short item.
    auto prefetch_queries = [&](int w) {
      if (w >= works) return;
      const Item item = items[w / kv_heads];
      const int head0 = w % kv_heads * GROUP;
      for (int j = lane; j < ROWS; j += 32) {
        const int r = item.row_block * ROWS + j;
        if (r / GROUP >= item.rq.qo_len) break;
        const u16* row = query_row(item.rq, head0, r);
#pragma unroll
        for (int b = 0; b < HEAD_DIM / 64; ++b) asm volatile("prefetch.global.L2 [%0];" :: "l"(row + b * 64));
      }
    };
    if (taker) work_at[0] = take_work();
    producers_sync();
    int w = work_at[0];
    for (int k = 0;; ++k) {
      const bool done = w >= works;
      int pages[S::CPT];
      // The item loads while the consumers finish the item before. item_at[k % 2] held item k - 2, which the
      // consumers read before q_free's phase k - 2 completed (this thread waited for it).
      if (done) {
        if (taker) item_at[k % 2].req = -1;
      } else {
        const Item item = items[w / kv_heads];
        if (taker) {
          item_at[k % 2] = item;
          head_at[k % 2] = w % kv_heads;
        }
        take(item, w % kv_heads);
        const i64 head_off = (i64)kv_head * head_stride + vec * 8;
        k_head = reinterpret_cast<const char*>(k_cache + head_off);
        v_head = reinterpret_cast<const char*>(v_cache + head_off);
      }
      if (k > 0) mbar_wait(q_free, (k - 1) & 1);
      if (!done) {
        if (n_tiles > 0) fetch_pages(0, pages);
#pragma unroll
        for (int j = 0; j < S::CPT; ++j) {
          const int r = row0 + crow0 + j * S::ROW_STEP;
          const bool ok = r / GROUP < rq.qo_len;
          const u16* src = ok ? query_row(rq, q_head0, r) : q;
#pragma unroll
          for (int b = 0; b < S::BLOCKS; ++b)
            cp_async16(q_tile + chunk_off + j * S::ROW_STEP * 128 + b * S::BLOCK_BYTES, src + vec * 8 + b * 64, ok);
        }
      }
      mbar_arrive_copies(q_full);
      if (taker) mbar_arrive(q_full);  // releases its stores to item_at and head_at
      if (done) break;
      const int next = taker ? take_work() : 0;  // its latency passes in the tiles' copies
      for (int t = 0; t < n_tiles; ++t) {
        if (g0 + t >= STAGES) mbar_wait(empty0 + 8 * stage(t), phase(t) ^ 1);
        issue_tile(t, pages);
        mbar_arrive_copies(full0 + 8 * stage(t));
        if (t + 1 < n_tiles) fetch_pages(t + 1, pages);  // its latency passes in the next wait
      }
      g0 += n_tiles;
      if (taker) work_at[(k + 1) % 2] = next;
      if (warp == 0) prefetch_queries(__shfl_sync(0xffffffffu, next, 0));
      producers_sync();
      w = work_at[(k + 1) % 2];
    }
    cp_async_wait<0>();
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 224;");

  // This thread's two rows of the item (g and g + 8 of its warp's 16): query token and head of each; the
  // keys its warpgroup's rows may see (the first and last of their query tokens bound the causal diagonal
  // and the window, so tiles wholly inside need no per-element mask); and (custom mask) each row sees every
  // key in [run.x, run.y) (plan() puts this table of q's rows before the masks), so a tile inside both runs
  // needs no mask words: most tiles of a causal-like mask.
  int tok[2], head[2], wg_tok_lo, wg_tok_hi;
  bool real[2];
  int2 run[2];
  auto take_rows = [&]() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + wg * 64 + warp * 16 + g + 8 * h;
      tok[h] = r / GROUP;
      head[h] = r % GROUP;
      real[h] = tok[h] < rq.qo_len;
      run[h] = MASK == CUSTOM && real[h] ? reinterpret_cast<const int2*>(mask_bits)[rq.qo_start + tok[h]]
                                         : make_int2(0, 0x7fffffff);
    }
    wg_tok_lo = (row0 + wg * 64) / GROUP;
    wg_tok_hi = (row0 + wg * 64 + 63) / GROUP;
  };
  float o[S::BLOCKS][32], m[2], l[2];

  auto k_tile = [&](int t) { return smem0 + stage(t) * 2 * S::TILE_BYTES; };
  // Byte offset of k-step kk (16 dims) of the 64 rows from `row` in a K-major tile (the Q tile or a K tile).
  auto k_major = [](int row, int kk) { return (kk / 4) * S::BLOCK_BYTES + row * 128 + (kk % 4) * 32; };
  const unsigned long long q_desc = smem_desc(q_tile + wg * 64 * 128, 16, 1024);
  // S = Q K^T for tile t: HEAD_DIM / 16 k-steps of 32 bytes inside a 128-byte row each, all 128 keys per
  // k-step; this warpgroup's 64 query rows of the Q tile.
  auto issue_qk = [&](int t, float (&s)[2][32]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) pin(s[half]);
    const unsigned long long k_desc = smem_desc(k_tile(t), 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < S::KSTEPS; ++kk)
      wgmma_64x128_ss(T(), s[0], s[1], desc_at(q_desc, k_major(0, kk)), desc_at(k_desc, k_major(0, kk)), kk > 0);
    wgmma_commit();
  };
  // O += P V for tile t: per k-step 16 keys (two 1024-byte atoms of rows), per 64-dim column block a wgmma.
  auto issue_pv = [&](int t, const u32 (&pa)[TILE / 16][4]) {
#pragma unroll
    for (int b = 0; b < S::BLOCKS; ++b) pin(o[b]);
    const unsigned long long v_desc = smem_desc(k_tile(t) + S::TILE_BYTES, S::BLOCK_BYTES, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < TILE / 16; ++kk) {
      if constexpr (S::BLOCKS == 2)
        wgmma_64x128_trans(T(), o[0], o[1], pa[kk], desc_at(v_desc, kk * 16 * 128), 1);
      else
        wgmma_64x64<1>(T(), o[0], pa[kk], desc_at(v_desc, kk * 16 * 128), 1);
    }
    wgmma_commit();
  };
  // Custom mask: tile t's 128 bits of each of the thread's rows as four words, bit k = key first + k.
  // (plan() pads the mask buffer, so the words past a row's last bit are readable.)
  auto load_bits = [&](int t, u32 (&bits)[2][4]) {
    const u32* words = reinterpret_cast<const u32*>(mask_bits);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const i64 bit0 = (i64)rq.mask_offset * 8 + (i64)tok[h] * rq.kv_len + it.begin + t * TILE;
      const int shift = bit0 & 31;
      u32 w[5];
#pragma unroll
      for (int i = 0; i < 5; ++i) w[i] = real[h] ? __ldg(words + (bit0 >> 5) + i) : 0u;
#pragma unroll
      for (int i = 0; i < 4; ++i) bits[h][i] = __funnelshift_r(w[i], w[i + 1], shift);
    }
  };
  // Custom mask: whether tile t is inside both of the thread's rows' runs of visible keys.
  auto in_runs = [&](int t) {
    const int first = it.begin + t * TILE, last = min(first + TILE, it.end) - 1;
    return first >= run[0].x && last < run[0].y && first >= run[1].x && last < run[1].y;
  };
  // Whether this thread's rows see every key of a tile by the custom mask words `bits`.
  auto all_ones = [&](const u32 (&bits)[2][4]) {
    u32 all = ~0u;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) all &= real[h] ? bits[h][i] : ~0u;
    return all == ~0u;
  };
  // Whether tile t needs the per-element mask in this warp: past the item's end, across the causal
  // diagonal or the window start of its warpgroup's rows, or (custom mask) a row of the warp not seeing all
  // of it (`ones`: all_ones of this thread's rows).
  auto is_edge = [&](int t, bool ones) {
    const int first = it.begin + t * TILE;
    const bool edge = first + TILE > it.end || (MASK == CAUSAL && first + TILE - 1 > prefix + wg_tok_lo) ||
                      (window_left >= 0 && first < prefix + wg_tok_hi - window_left);
    return MASK == CUSTOM ? !__all_sync(0xffffffffu, !edge && ones) : edge;  // one softmax copy per warp
  };
  // Masks, online softmax in base 2 and P = exp2(S - max) in place of tile t's S; updates m and l and
  // returns in `rescale` the factor the output rows must take before this tile's P V. `edge` (Flag<true>
  // or Flag<false>) makes two copies: the tiles inside the mask carry no masking instructions at all. The
  // scale goes into the max and the exponent's FFMA rather than a multiply per element (without soft cap).
  auto softmax = [&](auto edge, int t, float (&s)[2][32], float (&rescale)[2], const u32 (&bits)[2][4]) {
    pin(s[0]);
    pin(s[1]);
    const int first = it.begin + t * TILE;
    const float scale = SOFT_CAP ? 1.f : qk_scale;  // what s must still be multiplied by
    u32 own[2][4];  // the mask words shifted to this thread's first key: each element's bit at a fixed place
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int w = 0; w < 4; ++w) own[h][w] = bits[h][w] >> (2 * t4);
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        float x = s[half][i];
        if (SOFT_CAP) x = cap_log2 * (1.f - 2.f / (1.f + fast_exp2(x * qk_scale * 2.885390081777927f)));  // tanh
        if (decltype(edge)::value) {
          const int key = first + half * 64 + 8 * (i / 4) + 2 * t4 + (i & 1), h = (i / 2) & 1;
          bool visible = key < it.end && (window_left < 0 || key >= prefix + tok[h] - window_left);
          if (MASK == CAUSAL) visible = visible && key <= prefix + tok[h];
          if (MASK == CUSTOM)  // key - first = 64 half + 8 j + 2 t4 + e: word 2 half + j / 4 (static)
            visible = visible && ((own[h][2 * half + i / 16] >> (8 * ((i / 4) % 4) + (i & 1))) & 1u);
          x = visible ? x : NEG_INF;
        }
        s[half][i] = x;
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = NEG_INF;
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[half][4 * j + 2 * h], s[half][4 * j + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx * scale);  // scale > 0: the max of the scaled row
      const float base = m_new == NEG_INF ? 0.f : m_new;  // no (-inf) - (-inf) before any visible key
      rescale[h] = fast_exp2(m[h] - base);
      m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(s[half][4 * j + 2 * h + e], scale, -base));
            s[half][4 * j + 2 * h + e] = p;
            sum += p;
          }
      l[h] = l[h] * rescale[h] + sum;
    }
  };
  // P (in s) as the A fragments of P V: k-step kk covers keys 16 kk .. 16 kk + 15, the n8 column groups
  // 2 kk and 2 kk + 1 of S.
  auto pack_p = [&](const float (&s)[2][32], u32 (&pa)[TILE / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < TILE / 16; ++kk) {
      const float* c = s[kk / 4] + 8 * (kk % 4);
      pa[kk][0] = Half<T>::pack2(c[0], c[1]);
      pa[kk][1] = Half<T>::pack2(c[2], c[3]);
      pa[kk][2] = Half<T>::pack2(c[4], c[5]);
      pa[kk][3] = Half<T>::pack2(c[6], c[7]);
    }
  };
  auto rescale_o = [&](const float (&rescale)[2]) {
#pragma unroll
    for (int b = 0; b < S::BLOCKS; ++b)
#pragma unroll
      for (int i = 0; i < 32; ++i) o[b][i] *= rescale[(i / 2) & 1];
  };
  float s[2][32], rescale[2];
  u32 pa[TILE / 16][4];
  u32 bits[2][4], next_bits[2][4];  // custom mask words of tiles t and t + 1 (loaded a tile ahead)
  bool ones = false;
  // Tile t landed (the producer's copies); its custom mask words move up and tile t + 1's start to load.
  auto arrive = [&](int t) {
    mbar_wait(full0 + 8 * stage(t), phase(t));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async writes -> tensor-core reads
    if (MASK == CUSTOM) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) bits[h][i] = next_bits[h][i];
      ones = in_runs(t) || all_ones(bits);
      // Tile t's words are read again (from L1) only where its softmax masks per element, so the words of
      // two tiles are not held through the softmax (registers).
      if (t + 1 < n_tiles && !in_runs(t + 1)) load_bits(t + 1, next_bits);
    }
  };
  // Tile t: in this consumer's turn, S = Q K^T and the P V of tile t - 1 go to the tensor cores together,
  // then the turn passes to the other consumer, whose GEMMs run under this one's softmax. The softmax of S
  // runs while the P V does; then stage t - 1 is released, the output takes tile t's rescale and P becomes
  // the next A. The turns run on across items.
  if (wg == 1) turn_pass(1);  // consumer 0 starts
  for (int k = 0;; ++k) {
    mbar_wait(q_full, k & 1);  // (arrive's proxy fence covers the Q tile too)
    if (item_at[k % 2].req < 0) break;
    take(item_at[k % 2], head_at[k % 2]);
    take_rows();
#pragma unroll
    for (int b = 0; b < S::BLOCKS; ++b)
#pragma unroll
      for (int i = 0; i < 32; ++i) o[b][i] = 0.f;
    m[0] = m[1] = NEG_INF;
    l[0] = l[1] = 0.f;
    if (MASK == CUSTOM && n_tiles > 0 && !in_runs(0)) load_bits(0, next_bits);
    if (n_tiles > 0) arrive(0);
    for (int t = 0; t < n_tiles; ++t) {
      turn_wait(1 + wg);
      issue_qk(t, s);
      if (t > 0) {  // issue and wait in one branch: ptxas serializes wgmma across a join (C7514)
        issue_pv(t - 1, pa);
        turn_pass(2 - wg);
        wgmma_wait<1>();  // S; P V runs on
      } else {
        turn_pass(2 - wg);
        wgmma_wait<0>();
      }
      if (t + 1 == n_tiles) mbar_arrive(q_free);  // the item's last S has read the Q tile
      if (is_edge(t, ones)) {
        if (MASK == CUSTOM) load_bits(t, bits);
        softmax(Flag<true>(), t, s, rescale, bits);
      } else {
        softmax(Flag<false>(), t, s, rescale, bits);
      }
      wgmma_wait<0>();
      if (t > 0) mbar_arrive(empty0 + 8 * stage(t - 1));
      rescale_o(rescale);
      pack_p(s, pa);
      if (t + 1 < n_tiles) arrive(t + 1);
    }
    turn_wait(1 + wg);  // the last tile's P V
    if (n_tiles > 0) {
      issue_pv(n_tiles - 1, pa);
      turn_pass(2 - wg);
      wgmma_wait<0>();
      mbar_arrive(empty0 + 8 * stage(n_tiles - 1));
    } else {
      mbar_arrive(q_free);
      turn_pass(2 - wg);
    }
#pragma unroll
    for (int b = 0; b < S::BLOCKS; ++b) pin(o[b]);
    g0 += n_tiles;

    // Row sums over the quad that shares a row, then this thread's output columns of rows g and g + 8.
    const bool whole = it.slot < 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
      if (!real[h]) continue;
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f, lse2 = l[h] > 0.f ? m[h] + __log2f(l[h]) : NEG_INF;
      const int row = wg * 64 + warp * 16 + g + 8 * h;
      const int token = rq.qo_start + tok[h], qh = q_head0 + head[h];
      if (whole) {
        u16* dst = out + (i64)token * out_stride_tok + (i64)qh * out_stride_head + 2 * t4;
#pragma unroll
        for (int b = 0; b < S::BLOCKS; ++b)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            *reinterpret_cast<u32*>(dst + b * 64 + 8 * j) = Half<T>::pack2(o[b][4 * j + 2 * h] * inv, o[b][4 * j + 2 * h + 1] * inv);
        if (lse != nullptr && t4 == 0) lse[(i64)token * q_heads + qh] = lse2 * LN2;
      } else {
        const i64 at = partial_row<ROWS>(it.slot, kv_head, kv_heads, row);
        float* dst = partial_o + at * HEAD_DIM + 2 * t4;
#pragma unroll
        for (int b = 0; b < S::BLOCKS; ++b)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            *reinterpret_cast<float2*>(dst + b * 64 + 8 * j) = make_float2(o[b][4 * j + 2 * h] * inv, o[b][4 * j + 2 * h + 1] * inv);
        if (t4 == 0) partial_lse[at] = lse2;
      }
    }
    constexpr int MERGERS = WARPGROUPS * 128;  // the producer does not take part
    if (!whole && last_chunk<MERGERS>(it, counters, kv_head, kv_heads))
      merge_chunks<T, ROWS, HEAD_DIM, GROUP, MERGERS>(it, rq, row0, 0, min(ROWS, rq.qo_len * GROUP - row0) * HEAD_DIM / 4,
                                                      kv_head, kv_heads, partial_o, partial_lse, out, out_stride_tok,
                                                      out_stride_head, lse);
  }
  if (wg == 0) turn_wait(1);  // consumer 1's last pass
}
