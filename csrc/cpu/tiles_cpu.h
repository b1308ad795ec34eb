// Building blocks of the CPU kernels: parallel loops with autograd out of the way, schedules of
// tiles (row blocks against column tiles, symmetric block pairs), tiles of dot products through
// the BLAS that torch ships, row norms (with the large rows of cosine kernels scaled), the
// normalization Jacobian, and small row helpers. The element loops are in vector_cpu.h.
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

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/vector_cpu.h"

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

// Rows per parallel task when each row costs `cost` operations: about 32768 per task, as
// ATen's own grain, so that small problems stay on one thread.
inline int64_t rows_per_task(int64_t cost) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cost, 1)); }

// ---- schedules of tiles

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

// Rows of a set against itself per block of a symmetric pair: each BLAS call of 256 x 256 x D is
// large enough to be efficient.
constexpr int64_t kSymmetricBlock = 256;

// visit(i0, rows, j0, cols) once for every pair of blocks I <= J of kSymmetricBlock rows of [0, n),
// the pairs of a round in parallel (see tile_pair_rounds): two calls that run at once touch four
// distinct blocks, so a tile may write to the rows of both its blocks.
template <typename F>
void for_each_block_pair(int64_t n, const F& visit) {
  const int64_t block = kSymmetricBlock, nb = (n + block - 1) / block;
  for (const auto& round : tile_pair_rounds(nb)) {
    parallel_over(static_cast<int64_t>(round.size()), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i0 = round[t].first * block, j0 = round[t].second * block;
        visit(i0, std::min(block, n - i0), j0, std::min(block, n - j0));
      }
    });
  }
}

// visit(i0, rows, j0, cols) for blocks of `block` rows of [0, n) in parallel, each against the
// tiles of `tile` columns of [0, m) in order.
template <typename F>
void for_each_row_tile(int64_t n, int64_t block, int64_t m, int64_t tile, const F& visit) {
  parallel_over((n + block - 1) / block, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * block, rows = std::min(block, n - i0);
      for (int64_t j0 = 0; j0 < m; j0 += tile) visit(i0, rows, j0, std::min(tile, m - j0));
    }
  });
}

// dots[r, c] = <a[a0 + r], b[b0 + c]> for a tile, written into scratch (at least rows * cols).
inline at::Tensor tile_dots(at::Tensor& scratch, const at::Tensor& a, int64_t a0, int64_t rows,
                            const at::Tensor& b, int64_t b0, int64_t cols) {
  at::Tensor dots = scratch.narrow(0, 0, rows * cols).view({rows, cols});
  at::mm_out(dots, a.narrow(0, a0, rows), b.narrow(0, b0, cols).t());
  return dots;
}

// Rows of the first operand per task, and rows of the second per tile, of for_each_row_block:
// a tile of 32 x 256 dot products (32 KiB in float32) stays in L2 while its epilogue reads it.
constexpr int64_t kBlockRows = 32;
constexpr int64_t kTileCols = 256;
// At most this many dot products, with b within one tile of columns, are computed at once by one
// multi-threaded GEMM: per-block GEMMs would each re-read all of b, and small ones run slowly.
constexpr int64_t kWholePairs = 256 * 256;

// One worker's scratch for streaming tiles of <a_i, b_j> over a block of rows of a; or the
// view of all of them (`whole`, [a.size(0), b.size(0)]) when for_each_row_block computed them at once.
template <typename scalar_t>
class TileStream {
 public:
  TileStream(const at::Tensor& a, const at::Tensor& b, const at::Tensor& whole)
      : a_(a), b_(b), whole_(whole),
        dots_(whole.defined() ? at::Tensor() : at::empty({kBlockRows * kTileCols}, a.options())) {}

  // Row-major [rows, cols] dot products of a[i0, i0 + rows) with b[j0, j0 + cols).
  const scalar_t* dots(int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    if (whole_.defined()) return whole_.data_ptr<scalar_t>() + i0 * cols;  // one tile of columns: j0 = 0
    return tile_dots(dots_, a_, i0, rows, b_, j0, cols).template data_ptr<scalar_t>();
  }

 private:
  at::Tensor a_, b_, whole_, dots_;
};

// body(stream, i0, rows) for every block of kBlockRows rows of a, blocks in parallel,
// one TileStream per worker. Autograd is off in the workers: the tiles are out= ops.
template <typename scalar_t, typename Body>
void for_each_row_block(const at::Tensor& a, const at::Tensor& b, const Body& body) {
  const int64_t n = a.size(0), m = b.size(0);
  at::Tensor whole;
  if (m <= kTileCols && n * m <= kWholePairs) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    whole = at::mm(a, b.t());
  }
  parallel_over((n + kBlockRows - 1) / kBlockRows, [&](int64_t begin, int64_t end) {
    TileStream<scalar_t> stream(a, b, whole);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kBlockRows;
      body(stream, i0, std::min(kBlockRows, n - i0));
    }
  });
}

// ---- rows

// <a, b> with 8 independent partial sums in a fixed order: a single running sum is bound by
// the latency of each addition (the compiler may not reorder float additions); 8 of them
// vectorize and pipeline, and the result is still the same on every run.
template <typename scalar_t>
inline scalar_t dot_product(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t d) {
  constexpr int64_t kParts = 8;
  scalar_t part[kParts] = {};
  int64_t k = 0;
  for (; k + kParts <= d; k += kParts) {
    for (int64_t l = 0; l < kParts; ++l) part[l] += a[k + l] * b[k + l];
  }
  scalar_t tail = 0;
  for (; k < d; ++k) tail += a[k] * b[k];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + tail;
}

// max |v_k| over v[0, d) (NaN skipped), in 8 independent lanes as dot_product.
template <typename scalar_t>
inline scalar_t max_abs(const scalar_t* v, int64_t d) {
  constexpr int64_t kParts = 8;
  scalar_t part[kParts] = {};
  int64_t k = 0;
  for (; k + kParts <= d; k += kParts) {
    for (int64_t l = 0; l < kParts; ++l) part[l] = std::abs(v[k + l]) > part[l] ? std::abs(v[k + l]) : part[l];
  }
  scalar_t m = 0;
  for (; k < d; ++k) m = std::abs(v[k]) > m ? std::abs(v[k]) : m;
  for (int64_t l = 0; l < kParts; ++l) m = part[l] > m ? part[l] : m;
  return m;
}

// The rows a kernel works on and their norms: squared norm, inverse norm 1 / max(|x_i|, eps), and
// the radial factor of the normalization's Jacobian (inv^2 where |x_i| > eps; the clamp makes it 0
// elsewhere). Cosine kernels (scale_large_rows) work on rows whose largest magnitude exceeds
// big_row scaled by their exact power of two c_i = row_scale (common.h): cosine similarity is the
// same on them, and their squared norms and dot products cannot overflow. `rows` is then a copy
// with those rows scaled, and a itself when there are none (no copy in the common case); the
// norms are of `rows`, with the eps floor of the unscaled norm (c_i * eps). A gradient computed
// for `rows` becomes a's by unscale(). Euclidean metrics are not scale-invariant: they keep a.
template <typename scalar_t>
struct RowNorms {
  at::Tensor rows;
  std::vector<scalar_t> sq, inv, radial;
  std::vector<std::pair<int64_t, scalar_t>> scaled;  // (i, c_i) of the scaled rows, in order

  explicit RowNorms(const at::Tensor& a, scalar_t eps = norm_eps<scalar_t>(), bool scale_large_rows = true)
      : rows(a), sq(a.size(0)), inv(a.size(0)), radial(a.size(0)) {
    const int64_t n = a.size(0), d = a.size(1);
    std::vector<scalar_t> scale(scale_large_rows ? n : 0);
    const scalar_t* data = a.data_ptr<scalar_t>();
    at::parallel_for(0, n, rows_per_task(2 * d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = data + i * d;
        sq[i] = dot_product(row, row, d);
        // max_abs^2 <= sq: a row with sq <= big_row (every ordinary one) has max_abs < big_row.
        if (scale_large_rows) scale[i] = sq[i] <= big_row<scalar_t>() ? scalar_t(1) : row_scale(max_abs(row, d));
        set_inverse(i, eps);
      }
    });
    for (int64_t i = 0; i < static_cast<int64_t>(scale.size()); ++i) {
      if (scale[i] != scalar_t(1)) scaled.emplace_back(i, scale[i]);
    }
    if (scaled.empty()) return;
    rows = a.clone(at::MemoryFormat::Contiguous);
    scalar_t* out = rows.data_ptr<scalar_t>();
    for (const auto& [i, c] : scaled) {
      scalar_t* row = out + i * d;
      for (int64_t k = 0; k < d; ++k) row[k] *= c;
      sq[i] = dot_product(row, row, d);
      set_inverse(i, c * eps);
    }
  }

  // grad_i *= c_i for the scaled rows of grad ([n, D], contiguous): dL/dx_i = c_i dL/d(c_i x_i).
  void unscale(at::Tensor& grad) const {
    const int64_t d = grad.size(1);
    scalar_t* out = grad.data_ptr<scalar_t>();
    for (const auto& [i, c] : scaled) {
      for (int64_t k = 0; k < d; ++k) out[i * d + k] *= c;
    }
  }

 private:
  void set_inverse(int64_t i, scalar_t eps) {
    inv[i] = inverse_norm(sq[i], eps);
    radial[i] = math_sqrt(sq[i]) > eps ? inv[i] * inv[i] : scalar_t(0);
  }
};

// In place, p_i <- dL/da_i for p_i = dL/dan_i, the gradient of the normalized rows an_i = inv_i a_i
// of norms.rows: inv_i * (p_i - an_i (an_i . p_i)), which the eps clamp (radial 0) makes inv_i * p_i;
// then unscaled to the rows the norms were taken of.
template <typename scalar_t>
void normalization_backward(const RowNorms<scalar_t>& norms, at::Tensor& p) {
  const int64_t d = norms.rows.size(1);
  const scalar_t* a_data = norms.rows.template data_ptr<scalar_t>();
  scalar_t* out = p.data_ptr<scalar_t>();
  at::parallel_for(0, norms.rows.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t dot = dot_product(a_data + i * d, out + i * d, d);
      const scalar_t scale = norms.inv[i], shrink = norms.radial[i] * norms.inv[i] * dot;
      for (int64_t k = 0; k < d; ++k) out[i * d + k] = scale * out[i * d + k] - shrink * a_data[i * d + k];
    }
  });
  norms.unscale(p);
}

// out[k] += scale * v[k]
template <typename scalar_t>
inline void add_scaled(scalar_t* __restrict__ out, scalar_t scale, const scalar_t* __restrict__ v, int64_t d) {
  for (int64_t k = 0; k < d; ++k) out[k] += scale * v[k];
}

// `values` as int64, each checked to be in [0, limit): the error reads
// "<name>[i] = v is not <what> [0, <limit_name>=limit)".
inline at::Tensor checked_indices(const at::Tensor& values, const char* name, const char* what,
                                  const char* limit_name, int64_t limit) {
  at::Tensor v = values.to(at::kLong).contiguous();
  const int64_t* data = v.data_ptr<int64_t>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    TORCH_CHECK_VALUE(data[i] >= 0 && data[i] < limit, name, "[", i, "] = ", data[i], " is not ", what, " [0, ",
                      limit_name, "=", limit, ")");
  }
  return v;
}

}  // namespace cpu
}  // namespace reid_ext
