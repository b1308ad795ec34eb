// unified_triplet_loss on CUDA: checks, device guard, scratch from the caching
// allocator, and launches on the current stream (no host synchronisation).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "reduction.h"

namespace reid_ext {
namespace cuda {
namespace {

// Splits of the forward's reference range; partial statistics are tiny.
constexpr int kMaxForwardSplits = 64;
// Splits of the backward's column range; each costs a float32 copy of the gradient.
constexpr int kMaxBackwardSplits = 8;

const int64_t* index_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<int64_t>() : nullptr; }

// The problem as the kernels read it; `norms` receives the buffer of the rows' RowNorms, which the
// launchers fill, and must outlive the launches.
UnifiedProblem problem_of(const UnifiedInputs& in, double gamma, double margin, PairMode mode, at::Tensor& norms) {
  const int64_t n = in.x.size(0), m = in.ref.size(0);
  norms = at::empty({2 * (n + (in.self_ref ? 0 : m))}, in.x.options().dtype(at::kFloat));
  float* inv_x = norms.data_ptr<float>();
  float* inv_ref = in.self_ref ? inv_x : inv_x + 2 * n;
  UnifiedProblem pb{};
  pb.x = in.x.data_ptr();
  pb.ref = in.ref.data_ptr();
  pb.labels = index_ptr(in.labels);
  pb.modalities = index_ptr(in.modalities);
  pb.ref_labels = index_ptr(in.ref_labels);
  pb.ref_modalities = index_ptr(in.ref_modalities);
  pb.inv_x = inv_x;
  pb.radial_x = inv_x + n;
  pb.inv_ref = inv_ref;
  pb.radial_ref = in.self_ref ? inv_x + n : inv_ref + m;
  pb.n = n;
  pb.m = m;
  pb.d = in.x.size(1);
  pb.gamma = static_cast<float>(gamma);
  pb.margin = static_cast<float>(margin);
  pb.mode = static_cast<int>(mode);
  pb.self_ref = in.self_ref;
  pb.kind = scalar_kind(in.x, "x");
  return pb;
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

// The per-anchor forward: loss, validity and the two log-sum-exps.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const UnifiedInputs& in,
                                                                   const UnifiedProblem& problem) {
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
  check_launch(launch_unified_forward(problem, params, current_stream()));
  return {loss, valid, lse_neg, lse_pos};
}

// The loss, reduced, and with a scalar reduction the gradients that grad_x / grad_ref ask for (the
// backward kernels run in the forward with the reduction's weights: no host synchronisation).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_triplet_loss_cuda(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin, c10::string_view mode,
    c10::string_view reduction, bool grad_x, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_on_device(x, "x");
  scalar_kind(x, "x");
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  at::Tensor norms;
  const UnifiedProblem problem = problem_of(in, gamma, margin, args.mode, norms);
  const auto [per_anchor, valid, lse_neg, lse_pos] = forward(in, problem);
  const bool want_ref = !in.self_ref && grad_ref;
  at::Tensor grad_x_out = no_gradient(in.x), grad_ref_out = no_gradient(in.x);
  if (args.reduction != Reduction::kNone && (grad_x || want_ref)) {
    const at::Tensor weights = reduction_weights(lse_neg, valid, args.reduction);
    if (grad_x) grad_x_out = backward_side(in, problem, weights, valid, lse_neg, lse_pos, true);
    if (want_ref) grad_ref_out = backward_side(in, problem, weights, valid, lse_neg, lse_pos, false);
  }
  return {reduce_anchors(per_anchor, valid, args.reduction), grad_x_out, grad_ref_out, valid, lse_neg, lse_pos};
}

std::tuple<at::Tensor, at::Tensor> unified_triplet_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& labels,
    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
    const c10::optional<at::Tensor>& ref_labels, const c10::optional<at::Tensor>& ref_modalities,
    const at::Tensor& valid, const at::Tensor& lse_neg, const at::Tensor& lse_pos, double gamma, double margin,
    c10::string_view mode, c10::string_view reduction, bool grad_ref) {
  const UnifiedArgs args =
      check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
  check_on_device(x, "x");
  scalar_kind(x, "x");
  for (const auto& [t, name] : {std::pair{&valid, "valid"}, {&lse_neg, "lse_neg"}, {&lse_pos, "lse_pos"}}) {
    check_per_row(*t, name, x);
  }
  const DeviceGuard guard(x.device());
  const UnifiedInputs in = unified_inputs(x, labels, modalities, ref, ref_labels, ref_modalities, args.mode);
  const at::Tensor valid_c = valid.to(at::kBool).contiguous();
  const at::Tensor grad_c = anchor_grads(grad_loss, in.x, valid_c, args.reduction).to(at::kFloat).contiguous();
  const at::Tensor neg_c = lse_neg.to(at::kFloat).contiguous();
  const at::Tensor pos_c = lse_pos.to(at::kFloat).contiguous();
  at::Tensor norms;
  const UnifiedProblem problem = problem_of(in, gamma, margin, args.mode, norms);
  at::Tensor grad_x = backward_side(in, problem, grad_c, valid_c, neg_c, pos_c, true);
  at::Tensor grad_ref_out = (!in.self_ref && grad_ref) ? backward_side(in, problem, grad_c, valid_c, neg_c, pos_c, false)
                                                       : no_gradient(in.x);
  return {grad_x, grad_ref_out};
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("unified_triplet_loss", &unified_triplet_loss_cuda);
  m.impl("_unified_triplet_loss_backward", &unified_triplet_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
