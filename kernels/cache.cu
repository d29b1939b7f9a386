// KV-cache maintenance: appending new K/V rows into pages, and turning a block table into a CSR page table.
#include "common.cuh"

// Row n of k_new/v_new goes to page slots[n] / page_size, offset slots[n] % page_size; a negative slot is
// padding and is skipped. One thread moves one VEC-byte piece of one (token, head) row of K and of V.
// Strides are in bytes so that one kernel serves NHD, HND and any strided view.
template <typename Slot, int VEC>
__global__ void append_kv(const char* __restrict__ k_new, const char* __restrict__ v_new,
                          i64 k_token_stride, i64 k_head_stride, i64 v_token_stride, i64 v_head_stride,
                          char* __restrict__ k_cache, char* __restrict__ v_cache,
                          i64 page_stride, i64 token_stride, i64 head_stride,
                          const Slot* __restrict__ slots, int num_tokens, int heads, int row_bytes,
                          int page_size) {
  typedef typename Bytes<VEC>::T Piece;
  allow_next_kernel();  // the attention kernel after it may start meanwhile, and waits in turn
  wait_for_previous_kernel();
  const int pieces = row_bytes / VEC;
  const i64 total = (i64)num_tokens * heads * pieces;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
    const int piece = (int)(i % pieces);
    const int head = (int)((i / pieces) % heads);
    const int token = (int)(i / ((i64)pieces * heads));
    const i64 slot = (i64)slots[token];
    if (slot < 0) continue;
    const i64 k_src = token * k_token_stride + head * k_head_stride + (i64)piece * VEC;
    const i64 v_src = token * v_token_stride + head * v_head_stride + (i64)piece * VEC;
    const i64 dst = (slot / page_size) * page_stride + (slot % page_size) * token_stride +
                    head * head_stride + (i64)piece * VEC;
    *reinterpret_cast<Piece*>(k_cache + dst) = *reinterpret_cast<const Piece*>(k_new + k_src);
    *reinterpret_cast<Piece*>(v_cache + dst) = *reinterpret_cast<const Piece*>(v_new + v_src);
  }
}

// One block per request: it sums the page counts of the requests before it (no inter-block dependency, so
// one launch and no sync), writes its CSR offset and last-page length, and copies its used block ids.
__global__ void csr_from_block_table(const int* __restrict__ block_table, i64 row_stride,
                                     const int* __restrict__ seq_lens, int batch, int page_size,
                                     int* __restrict__ indptr, int* __restrict__ indices,
                                     int* __restrict__ last_page_len) {
  allow_next_kernel();
  wait_for_previous_kernel();
  const int b = blockIdx.x;
  int before = 0;
  for (int r = threadIdx.x; r < b; r += blockDim.x) before += (seq_lens[r] + page_size - 1) / page_size;
  const int start = block_sum(before);
  const int len = seq_lens[b];
  const int pages = (len + page_size - 1) / page_size;
  if (threadIdx.x == 0) {
    indptr[b] = start;
    last_page_len[b] = pages > 0 ? len - (pages - 1) * page_size : 0;
    if (b == batch - 1) indptr[batch] = start + pages;
  }
  for (int p = threadIdx.x; p < pages; p += blockDim.x) indices[start + p] = block_table[b * row_stride + p];
}
