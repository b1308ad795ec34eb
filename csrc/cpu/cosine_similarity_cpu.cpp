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

// One row-order pass over dL/dS (g) and S: the coefficient matrices of both sides,
// row_coef[i, j] = g_ij / max(|y_j|, eps) and col_coef[i, j] = g_ij / max(|x_i|, eps),
// and the row sums of g * S (the radial part of the normalization Jacobian).
template <typename scalar_t>
void coefficients(const scalar_t* g, const scalar_t* sim, int64_t n, int64_t m, const std::vector<scalar_t>& inv_x,
                  const std::vector<scalar_t>& inv_y, scalar_t* row_coef, scalar_t* col_coef,
                  std::vector<scalar_t>& row_radial) {
  row_radial.assign(n, 0);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* gi = g + i * m;
      const scalar_t* si = sim + i * m;
      scalar_t* rc = row_coef + i * m;
      scalar_t* cc = col_coef + i * m;
      const scalar_t inv_i = inv_x[i];
      scalar_t radial = 0;
      for (int64_t j = 0; j < m; ++j) {
        rc[j] = gi[j] * inv_y[j];
        cc[j] = gi[j] * inv_i;
        radial += gi[j] * si[j];
      }
      row_radial[i] = radial;
    }
  });
}

// Column sums of g * S, over column blocks in parallel, each reading rows in order.
template <typename scalar_t>
void column_radial(const scalar_t* g, const scalar_t* sim, int64_t n, int64_t m, std::vector<scalar_t>& col_radial) {
  col_radial.assign(m, 0);
  constexpr int64_t kCols = 256;
  at::parallel_for(0, (m + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t j0 = block * kCols, j1 = std::min(m, j0 + kCols);
      scalar_t* out = col_radial.data();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = j0; j < j1; ++j) out[j] += g[i * m + j] * sim[i * m + j];
    }
  });
}

// grad[i] = inv[i] * product[i] - a_i * radial_scale[i] * radial[i]: the normalization Jacobian.
template <typename scalar_t>
void normalization_jacobian(const at::Tensor& a, const std::vector<scalar_t>& inv,
                            const std::vector<scalar_t>& radial_scale, const std::vector<scalar_t>& radial,
                            const at::Tensor& product, at::Tensor& grad) {
  const int64_t d = a.size(1);
  const scalar_t* a_data = a.data_ptr<scalar_t>();
  const scalar_t* p = product.data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, a.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t scale = inv[i], shrink = radial_scale[i] * radial[i];
      for (int64_t k = 0; k < d; ++k) out[i * d + k] = scale * p[i * d + k] - shrink * a_data[i * d + k];
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
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the GEMMs below are internal, not part of the graph
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_similarity_backward_cpu", [&] {
    const bool self = !y_in.has_value();
    std::vector<scalar_t> inv_x, radial_x, inv_y, radial_y, row_radial, col_radial;
    inverse_norms<scalar_t>(x, static_cast<scalar_t>(eps), inv_x, &radial_x);
    if (!self) inverse_norms<scalar_t>(y, static_cast<scalar_t>(eps), inv_y, &radial_y);
    const auto& iy = self ? inv_x : inv_y;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* s = sim.data_ptr<scalar_t>();
    at::Tensor row_coef = at::empty_like(grad), col_coef = at::empty_like(grad);
    coefficients<scalar_t>(g, s, x.size(0), m, inv_x, iy, row_coef.data_ptr<scalar_t>(),
                           col_coef.data_ptr<scalar_t>(), row_radial);
    column_radial<scalar_t>(g, s, x.size(0), m, col_radial);
    // dL/dx_i collects row i of G; dL/dy_j column j (for y = x, both land on x).
    at::Tensor from_rows = at::mm(row_coef, y);
    at::Tensor from_cols = at::mm(col_coef.t(), x);
    if (self) {
      from_rows.add_(from_cols);
      for (int64_t i = 0; i < x.size(0); ++i) row_radial[i] += col_radial[i];
      normalization_jacobian<scalar_t>(x, inv_x, radial_x, row_radial, from_rows, grad_x);
    } else {
      normalization_jacobian<scalar_t>(x, inv_x, radial_x, row_radial, from_rows, grad_x);
      normalization_jacobian<scalar_t>(y, inv_y, radial_y, col_radial, from_cols, grad_y);
    }
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
