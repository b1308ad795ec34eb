// modality_centers on CPU: the mean of the (L2-normalized) rows of each group.
//
// Forward: a counting sort lists each group's rows in increasing index order;
// groups are averaged in parallel, each by one thread in that order, so the
// result is bitwise the same for any number of threads. Backward: every row
// reads only its own group's gradient, so it is row-parallel and deterministic.
// Normalized rows are computed from the rows with the large ones scaled (see RowNorms).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>

#include "cpu/tiles_cpu.h"

namespace reid_ext {
namespace cpu {
namespace {

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const int64_t* group, int64_t num_groups, bool normalize, at::Tensor& centers,
                  at::Tensor& counts) {
  const int64_t n = x.size(0), d = x.size(1);
  int64_t* count = counts.data_ptr<int64_t>();
  std::fill(count, count + num_groups, int64_t(0));
  for (int64_t i = 0; i < n; ++i) ++count[group[i]];
  // members[offsets[g], offsets[g + 1]) are the rows of group g in increasing order.
  std::vector<int64_t> offsets(num_groups + 1, 0), members(n);
  for (int64_t g = 0; g < num_groups; ++g) offsets[g + 1] = offsets[g] + count[g];
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) members[next[group[i]]++] = i;

  // Without normalize, the rows as they are, each with weight 1.
  const std::optional<RowNorms<scalar_t>> norms = normalize ? std::make_optional<RowNorms<scalar_t>>(x) : std::nullopt;
  const scalar_t* xd = (norms ? norms->rows : x).template data_ptr<scalar_t>();
  scalar_t* out = centers.data_ptr<scalar_t>();
  const int64_t rows_per_group = num_groups > 0 ? std::max<int64_t>(1, n / num_groups) : 1;
  at::parallel_for(0, num_groups, rows_per_task(rows_per_group * d), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      scalar_t* row = out + g * d;
      std::fill(row, row + d, scalar_t(0));
      for (int64_t e = offsets[g]; e < offsets[g + 1]; ++e) {
        const int64_t i = members[e];
        add_scaled(row, norms ? norms->inv[i] : scalar_t(1), xd + i * d, d);
      }
      // A group without members (possible only through the raw op) keeps a zero center.
      if (count[g] > 0) {
        const scalar_t scale = scalar_t(1) / static_cast<scalar_t>(count[g]);
        for (int64_t k = 0; k < d; ++k) row[k] *= scale;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> modality_centers_cpu(const at::Tensor& x_in, const at::Tensor& group_in,
                                                        int64_t num_groups, bool normalize) {
  check_center_groups(x_in, group_in, num_groups);
  check_cpu_dtype(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor group = checked_indices(group_in, "group", "in", "num_groups", num_groups);
  at::Tensor centers = at::empty({num_groups, x.size(1)}, x.options());
  at::Tensor counts = at::empty({num_groups}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "modality_centers_cpu", [&] {
    forward_impl<scalar_t>(x, group.data_ptr<int64_t>(), num_groups, normalize, centers, counts);
  });
  return {centers, counts};
}

// grad_x[i] = J_i^T grad_centers[g] / count[g] for g = group[i], where J_i is the Jacobian of
// x_i / max(|x_i|, eps): J^T v = inv * v - radial * inv * <x, v> * x (identity without normalize).
template <typename scalar_t>
void backward_impl(const at::Tensor& grad_centers, const at::Tensor& x, const int64_t* group, const int64_t* count,
                   bool normalize, at::Tensor& grad_x) {
  const int64_t n = x.size(0), d = x.size(1);
  const std::optional<RowNorms<scalar_t>> norms = normalize ? std::make_optional<RowNorms<scalar_t>>(x) : std::nullopt;
  const scalar_t* gc = grad_centers.data_ptr<scalar_t>();
  const scalar_t* xd = (norms ? norms->rows : x).template data_ptr<scalar_t>();
  scalar_t* out = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, n, rows_per_task(2 * d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = group[i];
      const scalar_t* v = gc + g * d;
      const scalar_t* xi = xd + i * d;
      scalar_t* row = out + i * d;
      // counts come from the forward, where every group of a row has at least that row.
      const scalar_t share = count[g] > 0 ? scalar_t(1) / static_cast<scalar_t>(count[g]) : scalar_t(0);
      if (!normalize) {
        for (int64_t k = 0; k < d; ++k) row[k] = share * v[k];
        continue;
      }
      const scalar_t dot = dot_product(xi, v, d);
      const scalar_t inv = norms->inv[i], along = share * inv, shrink = share * norms->radial[i] * inv * dot;
      for (int64_t k = 0; k < d; ++k) row[k] = along * v[k] - shrink * xi[k];
    }
  });
  if (norms) norms->unscale(grad_x);  // computed for the normalized rows of norms->rows
}

at::Tensor modality_centers_backward_cpu(const at::Tensor& grad_centers_in, const at::Tensor& x_in,
                                         const at::Tensor& group_in, const at::Tensor& counts_in, bool normalize) {
  TORCH_CHECK_VALUE(counts_in.dim() == 1, "counts must be a 1-D Tensor[G], got shape ", counts_in.sizes());
  const int64_t num_groups = counts_in.size(0);
  check_center_groups(x_in, group_in, num_groups);
  check_cpu_dtype(x_in, "x");
  TORCH_CHECK_VALUE(grad_centers_in.dim() == 2 && grad_centers_in.size(0) == num_groups &&
                  grad_centers_in.size(1) == x_in.size(1),
              "grad_centers must be Tensor[G, D] = [", num_groups, ", ", x_in.size(1), "], got shape ",
              grad_centers_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor group = checked_indices(group_in, "group", "in", "num_groups", num_groups);
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "modality_centers_backward_cpu", [&] {
    const at::Tensor grad_centers = grad_centers_in.to(x.scalar_type()).contiguous();
    backward_impl<scalar_t>(grad_centers, x, group.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), normalize,
                            grad_x);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CPU, m) {
  m.impl("modality_centers", &modality_centers_cpu);
  m.impl("_modality_centers_backward", &modality_centers_backward_cpu);
}

}  // namespace cpu
}  // namespace reid_ext
