// cosine_similarity on CPU. Forward: one GEMM per block of rows on the raw
// features (large rows scaled, see RowNorms), with the normalization fused into its
// epilogue. Backward: two GEMMs of dL/dS with the normalized features, then the
// normalization Jacobian per row.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

template <typename scalar_t>
void similarity_rows(const RowNorms<scalar_t>& nx, const RowNorms<scalar_t>& ny, at::Tensor& out) {
  const at::Tensor &x = nx.rows, &y = ny.rows;
  const std::vector<scalar_t>&inv_x = nx.inv, &inv_y = ny.inv;
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

// Rows scaled by their inverse norms: the normalized features.
template <typename scalar_t>
at::Tensor normalized(const RowNorms<scalar_t>& norms) {
  const at::Tensor& a = norms.rows;
  const std::vector<scalar_t>& inv = norms.inv;
  at::Tensor out = at::empty_like(a);
  const int64_t d = a.size(1);
  const scalar_t* in = a.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, a.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t k = 0; k < d; ++k) o[i * d + k] = in[i * d + k] * inv[i];
  });
  return out;
}

void check_cosine(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_cosine_similarity_args(x, y, eps);
  check_cpu_dtype(x, "x");
}

at::Tensor cosine_similarity_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  at::Tensor out = at::empty({x.size(0), y.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_similarity_cpu", [&] {
    const RowNorms<scalar_t> nx(x, static_cast<scalar_t>(eps));
    if (!y_in.has_value()) return similarity_rows<scalar_t>(nx, nx, out);
    similarity_rows<scalar_t>(nx, RowNorms<scalar_t>(y, static_cast<scalar_t>(eps)), out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& y_in, double eps) {
  check_cosine(x_in, y_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.has_value() ? y_in->contiguous() : x;
  TORCH_CHECK_VALUE(grad_in.dim() == 2 && grad_in.size(0) == x.size(0) && grad_in.size(1) == y.size(0),
                    "grad must be Tensor[N, M] = [", x.size(0), ", ", y.size(0), "], got shape ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor grad_x, grad_y = at::empty({0, x.size(1)}, x.options());
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the GEMMs below are internal, not part of the graph
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cosine_similarity_backward_cpu", [&] {
    const bool self = !y_in.has_value();
    const RowNorms<scalar_t> nx(x, static_cast<scalar_t>(eps));
    // Two GEMMs on N x D operands, then the Jacobian row by row: no pass over N x M besides the GEMMs.
    const at::Tensor xn = normalized<scalar_t>(nx);
    if (self) {
      grad_x = at::mm(grad, xn).add_(at::mm(grad.t(), xn));
    } else {
      const RowNorms<scalar_t> ny(y, static_cast<scalar_t>(eps));
      grad_x = at::mm(grad, normalized<scalar_t>(ny));
      grad_y = at::mm(grad.t(), xn);
      normalization_backward<scalar_t>(ny, grad_y);
    }
    normalization_backward<scalar_t>(nx, grad_x);
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
