// topk_similarity on CUDA: checks, device guard, and the choice between its two paths, made in one
// place (use_fused_kernel), all launched on the current stream without host synchronisation.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"

namespace reid_ext {
namespace cuda {
namespace {

// Splits of the fused kernel's column range; their partial lists are splits x N x k entries.
constexpr int kMaxSplits = 32;
// The chunked path: columns per product (more when k is larger, so that the running k of a row
// never outnumber the new columns), and candidates (running k + columns) per chunk of rows, each
// a float32 similarity, its sorted copy and two int64 indices: 24 MiB, whatever N, M and k.
constexpr int64_t kChunkColumns = 8192;
constexpr int64_t kChunkCandidates = int64_t(1) << 20;

// The path, chosen from k alone: the fused kernel keeps each row's best k in shared memory, at most
// kTopKFusedMax of them (re-ranking's k = k1 + 1 = 21 fits, and so does k1 = 30); beyond that a
// row's list would no longer fit beside the tile, and insertions into it cost O(k) each, so larger
// k go through products in chunks and sorts.
bool use_fused_kernel(int64_t k) { return k <= kTopKFusedMax; }

void topk_fused(const at::Tensor& x, const at::Tensor& y, bool same_rows, int64_t k, bool largest, double eps,
                at::Tensor& values, at::Tensor& indices, at::Tensor& far) {
  const int64_t n = x.size(0), m = y.size(0);
  const int splits = column_splits(n, m, x.get_device(), kMaxSplits);
  const auto float_options = x.options().dtype(at::kFloat);
  at::Tensor partial_values = splits > 1 ? at::empty({splits, n, k}, float_options) : at::Tensor();
  at::Tensor partial_indices = splits > 1 ? at::empty({splits, n, k}, indices.options()) : at::Tensor();
  at::Tensor partial_far = splits > 1 ? at::empty({splits, n}, float_options) : at::Tensor();
  const ScalarKind kind = scalar_kind(x, "x");
  const at::Tensor inv_x = inverse_norms(x, static_cast<float>(eps), kind);
  const at::Tensor inv_y = same_rows ? inv_x : inverse_norms(y, static_cast<float>(eps), kind);
  TopKParams p{};
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.inv_x = inv_x.data_ptr<float>();
  p.inv_y = inv_y.data_ptr<float>();
  p.n = n;
  p.m = m;
  p.d = x.size(1);
  p.k = k;
  p.largest = largest;
  p.kind = kind;
  p.values = values.data_ptr();
  p.indices = indices.data_ptr<int64_t>();
  p.far = far.data_ptr();
  p.partial_values = splits > 1 ? partial_values.data_ptr<float>() : nullptr;
  p.partial_indices = splits > 1 ? partial_indices.data_ptr<int64_t>() : nullptr;
  p.partial_far = splits > 1 ? partial_far.data_ptr<float>() : nullptr;
  p.splits = splits;
  check_launch(launch_topk_similarity(p, current_stream()));
}

// k > kTopKFusedMax. Per chunk of rows, the similarities of each chunk of columns come from one
// at::mm of the normalized rows in float32 (cuBLAS, with the tensor cores torch.matmul's precision
// allows); the running best k of the rows followed by the chunk's columns are then sorted stably,
// so that equal values keep increasing index order, and torch.sort ranks NaN above every number:
// topk_before's order. Memory: the outputs and one
// chunk of at most kChunkCandidates candidates (a row's k + columns where that is more), never N x M.
void topk_by_chunks(const at::Tensor& x, const at::Tensor& y, bool same_rows, int64_t k, bool largest, double eps,
                    at::Tensor& values, at::Tensor& indices, at::Tensor& far) {
  const int64_t n = x.size(0), m = y.size(0);
  const ScalarKind kind = scalar_kind(x, "x");
  const at::Tensor xn = normalized_rows(x, static_cast<float>(eps), kind, false);
  const at::Tensor yn = same_rows ? xn : normalized_rows(y, static_cast<float>(eps), kind, false);
  const int64_t cols = std::min(m, std::max(kChunkColumns, k));
  const int64_t rows = std::max<int64_t>(1, std::min(n, kChunkCandidates / (k + cols)));
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r = std::min(rows, n - r0);
    const at::Tensor xr = xn.narrow(0, r0, r);
    at::Tensor best_values, best_indices, row_far;
    for (int64_t c0 = 0; c0 < m; c0 += cols) {
      const int64_t c = std::min(cols, m - c0);
      at::Tensor sim = at::mm(xr, yn.narrow(0, c0, c).t());
      const at::Tensor chunk_far = largest ? sim.amin(1) : sim.amax(1);  // NaN propagates
      row_far = !row_far.defined() ? chunk_far
                : largest            ? at::minimum(row_far, chunk_far)
                                     : at::maximum(row_far, chunk_far);
      at::Tensor candidates = at::arange(c0, c0 + c, indices.options()).expand({r, c});
      if (best_values.defined()) {  // earlier columns first: they win ties
        sim = at::cat({best_values, sim}, 1);
        candidates = at::cat({best_indices, candidates}, 1);
      }
      const auto sorted = at::sort(sim, /*stable=*/true, /*dim=*/1, /*descending=*/largest);
      const int64_t keep = std::min(k, sim.size(1));
      best_values = std::get<0>(sorted).narrow(1, 0, keep);
      best_indices = candidates.gather(1, std::get<1>(sorted).narrow(1, 0, keep));
    }
    values.narrow(0, r0, r).copy_(best_values);
    indices.narrow(0, r0, r).copy_(best_indices);
    far.narrow(0, r0, r).copy_(row_far);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_similarity_cuda(const at::Tensor& x_in,
                                                                     const c10::optional<at::Tensor>& y_in, int64_t k,
                                                                     bool largest, double eps) {
  check_topk_similarity_args(x_in, y_in, k, eps);
  check_on_device(x_in, "x");
  scalar_kind(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  const int64_t n = x.size(0);
  at::Tensor values = at::empty({n, k}, x.options());
  at::Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
  at::Tensor far = at::empty({n}, x.options());
  if (n == 0) return {values, indices, far};
  if (use_fused_kernel(k)) {
    topk_fused(x, y, !y_in.has_value(), k, largest, eps, values, indices, far);
  } else {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // the products are internal
    topk_by_chunks(x, y, !y_in.has_value(), k, largest, eps, values, indices, far);
  }
  return {values, indices, far};
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) { m.impl("topk_similarity", &topk_similarity_cuda); }

}  // namespace cuda
}  // namespace reid_ext
