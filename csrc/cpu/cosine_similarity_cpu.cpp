// cosine_similarity on CPU: one tiled GEMM on the raw features with the
// normalization fused into its epilogue (no normalized copies of x or y).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

template <typename scalar_t>
void similarity_rows(const at::Tensor& x, const at::Tensor& y, const std::vector<scalar_t>& inv_x,
                     const std::vector<scalar_t>& inv_y, at::Tensor& out) {
  const int64_t n = x.size(0), m = y.size(0), block_size = anchor_block(n);
  parallel_over((n + block_size - 1) / block_size, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * block_size, rows = std::min(block_size, n - i0);
      at::Tensor strip = out.narrow(0, i0, rows);
      at::mm_out(strip, x.narrow(0, i0, rows), y.t());
      scalar_t* s = strip.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t ri = inv_x[i0 + r];
        for (int64_t j = 0; j < m; ++j) s[r * m + j] *= ri * inv_y[j];
      }
    }
  });
}

// grad_a[i] = inv_a[i] * sum_j g_ij inv_b[j] b_j - a_i * radial_a[i] * sum_j g_ij s_ij,
// reading g and s through (row, col) strides so that the column side reuses it transposed.
template <typename scalar_t>
void grad_one_side(const scalar_t* g, const scalar_t* s, int64_t row_stride, int64_t col_stride,
                   const at::Tensor& a, const std::vector<scalar_t>& inv_a, const std::vector<scalar_t>& radial_a,
                   const at::Tensor& b, const std::vector<scalar_t>& inv_b, at::Tensor& grad_a, bool accumulate) {
  const int64_t rows_total = a.size(0), cols = b.size(0), d = a.size(1), block_size = anchor_block(rows_total);
  parallel_over((rows_total + block_size - 1) / block_size, [&](int64_t begin, int64_t end) {
    at::Tensor coef = at::empty({block_size, cols}, a.options());
    at::Tensor acc = at::empty({block_size, d}, a.options());
    std::vector<scalar_t> radial_sum(block_size);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i0 = block * block_size, rows = std::min(block_size, rows_total - i0);
      scalar_t* c = coef.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t radial = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t at_ = (i0 + r) * row_stride + j * col_stride;
          c[r * cols + j] = g[at_] * inv_b[j];
          radial += g[at_] * s[at_];
        }
        radial_sum[r] = radial;
      }
      at::Tensor acc_rows = acc.narrow(0, 0, rows);
      at::mm_out(acc_rows, coef.narrow(0, 0, rows), b);
      const scalar_t* p = acc_rows.data_ptr<scalar_t>();
      const scalar_t* a_data = a.data_ptr<scalar_t>();
      scalar_t* out = grad_a.data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const scalar_t scale = inv_a[i], shrink = radial_a[i] * radial_sum[r];
        for (int64_t k = 0; k < d; ++k) {
          const scalar_t v = scale * p[r * d + k] - shrink * a_data[i * d + k];
          out[i * d + k] = accumulate ? out[i * d + k] + v : v;
        }
      }
    }
  });
}

void check_cosine(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_features(x, "x");
  if (y.has_value()) {
    check_features(*y, "y");
    check_same(*y, "y", x, "x");
  }
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
}

at::Tensor cosine_similarity_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_similarity_cpu", [&] {
    std::vector<scalar_t> inv_x, inv_y;
    inverse_norms<scalar_t>(x, static_cast<scalar_t>(eps), inv_x, nullptr);
    if (y_in.has_value()) inverse_norms<scalar_t>(y, static_cast<scalar_t>(eps), inv_y, nullptr);
    similarity_rows<scalar_t>(x, y, inv_x, y_in.has_value() ? inv_y : inv_x, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& sim_in, const at::Tensor& x_in,
    const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  TORCH_CHECK(grad_in.sizes() == sim_in.sizes() && grad_in.size(0) == x.size(0) && grad_in.size(1) == y.size(0),
              "grad must be Tensor[N, M] like the similarity");
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  const at::Tensor sim = sim_in.to(x.scalar_type()).contiguous();
  const int64_t m = y.size(0);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = y_in.has_value() ? at::empty_like(y) : at::empty({0, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_similarity_backward_cpu", [&] {
    std::vector<scalar_t> inv_x, radial_x, inv_y, radial_y;
    inverse_norms<scalar_t>(x, static_cast<scalar_t>(eps), inv_x, &radial_x);
    if (y_in.has_value()) inverse_norms<scalar_t>(y, static_cast<scalar_t>(eps), inv_y, &radial_y);
    const auto& iy = y_in.has_value() ? inv_y : inv_x;
    const auto& ry = y_in.has_value() ? radial_y : radial_x;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* s = sim.data_ptr<scalar_t>();
    grad_one_side<scalar_t>(g, s, m, 1, x, inv_x, radial_x, y, iy, grad_x, false);
    // The column side: rows of y read G transposed; for y = x it adds into grad_x.
    at::Tensor& col_out = y_in.has_value() ? grad_y : grad_x;
    grad_one_side<scalar_t>(g, s, 1, m, y, iy, ry, x, inv_x, col_out, !y_in.has_value());
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("cosine_similarity", &cosine_similarity_cpu);
  m.impl("_cosine_similarity_backward", &cosine_similarity_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
