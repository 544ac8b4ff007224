// CUDA keywords and built-in variables for compiling glakernels' kernels as plain C++
// (g++/clang++, C++20) on a CPU. Included before the kernel sources.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct gla_emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
// set by the emulator before it resumes a thread (threads are fibers on one OS thread)
extern gla_emu_dim3 threadIdx;
extern gla_emu_dim3 blockIdx;
extern gla_emu_dim3 blockDim;
extern gla_emu_dim3 gridDim;
// CUDA's built-in vector types used by the kernels
struct uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
