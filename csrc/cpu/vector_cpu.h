// Element loops that the compiler vectorizes: the ISA clones they are compiled in, an exp without
// a library call, and row reductions over independent lanes. Their bodies are always inlined into
// the clone that calls them, so that all of it gets the clone's ISA.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include "common.h"

// The element loops are compiled twice on x86-64, for AVX2+FMA and for the
// baseline, and picked at load time: torch wheels run on both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REID_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define REID_EXT_CPU_CLONES
#endif
#if defined(__GNUC__)
#define REID_EXT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define REID_EXT_ALWAYS_INLINE inline
#endif

namespace reid_ext {
namespace cpu {

// exp(x) for float in a form the compiler vectorizes (no library call):
// x = n*ln2 + r with n rounded to nearest, exp(r) by Cephes' polynomial
// (about 2 ulp), 2^n built in the exponent bits. exp(-inf) = 0, NaN stays NaN;
// arguments above 88.7 (never produced here: they are max-shifted) saturate.
REID_EXT_ALWAYS_INLINE float vexp(float x) {
  const float clamped = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float shifted = clamped * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  const uint32_t scale_bits = static_cast<uint32_t>(n_bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return x < -87.0f ? 0.0f : poly * scale;
}

REID_EXT_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

// vexp as the exp argument of common.h's math (MathExp's counterpart).
struct VExp {
  template <typename T>
  REID_EXT_ALWAYS_INLINE T operator()(T v) const {
    return vexp(v);
  }
};

// Independent accumulators of a row reduction: a single running value is bound by the latency of
// each step (the compiler may not reorder float operations); 16 of them vectorize and pipeline,
// and the result is still the same on every run.
constexpr int kLanes = 16;

// max of v[0, n) as `v > m` ranks them: NaN is skipped; -inf when n = 0 or all are -inf or NaN.
template <typename T>
REID_EXT_ALWAYS_INLINE T lanes_max(const T* v, int64_t n) {
  T lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = neg_infinity<T>();
  const int64_t body = n - n % kLanes;
  for (int64_t c0 = 0; c0 < body; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = v[c0 + l] > lane[l] ? v[c0 + l] : lane[l];
  T m = neg_infinity<T>();
  for (int l = 0; l < kLanes; ++l) m = lane[l] > m ? lane[l] : m;
  for (int64_t c = body; c < n; ++c) m = v[c] > m ? v[c] : m;
  return m;
}

// The terms of the row sums below: v itself, or exp(v - shift) of a log-sum-exp shifted by its max.
struct Identity {
  template <typename T>
  REID_EXT_ALWAYS_INLINE T operator()(T v) const {
    return v;
  }
};

template <typename T>
struct ShiftedExp {
  T shift;
  REID_EXT_ALWAYS_INLINE T operator()(T v) const { return vexp(v - shift); }
};

// sum of f(v[c]) over v[0, n).
template <typename T, typename F>
REID_EXT_ALWAYS_INLINE T lanes_sum(const T* v, int64_t n, const F& f) {
  T lane[kLanes] = {};
  const int64_t body = n - n % kLanes;
  for (int64_t c0 = 0; c0 < body; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += f(v[c0 + l]);
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  for (int64_t c = body; c < n; ++c) sum += f(v[c]);
  return sum;
}

}  // namespace cpu
}  // namespace reid_ext
