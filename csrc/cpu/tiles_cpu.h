// Tile helpers for the CPU kernels: thread-local scratch, tiled dot products
// through the BLAS that torch ships, and per-row inverse norms.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "common.h"

namespace reid_ext {
namespace cpu {

// Anchors per parallel task and references per tile: a tile's dot products
// stay in L2 while its row statistics are updated.
constexpr int64_t kRowBlock = 32;
constexpr int64_t kColBlock = 256;

// Runs f(begin, end) over row blocks with autograd out of the way in every
// worker thread: the tile GEMMs write into scratch tensors through out= ops.
template <typename F>
void parallel_over_blocks(int64_t num_blocks, const F& f) {
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    f(begin, end);
  });
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
      scalar_t sq = 0;
      for (int64_t k = 0; k < d; ++k) sq += row[k] * row[k];
      inv[i] = inverse_norm(sq, eps);
      if (radial) (*radial)[i] = math_sqrt(sq) > eps ? inv[i] * inv[i] : scalar_t(0);
    }
  });
}

// dots[r, c] = <a[a0 + r], b[b0 + c]> for a tile of rows, written into scratch.
inline at::Tensor tile_dots(at::Tensor& scratch, const at::Tensor& a, int64_t a0, int64_t rows,
                            const at::Tensor& b, int64_t b0, int64_t cols) {
  at::Tensor dots = scratch.narrow(0, 0, rows * cols).view({rows, cols});
  at::mm_out(dots, a.narrow(0, a0, rows), b.narrow(0, b0, cols).t());
  return dots;
}

}  // namespace cpu
}  // namespace reid_ext
