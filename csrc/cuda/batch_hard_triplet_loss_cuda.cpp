// batch_hard_triplet_loss on CUDA: checks, device guard, scratch from the caching
// allocator, and launches on the current stream (no host synchronisation).
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/square.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "reduction.h"

namespace reid_ext {
namespace cuda {
namespace {

// Splits of the forward's reference range; their partial results are 2 x N pairs each.
constexpr int kMaxSplits = 64;

// A large batch: the dot products of the anchors with a chunk of references at a time from cuBLAS
// (the normalized rows for the cosine metric, the raw ones with their squared norms otherwise),
// into a buffer of n x chunk floats, each chunk folded into the running hardest pairs.
void chunked_forward(const at::Tensor& x, BatchHardForwardParams& p) {
  const int64_t n = p.n, d = p.d;
  const auto stream = current_stream();
  const auto float_options = x.options().dtype(at::kFloat);
  const bool cosine = p.metric == kMetricCosine;
  at::Tensor rows = x, sq;
  if (cosine) {
    rows = at::empty_like(x);
    check_launch(launch_normalized_rows(p.kind, x.data_ptr(), n, d, norm_eps<float>(), p.inv, nullptr, rows.data_ptr(),
                                        true, stream));
  } else {
    check_launch(launch_row_norms(p.kind, x.data_ptr(), n, d, norm_eps<float>(), p.inv, nullptr, stream));
    sq = x.to(at::kFloat).square().sum(1);
  }
  const int64_t cols = chunk_references(n, n, d, x.element_size());
  at::Tensor dots_buffer = at::empty({n * cols}, float_options);
  for (int64_t j0 = 0; j0 < n; j0 += cols) {
    const int64_t count = std::min(cols, n - j0);
    at::Tensor dots = dots_buffer.narrow(0, 0, n * count).view({n, count});
    products_into(dots, rows, rows.narrow(0, j0, count));
    check_launch(launch_batch_hard_chunk(p, BatchHardChunk{dots.data_ptr<float>(), j0, count, j0 == 0},
                                         cosine ? nullptr : sq.data_ptr<float>(), stream));
  }
  check_launch(launch_batch_hard_chunk_finish(p, stream));
}

// The per-anchor forward: loss, validity, hardest pairs and their distances.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& labels, double margin, Metric metric, bool soft_margin) {
  const ScalarKind kind = scalar_kind(x, "x");
  const int64_t n = x.size(0);
  const auto float_options = x.options().dtype(at::kFloat);
  const auto long_options = x.options().dtype(at::kLong);
  at::Tensor loss = at::empty({n}, x.options());
  at::Tensor valid = at::empty({n}, x.options().dtype(at::kBool));
  at::Tensor pos_idx = at::empty({n}, long_options);
  at::Tensor neg_idx = at::empty({n}, long_options);
  at::Tensor dist_ap = at::empty({n}, float_options);
  at::Tensor dist_an = at::empty({n}, float_options);
  at::Tensor inv = at::empty({n}, float_options);
  // Large batches take cuBLAS products chunk by chunk (use_cublas_products), whose running hardest
  // pairs live in one "split"; batch-sized ones the tile kernels, their reference range split.
  const bool chunked = use_cublas_products(n, n, x.size(1), kind);
  const int splits = chunked ? 1 : column_splits(n, n, x.get_device(), kMaxSplits);
  const bool partials = chunked || splits > 1;
  at::Tensor partial_dist = partials ? at::empty({splits, 2, n}, float_options) : at::Tensor();
  at::Tensor partial_idx = partials ? at::empty({splits, 2, n}, long_options) : at::Tensor();
  BatchHardForwardParams p{};
  p.x = x.data_ptr();
  p.labels = labels.data_ptr<int64_t>();
  p.inv = inv.data_ptr<float>();
  p.n = n;
  p.d = x.size(1);
  p.metric = static_cast<int>(metric);
  p.margin = static_cast<float>(margin);
  p.soft_margin = soft_margin;
  p.kind = kind;
  p.loss = loss.data_ptr();
  p.valid = valid.data_ptr<bool>();
  p.pos_idx = pos_idx.data_ptr<int64_t>();
  p.neg_idx = neg_idx.data_ptr<int64_t>();
  p.dist_ap = dist_ap.data_ptr<float>();
  p.dist_an = dist_an.data_ptr<float>();
  p.partial_dist = partials ? partial_dist.data_ptr<float>() : nullptr;
  p.partial_idx = partials ? partial_idx.data_ptr<int64_t>() : nullptr;
  p.splits = splits;
  if (chunked) {
    chunked_forward(x, p);
  } else {
    check_launch(launch_batch_hard_forward(p, current_stream()));
  }
  return {loss, valid, pos_idx, neg_idx, dist_ap, dist_an};
}

// grad_x from the per-anchor gradient (float32 Tensor[N]) and the forward's hardest pairs.
at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& pos_idx, const at::Tensor& neg_idx,
                    const at::Tensor& dist_ap, const at::Tensor& dist_an, double margin, Metric metric,
                    bool soft_margin) {
  const ScalarKind kind = scalar_kind(x, "x");
  const int64_t n = x.size(0);
  const auto float_options = x.options().dtype(at::kFloat);
  // Pairs grouped by their reference row: a stable sort keeps each group in pair order, and
  // searchsorted finds where each row's group starts (-1 = no pair sorts before all of them).
  // Indices outside [-1, n) would fall outside every group and be ignored.
  const auto [targets, pairs] = at::sort(at::cat({pos_idx, neg_idx}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(targets, at::arange(n + 1, pos_idx.options()));
  at::Tensor scratch = at::empty({3, n}, float_options);
  at::Tensor grad_x = at::empty_like(x);
  BatchHardBackwardParams p{};
  p.x = x.data_ptr();
  p.grad_loss = grad.data_ptr<float>();
  p.pos_idx = pos_idx.data_ptr<int64_t>();
  p.neg_idx = neg_idx.data_ptr<int64_t>();
  p.dist_ap = dist_ap.data_ptr<float>();
  p.dist_an = dist_an.data_ptr<float>();
  p.incoming_offsets = offsets.data_ptr<int64_t>();
  p.incoming_pairs = pairs.data_ptr<int64_t>();
  p.n = n;
  p.d = x.size(1);
  p.metric = static_cast<int>(metric);
  p.margin = static_cast<float>(margin);
  p.soft_margin = soft_margin;
  p.kind = kind;
  p.inv = scratch.data_ptr<float>();
  p.radial = p.inv + n;
  p.weight = p.inv + 2 * n;
  p.grad_x = grad_x.data_ptr();
  check_launch(launch_batch_hard_backward(p, current_stream()));
  return grad_x;
}

// The loss, reduced, the hardest pairs, and with a scalar reduction and grad_x the gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_hard_triplet_loss_cuda(const at::Tensor& x_in, const at::Tensor& labels_in, double margin,
                             c10::string_view metric, bool soft_margin, c10::string_view reduction, bool grad_x) {
  const BatchHardArgs args = check_batch_hard_args(x_in, labels_in, margin, metric, reduction);
  check_on_device(x_in, "x");
  scalar_kind(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const auto [loss, valid, pos_idx, neg_idx, dist_ap, dist_an] = forward(x, labels, margin, args.metric, soft_margin);
  at::Tensor grad = no_gradient(x);
  if (grad_x && args.reduction != Reduction::kNone) {
    grad = backward(reduction_weights(dist_ap, valid, args.reduction), x, pos_idx, neg_idx, dist_ap, dist_an, margin,
                    args.metric, soft_margin);
  }
  return {reduce_anchors(loss, valid, args.reduction), grad, valid, pos_idx, neg_idx, dist_ap, dist_an};
}

at::Tensor batch_hard_triplet_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                 const at::Tensor& pos_idx_in, const at::Tensor& neg_idx_in,
                                                 const at::Tensor& dist_ap_in, const at::Tensor& dist_an_in,
                                                 double margin, c10::string_view metric, bool soft_margin,
                                                 c10::string_view reduction) {
  check_features(x_in, "x");
  check_on_device(x_in, "x");
  scalar_kind(x_in, "x");
  check_finite_nonnegative(margin, "margin");
  const Metric parsed_metric = parse_metric(metric);
  check_index(pos_idx_in, "pos_idx", x_in, "x");
  check_index(neg_idx_in, "neg_idx", x_in, "x");
  check_per_row(dist_ap_in, "dist_ap", x_in);
  check_per_row(dist_an_in, "dist_an", x_in);
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor pos_idx = pos_idx_in.to(at::kLong).contiguous();
  const at::Tensor neg_idx = neg_idx_in.to(at::kLong).contiguous();
  const at::Tensor valid = pos_idx.ge(0).logical_and(neg_idx.ge(0));
  const at::Tensor grad = anchor_grads(grad_loss, x, valid, parse_reduction(reduction)).to(at::kFloat).contiguous();
  return backward(grad, x, pos_idx, neg_idx, dist_ap_in.to(at::kFloat).contiguous(),
                  dist_an_in.to(at::kFloat).contiguous(), margin, parsed_metric, soft_margin);
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("batch_hard_triplet_loss", &batch_hard_triplet_loss_cuda);
  m.impl("_batch_hard_triplet_loss_backward", &batch_hard_triplet_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
