// The device functions gla_common.cuh expects (conversions, barriers, shuffles, dynamic
// shared memory), implemented for the CPU emulator. Each CUDA thread of a block is an OS
// thread; barriers are std::barrier; a warp shuffle is a store, a warp barrier and a load.
#pragma once

namespace gla {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = ldexpf(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

template <class T> T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {  // round to nearest even
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <> inline f16 from_float<f16>(float x) {  // round to nearest even
  const uint32_t u = float_to_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u, magnitude = u & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return f16{uint16_t(sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (magnitude >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};
  if (magnitude < 0x38800000u) {  // subnormal half: units of 2^-24, scaling is exact
    return f16{uint16_t(sign | uint32_t(nearbyintf(bits_to_float(magnitude) * 16777216.0f)))};
  }
  const uint32_t mantissa = magnitude & 0x7fffffu;
  uint32_t h = (((magnitude >> 23) - 112u) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
  return f16{uint16_t(sign | h)};
}

void group_sync(int id, int count);
float shfl_xor(float x, int lane_mask);
// every lane's `words` words, lane by lane (a warp-collective call, like a shuffle)
void warp_exchange(const uint32_t* mine, int words, uint32_t* all);
unsigned char* dynamic_smem();
unsigned dynamic_smem_bytes();
[[noreturn]] void fail_launch();


// The warp-matrix functions of gla_warp_matrix.cuh, with the PTX fragment layouts (lane =
// 4 r + c). The product sums in float32 in column order; the tensor cores' accumulation
// order differs, which the tests' bounds absorb.
typedef unsigned int u32;

inline float u32_as_float(u32 x) { return bits_to_float(x); }

inline float bf16_half(u32 word, int half) { return bits_to_float(half ? (word & 0xffff0000u) : (word << 16)); }

inline float f16_half(u32 word, int half) { return to_float(f16{uint16_t(half ? (word >> 16) : (word & 0xffffu))}); }

template <class Decode>
inline void mma_16x8x16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, Decode decode);

inline void mma_bf16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_16x8x16(d, a, b0, b1, bf16_half); }
inline void mma_f16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) { mma_16x8x16(d, a, b0, b1, f16_half); }

template <class Decode>
inline void mma_16x8x16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, Decode bf16_half) {
  const u32 mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  u32 all[32 * 6];
  warp_exchange(mine, 6, all);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int r = l / 4, c = l % 4;
    const u32* w = all + 6 * l;
    for (int e = 0; e < 2; ++e) {
      A[r][2 * c + e] = bf16_half(w[0], e);
      A[r + 8][2 * c + e] = bf16_half(w[1], e);
      A[r][2 * c + 8 + e] = bf16_half(w[2], e);
      A[r + 8][2 * c + 8 + e] = bf16_half(w[3], e);
      B[2 * c + e][r] = bf16_half(w[4], e);
      B[2 * c + 8 + e][r] = bf16_half(w[5], e);
    }
  }
  const int lane = int(threadIdx.x % 32), r = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = r + 8 * (e / 2), col = 2 * c + e % 2;
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += A[row][i] * B[i][col];
    d[e] += sum;
  }
}

inline u32 transpose8x8(u32 x) {
  u32 all[32];
  warp_exchange(&x, 1, all);
  const int lane = int(threadIdx.x % 32), r = lane / 4, c = lane % 4;
  // element (row, col) of the 8 x 8 matrix sits in lane 4 row + col / 2, half col % 2
  auto element = [&](int row, int col) -> u32 {
    const u32 w = all[4 * row + col / 2];
    return (col % 2) ? (w >> 16) : (w & 0xffffu);
  };
  return element(2 * c, r) | (element(2 * c + 1, r) << 16);
}

inline u32 pack_bf16x2(float first, float second) {
  return u32(from_float<bf16>(first).bits) | (u32(from_float<bf16>(second).bits) << 16);
}

inline u32 pack_f16x2(float first, float second) {
  return u32(from_float<f16>(first).bits) | (u32(from_float<f16>(second).bits) << 16);
}
inline float low_f16(u32 w) { return f16_half(w, 0); }
inline float high_f16(u32 w) { return f16_half(w, 1); }

inline float shfl_idx(float x, int src_lane) {
  u32 mine = float_to_bits(x), all[32];
  warp_exchange(&mine, 1, all);
  return bits_to_float(all[src_lane & 31]);
}

inline bool warp_any(bool predicate) {
  u32 mine = predicate ? 1u : 0u, all[32];
  warp_exchange(&mine, 1, all);
  for (u32 x : all)
    if (x) return true;
  return false;
}

inline float exp2_approx(float x) { return exp2f(x); }

inline void shared_add(float* address, float x) { *address += x; }  // fibers switch only at barriers

inline void block_sync() { group_sync(0, int(blockDim.x)); }

}  // namespace gla

