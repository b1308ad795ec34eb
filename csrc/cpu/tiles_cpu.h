// Building blocks of the CPU kernels: thread-local scratch, tiled dot products
// through the BLAS that torch ships, per-row inverse norms, a schedule of
// symmetric tile pairs, and element loops written so that the compiler
// vectorizes them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "common.h"

// The element loops are compiled twice on x86-64, for AVX2+FMA and for the
// baseline, and picked at load time: torch wheels run on both.
// Their bodies are always inlined into each clone, so that all of it gets the clone's ISA.
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

// Runs f(begin, end) over [0, count) with autograd out of the way in every
// worker thread: the tile GEMMs write into scratch tensors through out= ops.
template <typename F>
void parallel_over(int64_t count, const F& f) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    f(begin, end);
  });
}

// Rows per parallel task: enough tasks for every thread, as many rows as
// possible (up to 128) so that each BLAS call is large enough to be efficient.
inline int64_t anchor_block(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::min<int64_t>(128, std::max<int64_t>(16, (n + threads - 1) / threads));
}

// The pairs (I, J), I <= J, of nb blocks as rounds in which no block appears
// twice (the circle method, then the diagonal), so that a round's pairs can run
// in parallel while each writes to its own two blocks.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> tile_pair_rounds(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  const int64_t slots = nb % 2 == 0 ? nb : nb + 1;  // an odd count gets a bye slot
  for (int64_t r = 0; r + 1 < slots; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    for (int64_t k = 0; k < slots / 2; ++k) {
      const int64_t a = k == 0 ? slots - 1 : (r + k) % (slots - 1);
      const int64_t b = (r - k + slots - 1) % (slots - 1);
      if (a < nb && b < nb) round.emplace_back(std::min(a, b), std::max(a, b));
    }
    rounds.push_back(std::move(round));
  }
  std::vector<std::pair<int64_t, int64_t>> diagonal;
  for (int64_t i = 0; i < nb; ++i) diagonal.emplace_back(i, i);
  rounds.push_back(std::move(diagonal));
  return rounds;
}

// <a, b> with 8 independent partial sums in a fixed order: a single running sum is bound by
// the latency of each addition (the compiler may not reorder float additions); 8 of them
// vectorize and pipeline, and the result is still the same on every run.
template <typename scalar_t>
inline scalar_t dot_product(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t d) {
  constexpr int64_t kLanes = 8;
  scalar_t part[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[k + l] * b[k + l];
  }
  scalar_t tail = 0;
  for (; k < d; ++k) tail += a[k] * b[k];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

// out[i] = 1 / max(|x_i|, eps), and radial[i] = out[i]^2 where |x_i| > eps else 0
// (the normalization Jacobian has no radial part where the eps clamp is active).
template <typename scalar_t>
void inverse_norms(const at::Tensor& x, scalar_t eps, std::vector<scalar_t>& inv, std::vector<scalar_t>* radial) {
  const int64_t n = x.size(0), d = x.size(1);
  inv.resize(n);
  if (radial) radial->resize(n);
  const scalar_t* data = x.data_ptr<scalar_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = data + i * d;
      const scalar_t sq = dot_product(row, row, d);
      inv[i] = inverse_norm(sq, eps);
      if (radial) (*radial)[i] = math_sqrt(sq) > eps ? inv[i] * inv[i] : scalar_t(0);
    }
  });
}

// In place, p_i <- dL/da_i = inv_i * (p_i - an_i (an_i . p_i)) with an_i = inv_i a_i and
// p_i = dL/dan_i; where |a_i| <= eps (radial_scale 0) the clamp makes it inv_i * p_i.
template <typename scalar_t>
void normalization_backward(const at::Tensor& a, const std::vector<scalar_t>& inv,
                            const std::vector<scalar_t>& radial_scale, at::Tensor& p) {
  const int64_t d = a.size(1);
  const scalar_t* a_data = a.data_ptr<scalar_t>();
  scalar_t* out = p.data_ptr<scalar_t>();
  at::parallel_for(0, a.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t dot = dot_product(a_data + i * d, out + i * d, d);
      const scalar_t scale = inv[i], shrink = radial_scale[i] * inv[i] * dot;
      for (int64_t k = 0; k < d; ++k) out[i * d + k] = scale * out[i * d + k] - shrink * a_data[i * d + k];
    }
  });
}

// dots[r, c] = <a[a0 + r], b[b0 + c]> for a tile, written into scratch.
inline at::Tensor tile_dots(at::Tensor& scratch, const at::Tensor& a, int64_t a0, int64_t rows,
                            const at::Tensor& b, int64_t b0, int64_t cols) {
  at::Tensor dots = scratch.narrow(0, 0, rows * cols).view({rows, cols});
  at::mm_out(dots, a.narrow(0, a0, rows), b.narrow(0, b0, cols).t());
  return dots;
}

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

}  // namespace cpu
}  // namespace reid_ext
