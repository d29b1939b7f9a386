// The few primitives every pagedinfer kernel uses. No CUDA headers are included (NVRTC compiles this in
// milliseconds): 16-bit floats travel as raw bits and are converted with single PTX instructions.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// Element-type tags: the kernels are templates over these.
struct bf16 {};
struct fp16 {};

template <typename T> struct Half;

template <> struct Half<bf16> {
  static constexpr bool COARSE = true;  // 8 significant bits: see the P.V remainder in decode.cu
  // bf16 is the top half of an fp32: widening is a shift.
  static __device__ __forceinline__ float2 unpack2(u32 x) {
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  }
  static __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

template <> struct Half<fp16> {
  static constexpr bool COARSE = false;  // 11 significant bits
  static __device__ __forceinline__ float2 unpack2(u32 x) {
    float lo, hi;
    asm("{.reg .f16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi) : "r"(x));
    return make_float2(lo, hi);
  }
  static __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

// ------------------------------------------------------------------------------------ launch

// Programmatic dependent launch (sm_90+; kernels/__init__.py launches these kernels with it). A no-op before
// sm_90 and without the launch attribute.
// The kernel after this one in the stream may be put on the GPU once every CTA of this one has called this:
// its CTAs then take the multiprocessors this kernel's CTAs leave, and wait (below) for this kernel to finish.
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Returns once the kernel before this one has finished and its writes are visible: a kernel launched early
// reads and writes nothing it depends on before this.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------ math

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
__device__ __forceinline__ int block_sum(int x) {
  __shared__ int partial[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < (blockDim.x >> 5) ? partial[lane] : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ------------------------------------------------------------------------------------ memory

// Copy units of N bytes: 16 for aligned rows, the element size otherwise.
template <int N> struct Bytes;
template <> struct Bytes<16> { typedef uint4 T; };
template <> struct Bytes<2> { typedef u16 T; };

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; with valid == false the destination is zero-filled. The L2
// is asked to fetch the whole 128-byte line: the neighbouring vectors are read by the same tile (measured on
// an H100: +3% decode bandwidth at large batch).
// `dst` as a shared-memory address (smem_addr), for kernels that lay tiles out by byte offset.
// (The zero fill is the instruction's ignore-src predicate: a source size of valid ? 16 : 0 costs a select
// and a compare per copy.)
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid = true) {
  asm volatile("{\n.reg .pred ignore;\nsetp.eq.u32 ignore, %2, 0;\n"
               "cp.async.cg.shared.global.L2::128B [%0], [%1], 16, ignore;\n}"
               :: "r"(dst), "l"(src), "r"((u32)valid) : "memory");
}
// The same, zero-filling where `page` (a page id, -1 for none) is negative: one compare in the instruction's
// predicate.
__device__ __forceinline__ void cp_async16_page(u32 dst, const void* src, int page) {
  asm volatile("{\n.reg .pred ignore;\nsetp.lt.s32 ignore, %2, 0;\n"
               "cp.async.cg.shared.global.L2::128B [%0], [%1], 16, ignore;\n}"
               :: "r"(dst), "l"(src), "r"(page) : "memory");
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid = true) {
  cp_async16(smem_addr(dst), src, valid);
}
// 4-byte global->shared copy (through L1: the only way cp.async moves 4 bytes), zero-filled unless valid.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("{\n.reg .pred ignore;\nsetp.eq.u32 ignore, %2, 0;\n"
               "cp.async.ca.shared.global [%0], [%1], 4, ignore;\n}"
               :: "r"(smem_addr(dst)), "l"(src), "r"((u32)valid) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

// ------------------------------------------------------------------------------------ tensor cores

// Four 8x8 b16 matrices from shared memory; lane i gives the address of row i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// The same, each matrix transposed (for an operand stored the other way round).
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulate (mma.sync m16n8k16, sm_80+).
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1);

template <> __device__ __forceinline__ void mma_16816<bf16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <> __device__ __forceinline__ void mma_16816<fp16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
