// cosine_softmax_loss on CUDA: checks, device guard, the products with the class
// weights through cuBLAS (at::mm on the current stream), and the fused kernels
// around them. No host synchronisation.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "reduction.h"

namespace reid_ext {
namespace cuda {
namespace {

struct Prepared {
  at::Tensor x, weight, labels, xn, wn, norms, cos;
  CosineSoftmaxParams params;
};

// Contiguous inputs, their normalized rows in float32 with their RowNorms (a half-precision
// product would round every cosine to half precision; normalized rows cannot overflow), and the
// cosines xn @ wn^T from cuBLAS.
Prepared prepare(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& labels_in, double scale,
                 double margin, double label_smoothing) {
  const ScalarKind kind = scalar_kind(x_in, "x");
  Prepared pr;
  pr.x = x_in.contiguous();
  pr.weight = weight_in.contiguous();
  pr.labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = pr.x.size(0), c = pr.weight.size(0), d = pr.x.size(1);
  const auto float_options = pr.x.options().dtype(at::kFloat);
  pr.xn = at::empty({n, d}, float_options);
  pr.wn = at::empty({c, d}, float_options);
  pr.norms = at::empty({2 * (n + c)}, float_options);
  float* inv_x = pr.norms.data_ptr<float>();
  float* radial_x = inv_x + n;
  float* inv_w = inv_x + 2 * n;
  float* radial_w = inv_w + c;
  const auto stream = current_stream();
  check_launch(launch_normalized_rows(kind, pr.x.data_ptr(), n, d, norm_eps<float>(), inv_x, radial_x,
                                      pr.xn.data_ptr(), false, stream));
  check_launch(launch_normalized_rows(kind, pr.weight.data_ptr(), c, d, norm_eps<float>(), inv_w, radial_w,
                                      pr.wn.data_ptr(), false, stream));
  pr.cos = at::mm(pr.xn, pr.wn.t());
  CosineSoftmaxParams& p = pr.params;
  p.xn = pr.xn.data_ptr<float>();
  p.wn = pr.wn.data_ptr<float>();
  p.inv_x = inv_x;
  p.radial_x = radial_x;
  p.inv_w = inv_w;
  p.radial_w = radial_w;
  p.cos = pr.cos.data_ptr<float>();
  p.labels = pr.labels.data_ptr<int64_t>();
  p.n = n;
  p.c = c;
  p.d = d;
  p.scale = static_cast<float>(scale);
  p.margin = static_cast<float>(margin);
  p.smoothing = static_cast<float>(label_smoothing);
  p.kind = kind;
  return pr;
}

// grad_x and grad_weight (each [0, D] unless wanted) from the per-anchor gradient (float32 Tensor[N]):
// coef = dL/dcos scaled by both inverse norms, then one cuBLAS product and the Jacobian per side.
std::tuple<at::Tensor, at::Tensor> backward(const Prepared& pr, const at::Tensor& grad, const at::Tensor& lse,
                                            bool want_x, bool want_weight) {
  const CosineSoftmaxParams& p = pr.params;
  if (p.n == 0) {  // no anchor, no gradient (and nothing for the kernels to do)
    return {want_x ? at::zeros_like(pr.x) : no_gradient(pr.x), want_weight ? at::zeros_like(pr.weight) : no_gradient(pr.x)};
  }
  const auto float_options = pr.x.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({p.n, p.c}, float_options);
  at::Tensor row_sum = at::empty({p.n}, float_options);
  at::Tensor col_sum = at::empty({want_weight ? p.c : 0}, float_options);
  const auto stream = current_stream();
  check_launch(launch_cosine_softmax_coefficients(p, grad.data_ptr<float>(), lse.data_ptr<float>(),
                                                  coef.data_ptr<float>(), row_sum.data_ptr<float>(),
                                                  want_weight ? col_sum.data_ptr<float>() : nullptr, stream));
  at::Tensor grad_x = no_gradient(pr.x), grad_w = no_gradient(pr.x);
  if (want_x) {
    const at::Tensor acc = at::mm(coef, pr.wn);
    grad_x = at::empty_like(pr.x);
    check_launch(launch_cosine_softmax_finish(p, true, acc.data_ptr<float>(), row_sum.data_ptr<float>(),
                                              grad_x.data_ptr(), stream));
  }
  if (want_weight) {
    const at::Tensor acc = at::mm(coef.t(), pr.xn);
    grad_w = at::empty_like(pr.weight);
    check_launch(launch_cosine_softmax_finish(p, false, acc.data_ptr<float>(), col_sum.data_ptr<float>(),
                                              grad_w.data_ptr(), stream));
  }
  return {grad_x, grad_w};
}

// The loss, reduced ("mean" over the N anchors), and with a scalar reduction the gradients that
// grad_x / grad_weight ask for, reusing the forward's products.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_softmax_loss_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, double scale, double margin,
    double label_smoothing, c10::string_view reduction_name, bool grad_x, bool grad_weight) {
  const Reduction reduction =
      check_cosine_softmax_args(x, weight, labels, scale, margin, label_smoothing, reduction_name);
  check_on_device(x, "x");
  const DeviceGuard guard(x.device());
  const Prepared pr = prepare(x, weight, labels, scale, margin, label_smoothing);
  at::Tensor loss = at::empty({pr.params.n}, pr.x.options());
  at::Tensor lse = at::empty({pr.params.n}, pr.x.options().dtype(at::kFloat));
  check_launch(launch_cosine_softmax_forward(pr.params, loss.data_ptr(), lse.data_ptr<float>(), current_stream()));
  at::Tensor grad_x_out = no_gradient(pr.x), grad_w_out = no_gradient(pr.x);
  if (reduction != Reduction::kNone && (grad_x || grad_weight)) {
    std::tie(grad_x_out, grad_w_out) =
        backward(pr, reduction_weights(lse, at::Tensor(), reduction), lse, grad_x, grad_weight);
  }
  return {reduce_anchors(loss, at::Tensor(), reduction), grad_x_out, grad_w_out, lse};
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& lse_in, double scale, double margin, double label_smoothing, c10::string_view reduction,
    bool grad_x, bool grad_weight) {
  const Reduction r = check_cosine_softmax_args(x, weight, labels, scale, margin, label_smoothing, reduction);
  check_on_device(x, "x");
  check_per_row(lse_in, "lse", x);
  const DeviceGuard guard(x.device());
  const Prepared pr = prepare(x, weight, labels, scale, margin, label_smoothing);
  const at::Tensor grad = anchor_grads(grad_loss, pr.x, at::Tensor(), r).to(at::kFloat).contiguous();
  return backward(pr, grad, lse_in.to(at::kFloat).contiguous(), grad_x, grad_weight);
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("cosine_softmax_loss", &cosine_softmax_loss_cuda);
  m.impl("_cosine_softmax_loss_backward", &cosine_softmax_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
