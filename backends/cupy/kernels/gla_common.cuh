// Pieces every glakernels CUDA kernel shares: the launch parameters, 16-bit float
// conversions, barriers and shuffles.
//
// No CUDA header is included on purpose: NVRTC (which CuPy runs on the GPU machine) ships
// without the toolkit headers, and nvcc (which CI runs) must accept the very same text. The
// few intrinsics needed are written as inline PTX. When GLA_EMULATION is defined, the
// test-suite's CPU emulator supplies the same functions (tests/cuda_emulator/).
#pragma once

namespace gla {

typedef unsigned long long u64;
typedef long long i64;

// 16-bit storage types, converted by hand so that no cuda_fp16.h / cuda_bf16.h is needed.
struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

// Every kernel takes the same parameters, listed once here (an X-macro) and read by the
// Python launcher (backends/cupy/_sources.py) so the two sides cannot drift apart. Tensors
// travel as raw device addresses; all are contiguous. Absent tensors are 0.
//
//   inputs   q, k, g, g_rev: [B, T, H, K]; v, dout: [B, T, H, V]            (element type T)
//   outputs  o, dv: [B, T, H, V]; dq, dk, dg, dg_rev: [B, T, H, K]             (element type T)
//   states   s0, ds_final, s_final, ds0: [B, H, K, V]                          (float32)
//   scratch  a_ws, dg_ws: [directions, B, T, H, K]; final_term: [B, H, K];
//            enter: [B*H, 2, N, K, V]; decay: [B*H, 2, N, K]; dg_total: [B*H, 2, N, K]
//
//   flags    [B*H][kFlagSlots] int32: sequences the tensor-core backward leaves to the sweeps
//            (gla_chunk_backward.cu); a sweep given flags runs only the flagged ones
//   park     [B*H*N][2][chunk_len][K] float32: the fused adjoint walk's dk hand-over between
//            the two directions of a bidirectional block (gla_chunk_backward.cu)
//
// `scale` arrives already halved for bidirectional calls (the two directions are averaged).
// `chunk_len` / `n_chunks` cut time into N chunks that separate blocks sweep in parallel
// (N = 1: one block walks the whole sequence). `lambda_scan` selects, in the state scan,
// the adjoint (reverse-time) recurrence instead of the state one.
#define GLA_PARAM_FIELDS(X)                                                        \
  X(u64, q) X(u64, k) X(u64, v) X(u64, g) X(u64, g_rev) X(u64, dout)              \
  X(u64, o) X(u64, dq) X(u64, dk) X(u64, dv) X(u64, dg) X(u64, dg_rev)            \
  X(u64, s0) X(u64, ds_final) X(u64, s_final) X(u64, ds0)                         \
  X(u64, a_ws) X(u64, dg_ws) X(u64, final_term) X(u64, enter) X(u64, decay)       \
  X(u64, dg_total) X(u64, flags) X(u64, park)                                     \
  X(i64, B) X(i64, T) X(i64, H) X(i64, K) X(i64, V)                               \
  X(i64, chunk_len) X(i64, n_chunks) X(i64, bidirectional) X(i64, lambda_scan)   \
  X(float, scale)

#define GLA_DECLARE_FIELD(type, name) type name;
struct Params {
  GLA_PARAM_FIELDS(GLA_DECLARE_FIELD)
};
#undef GLA_DECLARE_FIELD

// Kernel signature: `__global__ void kernel(GLA_KERNEL_PARAMS)`: the whole Params struct is
// the one argument, by value (it lives in the kernel's parameter space, as separate
// arguments did). One argument rather than 35 because the host packs it once: CuPy
// converts every argument of a launch on its own, ~24 us a launch for 35 of them against
// ~9 for one struct on the H200 machine of NOTES.md (session 29).
#define GLA_KERNEL_PARAMS const ::gla::Params p

constexpr int kFlagSlots = 4;  // per (batch, head): one per warp of gla_chunk_backward_dq

// whether the tensor-core backward flagged sequence bh (`flags` as in Params)
__device__ __forceinline__ bool flagged(u64 flags, long long bh) {
  const int* f = reinterpret_cast<const int*>(flags) + bh * kFlagSlots;
  return (f[0] | f[1] | f[2] | f[3]) != 0;
}

// 16 bytes, 16-byte aligned: shared-memory rows are read four floats at a time
struct alignas(16) Float4 { float x, y, z, w; };

template <class T>
__device__ __forceinline__ const T* in_ptr(u64 address) { return reinterpret_cast<const T*>(address); }
template <class T>
__device__ __forceinline__ T* out_ptr(u64 address) { return reinterpret_cast<T*>(address); }

}  // namespace gla

#if defined(GLA_EMULATION)
// The CPU emulator defines float conversions, barriers, shuffles and dynamic shared memory.
#include "gla_emulation.h"
#else
namespace gla {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x.bits));
  return r;
}

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
  return r;
}

// Barrier `id` over `count` threads (whole warps): lets the two direction groups of a block
// stage their own tokens without waiting for each other. Id 0 is __syncthreads' barrier.
__device__ __forceinline__ void group_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;" : : "r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ float shfl_xor(float x, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}

__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ Float4 gla_dynamic_smem_[];  // the element type makes it 16-byte aligned
  return reinterpret_cast<unsigned char*>(gla_dynamic_smem_);
}

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
  unsigned r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

__device__ __forceinline__ void fail_launch() { __trap(); }

}  // namespace gla
#endif
