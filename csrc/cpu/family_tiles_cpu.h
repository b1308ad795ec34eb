// CPU building blocks of batch_hard_triplet_loss, modality_centers and
// cosine_softmax_loss: row norms, and (batch-hard) a per-thread workspace that
// streams tiles of dot products (one BLAS call per tile) past a block of rows,
// so that no kernel ever holds a full N x M matrix.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <vector>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace family {

// Rows of the first operand per task, and rows of the second per tile: a tile of
// 32 x 256 dot products (32 KiB in float32) stays in L2 while its epilogue reads it.
constexpr int64_t kBlockRows = 32;
constexpr int64_t kTileCols = 256;

// Rows per parallel task when each row costs `cost` operations: about 32768 per task, as
// ATen's own grain, so that small problems stay on one thread.
inline int64_t rows_per_task(int64_t cost) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cost, 1)); }

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

// out[k] += scale * v[k]
template <typename scalar_t>
inline void add_scaled(scalar_t* __restrict__ out, scalar_t scale, const scalar_t* __restrict__ v, int64_t d) {
  for (int64_t k = 0; k < d; ++k) out[k] += scale * v[k];
}

// Squared norm, 1 / max(norm, eps), and the radial factor of the normalization's
// Jacobian (inv^2 where norm > eps; the clamp makes it 0 elsewhere) of every row.
template <typename scalar_t>
struct RowNorms {
  std::vector<scalar_t> sq, inv, radial;

  explicit RowNorms(const at::Tensor& a) : sq(a.size(0)), inv(a.size(0)), radial(a.size(0)) {
    const int64_t d = a.size(1);
    const scalar_t* data = a.data_ptr<scalar_t>();
    const scalar_t eps = norm_eps<scalar_t>();
    at::parallel_for(0, a.size(0), rows_per_task(d), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = data + i * d;
        const scalar_t s = dot_product(row, row, d);
        sq[i] = s;
        inv[i] = inverse_norm(s, eps);
        radial[i] = math_sqrt(s) > eps ? inv[i] * inv[i] : scalar_t(0);
      }
    });
  }
};

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
    at::Tensor out = dots_.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(out, a_.narrow(0, i0, rows), b_.narrow(0, j0, cols).t());
    return out.data_ptr<scalar_t>();
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
  at::parallel_for(0, (n + kBlockRows - 1) / kBlockRows, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    TileStream<scalar_t> stream(a, b, whole);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * kBlockRows;
      body(stream, i0, std::min(kBlockRows, n - i0));
    }
  });
}

}  // namespace family
}  // namespace cpu
}  // namespace reid_ext
