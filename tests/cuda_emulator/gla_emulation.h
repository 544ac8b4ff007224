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
unsigned char* dynamic_smem();
unsigned dynamic_smem_bytes();
[[noreturn]] void fail_launch();

}  // namespace gla
