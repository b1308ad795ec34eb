// unified_triplet_loss on CUDA: checks, device guard, scratch from the caching
// allocator, and launches on the current stream (no host synchronisation).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"

namespace reid_ext {
namespace cuda {
namespace {

// Splits of the forward's reference range; partial statistics are tiny.
constexpr int kMaxForwardSplits = 64;
// Splits of the backward's column range; each costs a float32 copy of the gradient.
constexpr int kMaxBackwardSplits = 8;

const int64_t* index_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

UnifiedInputs check_cuda_inputs(const at::Tensor& x, const at::Tensor& labels,
                                const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
                                const c10::optional<at::Tensor>& ref_labels,
                                const c10::optional<at::Tensor>& ref_modalities, double gamma, int64_t mode) {
  check_on_device(x, "x");
  scalar_kind(x, "x");
  return check_unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, mode);
}

UnifiedProblem problem_of(const UnifiedInputs& in, double gamma, double margin, int64_t mode) {
  return UnifiedProblem{in.x.data_ptr(),       in.ref.data_ptr(),
                        index_ptr(in.labels),  index_ptr(in.modalities),
                        index_ptr(in.ref_labels), index_ptr(in.ref_modalities),
                        in.x.size(0),          in.ref.size(0),
                        in.x.size(1),          static_cast<float>(gamma),
                        static_cast<float>(margin), static_cast<int>(mode),
                        in.self_ref,           scalar_kind(in.x, "x")};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_triplet_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin, int64_t mode) {
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = check_cuda_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, mode);
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  const auto stats_options = in.x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, in.x.options());
  at::Tensor valid = at::empty({n}, in.x.options().dtype(at::kBool));
  at::Tensor lse_neg = at::empty({n}, stats_options);
  at::Tensor lse_pos = at::empty({n}, stats_options);
  const int splits = column_splits(n, m, in.x.get_device(), kMaxForwardSplits);
  at::Tensor partial = splits > 1 ? at::empty({splits, 5, n}, stats_options) : at::Tensor();
  const UnifiedForwardParams params{loss.data_ptr(), valid.data_ptr<bool>(), lse_neg.data_ptr<float>(),
                                    lse_pos.data_ptr<float>(), splits > 1 ? partial.data_ptr<float>() : nullptr,
                                    splits};
  check_launch(launch_unified_forward(problem_of(in, gamma, margin, mode), params,
                                        current_stream()));
  return {loss, valid, lse_neg, lse_pos};
}

at::Tensor backward_side(const UnifiedInputs& in, const UnifiedProblem& problem, const at::Tensor& grad_loss,
                         const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos,
                         bool rows_are_anchors) {
  const at::Tensor& side = rows_are_anchors ? in.x : in.ref;
  const int64_t rows = side.size(0), cols = rows_are_anchors ? in.ref.size(0) : in.x.size(0), d = side.size(1);
  const int splits = column_splits(rows, cols, side.get_device(), kMaxBackwardSplits);
  const auto float_options = side.options().dtype(at::kFloat);
  at::Tensor partial_grad = at::zeros({splits, rows, d}, float_options);
  at::Tensor partial_radial = at::empty({splits, rows}, float_options);
  at::Tensor grad = at::empty_like(side);
  const UnifiedBackwardParams params{grad_loss.data_ptr<float>(), valid.data_ptr<bool>(), lse_neg.data_ptr<float>(),
                                     lse_pos.data_ptr<float>(),   rows_are_anchors,      partial_grad.data_ptr<float>(),
                                     partial_radial.data_ptr<float>(), splits,            grad.data_ptr()};
  check_launch(launch_unified_backward(problem, params, current_stream()));
  return grad;
}

std::tuple<at::Tensor, at::Tensor> unified_triplet_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels,
    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
    const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& ref_modalities,
    const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos, double gamma, double margin,
    int64_t mode, bool ref_requires_grad) {
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = check_cuda_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, mode);
  const int64_t n = in.x.size(0);
  for (const auto* t : {&grad_loss, &valid, &lse_neg, &lse_pos}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "per-anchor tensors of the backward must be Tensor[N]");
    TORCH_CHECK(t->device() == in.x.device(), "per-anchor tensors of the backward must be on ", in.x.device());
  }
  const at::Tensor grad_c = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor valid_c = valid.to(at::kBool).contiguous();
  const at::Tensor neg_c = lse_neg.to(at::kFloat).contiguous();
  const at::Tensor pos_c = lse_pos.to(at::kFloat).contiguous();
  const UnifiedProblem problem = problem_of(in, gamma, margin, mode);
  at::Tensor grad_x = backward_side(in, problem, grad_c, valid_c, neg_c, pos_c, true);
  at::Tensor grad_ref = (!in.self_ref && ref_requires_grad)
                            ? backward_side(in, problem, grad_c, valid_c, neg_c, pos_c, false)
                            : at::empty({0, in.x.size(1)}, in.x.options());
  return {grad_x, grad_ref};
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("unified_triplet_loss", &unified_triplet_loss_cuda);
  m.impl("_unified_triplet_loss_backward", &unified_triplet_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
