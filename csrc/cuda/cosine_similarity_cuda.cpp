// cosine_similarity on CUDA: checks, device guard and launch on the current stream.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/add.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"

namespace reid_ext {
namespace cuda {
namespace {

void check_cosine(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_cosine_similarity_args(x, y, eps);
  check_on_device(x, "x");
  scalar_kind(x, "x");
}

at::Tensor cosine_similarity_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  const bool self = !y_in.has_value();
  const ScalarKind kind = scalar_kind(x, "x");
  if (use_cublas_products(x.size(0), y.size(0), x.size(1), kind)) {  // S = xn @ yn^T by cuBLAS
    const float e = static_cast<float>(eps);
    const at::Tensor xn = normalized_rows(x, e, kind, true), yn = self ? xn : normalized_rows(y, e, kind, true);
    return at::mm(xn, yn.t());
  }
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  at::Tensor inv = at::empty({x.size(0) + (self ? 0 : y.size(0))}, x.options().dtype(at::kFloat));
  float* inv_x = inv.data_ptr<float>();
  const CosineForwardParams params{x.data_ptr(), y.data_ptr(),     out.data_ptr(), inv_x,
                                   self ? inv_x : inv_x + x.size(0), x.size(0),       y.size(0), x.size(1),
                                   static_cast<float>(eps),          scalar_kind(x, "x")};
  check_launch(launch_cosine_forward(params, current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                   const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == n && grad_in.size(1) == m,
                    "grad must be Tensor[N, M] = [", n, ", ", m, "], got shape ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const ScalarKind kind = scalar_kind(x, "x");
  const bool self = !y_in.has_value();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = self ? at::empty({0, d}, x.options()) : at::empty_like(y);
  const int64_t most = std::max(n, m);
  at::Tensor scratch = at::empty({3 * most + most * d}, x.options().dtype(at::kFloat));
  float* norms = scratch.data_ptr<float>();
  float* product = norms + 3 * most;
  const auto stream = current_stream();
  // Row side: c = G (+ G^T for y = x, whose gradient collects both sides).
  // Large problems take p = c @ bn from cuBLAS (float32 normalized rows), batch-sized ones the product kernel.
  const bool cublas = use_cublas_products(n, m, d, kind);
  auto product_of = [&](const at::Tensor& c, const at::Tensor& b) {
    if (!cublas) return false;
    at::Tensor out = scratch.narrow(0, 3 * most, c.size(0) * d).view({c.size(0), d});
    at::mm_out(out, c, normalized_rows(b, static_cast<float>(eps), kind, false));
    return true;
  };
  const bool rows_given = product_of(self ? grad.add(grad.t()) : grad, y);
  const CosineBackwardParams rows{grad.data_ptr<float>(), m,   1,           self,           x.data_ptr(),
                                  y.data_ptr(),           grad_x.data_ptr(), norms,        norms + n,
                                  norms + 2 * n,          product,     rows_given,     n,
                                  m,                      d,           static_cast<float>(eps), kind};
  check_launch(launch_cosine_backward(rows, stream));
  if (!self) {  // stream order: the column side reuses the scratch after the row side is done with it
    const bool cols_given = product_of(grad.t(), x);
    const CosineBackwardParams cols{grad.data_ptr<float>(), 1,   m,           false,          y.data_ptr(),
                                    x.data_ptr(),           grad_y.data_ptr(), norms,       norms + m,
                                    norms + 2 * m,          product,     cols_given,     m,
                                    n,                      d,           static_cast<float>(eps), kind};
    check_launch(launch_cosine_backward(cols, stream));
  }
  return {grad_x, grad_y};
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("cosine_similarity", &cosine_similarity_cuda);
  m.impl("_cosine_similarity_backward", &cosine_similarity_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
