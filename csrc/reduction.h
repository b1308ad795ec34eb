// The reduction over anchors, written once for every loss op and both backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/div.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/scalar_tensor.h>

#include "checks.h"

namespace reid_ext {

// The anchors' count in a "mean": those valid (valid: Tensor[N] of bool), or all N when undefined;
// at least 1, so that a batch without a valid anchor has a zero loss. A tensor: no host synchronisation.
inline at::Tensor anchor_count(const at::Tensor& loss, const at::Tensor& valid) {
  if (!valid.defined()) return at::scalar_tensor(static_cast<double>(std::max<int64_t>(loss.size(0), 1)), loss.options());
  return valid.sum().clamp_min(1).to(loss.scalar_type());
}

// "none": the per-anchor losses; "sum": their sum; "mean": their sum over anchor_count.
inline at::Tensor reduce_anchors(const at::Tensor& loss, const at::Tensor& valid, Reduction reduction) {
  if (reduction == Reduction::kNone) return loss;
  at::Tensor total = loss.sum();
  return reduction == Reduction::kSum ? total : total.div(anchor_count(loss, valid));
}

// d(reduced loss) / d(loss_i) for every anchor, as Tensor[N] of like's dtype and device (like: any
// Tensor[N]); the grad_loss of a backward pass.
inline at::Tensor reduction_weights(const at::Tensor& like, const at::Tensor& valid, Reduction reduction) {
  at::Tensor ones = at::ones({like.size(0)}, like.options());
  return reduction == Reduction::kMean ? ones.div_(anchor_count(like, valid)) : ones;
}

// The per-anchor gradient of a backward op from its grad_loss: Tensor[N] as it is for "none",
// Tensor[] spread over the anchors by reduction_weights otherwise.
inline at::Tensor anchor_grads(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& valid,
                               Reduction reduction) {
  if (reduction == Reduction::kNone) {
    check_per_row(grad_loss, "grad_loss", x);
    return grad_loss;
  }
  TORCH_CHECK_VALUE(grad_loss.dim() == 0, "grad_loss of a reduced loss must be a 0-dim Tensor, got shape ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == x.device(), "grad_loss is on ", grad_loss.device(), " but x is on ",
                    x.device());
  const at::Tensor per_anchor = at::empty({x.size(0)}, x.options().dtype(grad_loss.scalar_type()));
  return reduction_weights(per_anchor, valid, reduction).mul_(grad_loss);
}

// A gradient output that the op was not asked for: Tensor[0, D], a new one for each output (the
// outputs of an op may not alias each other).
inline at::Tensor no_gradient(const at::Tensor& x) { return at::empty({0, x.size(1)}, x.options()); }

}  // namespace reid_ext
