// The reduction over anchors, written once for every loss op and both backends: on CUDA in ATen ops
// (no host synchronisation), on the CPU in one pass over the anchors, without the per-call cost of
// a chain of small ATen ops.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sum.h>

#include <algorithm>

#include "checks.h"

namespace reid_ext {

// Whether CPU tensors take the host loops: not in the emulated-GPU build, whose CPU tensors stand
// for a GPU's and whose tests must run the device path.
#ifdef REID_EXT_CUDASIM
constexpr bool kHostLoops = false;
#else
constexpr bool kHostLoops = true;
#endif

// The number of anchors a "mean" divides by: the valid ones (valid: Tensor[N] of bool), or all N
// when valid is undefined; at least 1, so that a batch without a valid anchor has a zero loss.
inline int64_t cpu_anchor_count(int64_t n, const at::Tensor& valid) {
  if (!valid.defined()) return std::max<int64_t>(n, 1);
  const at::Tensor v = valid.contiguous();
  return std::max<int64_t>(std::count(v.data_ptr<bool>(), v.data_ptr<bool>() + n, true), 1);
}

inline at::Tensor anchor_count(int64_t n, const at::Tensor& valid, const at::TensorOptions& options) {
  if (!valid.defined()) return at::scalar_tensor(static_cast<double>(std::max<int64_t>(n, 1)), options);
  return valid.sum().clamp_min(1).to(options.dtype());
}

// "none": the per-anchor losses (Tensor[N]); "sum": their sum; "mean": their sum over the anchor count.
inline at::Tensor reduce_anchors(const at::Tensor& loss, const at::Tensor& valid, Reduction reduction) {
  if (reduction == Reduction::kNone) return loss;
  if (!(kHostLoops && loss.is_cpu())) {
    const at::Tensor total = loss.sum();
    return reduction == Reduction::kSum ? total : total.div(anchor_count(loss.size(0), valid, total.options()));
  }
  const int64_t n = loss.size(0);
  const double scale = reduction == Reduction::kMean ? 1.0 / static_cast<double>(cpu_anchor_count(n, valid)) : 1.0;
  at::Tensor out = at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "reduce_anchors", [&] {
    const at::Tensor l = loss.contiguous();
    const scalar_t* data = l.data_ptr<scalar_t>();
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += static_cast<double>(data[i]);
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(total * scale);
  });
  return out;
}

// d(reduced loss) / d(loss_i) for every anchor: Tensor[N] of like's dtype and device (like: any
// Tensor[N], not read), the grad_loss of a backward pass.
inline at::Tensor reduction_weights(const at::Tensor& like, const at::Tensor& valid, Reduction reduction) {
  const int64_t n = like.size(0);
  if (!(kHostLoops && like.is_cpu())) {
    at::Tensor ones = at::ones({n}, like.options());
    return reduction == Reduction::kMean ? ones.div_(anchor_count(n, valid, like.options())) : ones;
  }
  const double scale = reduction == Reduction::kMean ? 1.0 / static_cast<double>(cpu_anchor_count(n, valid)) : 1.0;
  at::Tensor out = at::empty({n}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "reduction_weights",
                                  [&] { std::fill_n(out.data_ptr<scalar_t>(), n, static_cast<scalar_t>(scale)); });
  return out;
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
  const at::Tensor like = at::empty({x.size(0)}, x.options().dtype(grad_loss.scalar_type()));
  return reduction_weights(like, valid, reduction).mul_(grad_loss);
}

// A gradient output that the op was not asked for: Tensor[0, D], a new one for each output (the
// outputs of an op may not alias each other).
inline at::Tensor no_gradient(const at::Tensor& x) { return at::empty({0, x.size(1)}, x.options()); }

}  // namespace reid_ext
