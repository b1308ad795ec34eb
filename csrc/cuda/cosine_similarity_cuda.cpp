// cosine_similarity on CUDA: checks, device guard and launch on the current stream.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"

namespace reid_ext {
namespace cuda {
namespace {

void check_cosine(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_features(x, "x");
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  scalar_kind(x, "x");
  if (y.has_value()) {
    check_features(*y, "y");
    check_same(*y, "y", x, "x");
  }
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
}

at::Tensor cosine_similarity_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  const CosineForwardParams params{x.data_ptr(), y.data_ptr(), out.data_ptr(), x.size(0), y.size(0), x.size(1),
                                   static_cast<float>(eps), scalar_kind(x, "x")};
  C10_CUDA_CHECK(launch_cosine_forward(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& sim_in, const at::Tensor& x_in,
    const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  const int64_t n = x.size(0), m = y.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == n && grad_in.size(1) == m && sim_in.sizes() == grad_in.sizes(),
              "grad must be Tensor[N, M] like the similarity");
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const at::Tensor sim = sim_in.to(at::kFloat).contiguous();
  const ScalarKind kind = scalar_kind(x, "x");
  const bool self = !y_in.has_value();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = self ? at::empty({0, x.size(1)}, x.options()) : at::empty_like(y);
  at::Tensor norms = at::empty({2 * std::max(n, m) + std::max(n, m)}, x.options().dtype(at::kFloat));
  float* scratch = norms.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Row side: c = G (+ G^T for y = x, whose gradient collects both sides).
  CosineBackwardParams rows{grad.data_ptr<float>(), sim.data_ptr<float>(), m, 1, self, x.data_ptr(), y.data_ptr(),
                            grad_x.data_ptr(), scratch, scratch + n, scratch + 2 * n, n, m, x.size(1),
                            static_cast<float>(eps), kind};
  C10_CUDA_CHECK(launch_cosine_backward(rows, stream));
  if (!self) {
    CosineBackwardParams cols{grad.data_ptr<float>(), sim.data_ptr<float>(), 1, m, false, y.data_ptr(),
                              x.data_ptr(), grad_y.data_ptr(), scratch, scratch + m, scratch + 2 * m, m, n,
                              x.size(1), static_cast<float>(eps), kind};
    C10_CUDA_CHECK(launch_cosine_backward(cols, stream));
  }
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CUDA, m) {
  m.impl("cosine_similarity", &cosine_similarity_cuda);
  m.impl("_cosine_similarity_backward", &cosine_similarity_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
