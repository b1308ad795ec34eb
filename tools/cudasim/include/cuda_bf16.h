// __nv_bfloat16 for the emulated-GPU build: the top half of a float32, conversions
// with round-to-nearest-even as on a GPU (and as c10::BFloat16), NaN kept quiet.
#pragma once

#include <cstdint>
#include <cstring>

namespace cudasim {

inline uint16_t float_to_bfloat16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}

}  // namespace cudasim

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(cudasim::float_to_bfloat16_bits(f)) {}
  operator float() const { return cudasim::bfloat16_bits_to_float(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 must be two bytes, like at::BFloat16");

inline float __bfloat162float(__nv_bfloat16 b) { return cudasim::bfloat16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
