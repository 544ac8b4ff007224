// Warp-level matrix pieces for the tensor-core kernels (sm_80 and newer): the bfloat16
// m16n8k16 product, the 8x8 in-register transpose, packing two floats into bfloat16 pairs,
// index shuffles and the warp vote. Written as inline PTX (no CUDA headers, see
// gla_common.cuh); the CPU emulator of the test-suite supplies the same functions with the
// same lane layouts (tests/cuda_emulator/gla_emulation.h), so the fragment bookkeeping of a
// kernel is checked on every CI run.
//
// Fragment layouts (PTX ISA, "matrix fragments for mma.m16n8k16"), lane = 4 r + c:
//   A (16 x 16, row major), four 32-bit words of two bfloat16 each (low half = lower column):
//     a0 = A[r][2c, 2c+1]   a1 = A[r+8][2c, 2c+1]   a2 = A[r][2c+8, 2c+9]   a3 = A[r+8][2c+8, 2c+9]
//   B (16 x 8, K x N), two words:  b0 = B[2c, 2c+1][r]   b1 = B[2c+8, 2c+9][r]
//   C (16 x 8, float32), four floats: c0, c1 = C[r][2c, 2c+1]   c2, c3 = C[r+8][2c, 2c+1]
// Two C tiles side by side (columns 0-7 and 8-15) hold a 16 x 16 block exactly as an A
// fragment wants it, and the transpose of an A fragment's word is a B fragment's word.
#pragma once

#include "gla_common.cuh"

namespace gla {

typedef unsigned int u32;

#if !defined(GLA_EMULATION)

__device__ __forceinline__ float u32_as_float(u32 x) { return __uint_as_float(x); }

// d += a * b (bfloat16 operands, float32 accumulation)
__device__ __forceinline__ void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b (float16 operands, float32 accumulation)
__device__ __forceinline__ void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// the word this lane holds of the transposed 8 x 8 16-bit matrix (same lane layout)
__device__ __forceinline__ u32 transpose8x8(u32 x) {
  u32 r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

// {bf16(first) in the low half, bf16(second) in the high half}, rounded to nearest even
__device__ __forceinline__ u32 pack_bf16x2(float first, float second) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
  return r;
}

// {f16(first) in the low half, f16(second) in the high half}, rounded to nearest even
__device__ __forceinline__ u32 pack_f16x2(float first, float second) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
  return r;
}

// the two float16 halves of a packed word, as floats
__device__ __forceinline__ float low_f16(u32 w) { return to_float(f16{(unsigned short)(w & 0xffffu)}); }
__device__ __forceinline__ float high_f16(u32 w) { return to_float(f16{(unsigned short)(w >> 16)}); }

__device__ __forceinline__ float shfl_idx(float x, int src_lane) { return __shfl_sync(0xffffffffu, x, src_lane); }

__device__ __forceinline__ bool warp_any(bool predicate) { return __any_sync(0xffffffffu, predicate); }

// 2^x (the MUFU unit; relative error ~2^-22, flushes subnormal results to zero)
__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void shared_add(float* address, float x) { atomicAdd(address, x); }

__device__ __forceinline__ void block_sync() { __syncthreads(); }

#endif

// the two bfloat16 halves of a packed word, as floats
__device__ __forceinline__ float low_bf16(u32 w) { return u32_as_float(w << 16); }
__device__ __forceinline__ float high_bf16(u32 w) { return u32_as_float(w & 0xffff0000u); }

// x ~ hi + lo with both parts bfloat16 (together ~2^-17 relative): the split that lets the
// bfloat16 tensor cores multiply float32 values to about float32 accuracy (hi*hi + hi*lo + lo*hi)
__device__ __forceinline__ void split_bf16x2(float first, float second, u32& hi, u32& lo) {
  hi = pack_bf16x2(first, second);
  lo = pack_bf16x2(first - low_bf16(hi), second - high_bf16(hi));
}

// What the tensor-core kernels need to know of a 16-bit input type
template <class E>
struct Half16;
template <>
struct Half16<bf16> {
  static constexpr bool kIsF16 = false;
  static constexpr u32 kOne = 0x3f80u;  // 1.0
  __device__ __forceinline__ static float low(u32 w) { return low_bf16(w); }
  __device__ __forceinline__ static float high(u32 w) { return high_bf16(w); }
  __device__ __forceinline__ static u32 pack(float first, float second) { return pack_bf16x2(first, second); }
  __device__ __forceinline__ static void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_bf16(d, a, b0, b1); }
};
template <>
struct Half16<f16> {
  static constexpr bool kIsF16 = true;
  static constexpr u32 kOne = 0x3c00u;  // 1.0
  __device__ __forceinline__ static float low(u32 w) { return low_f16(w); }
  __device__ __forceinline__ static float high(u32 w) { return high_f16(w); }
  __device__ __forceinline__ static u32 pack(float first, float second) { return pack_f16x2(first, second); }
  __device__ __forceinline__ static void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_f16(d, a, b0, b1); }
};

}  // namespace gla
