// modality_centers on CUDA: checks, device guard, the group lists (a stable sort,
// no host synchronisation) and launches on the current stream.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"

namespace reid_ext {
namespace cuda {
namespace {

CentersParams params_of(const at::Tensor& x, const at::Tensor& group, int64_t num_groups, bool normalize) {
  CentersParams p{};
  p.x = x.data_ptr();
  p.group = group.data_ptr<int64_t>();
  p.n = x.size(0);
  p.d = x.size(1);
  p.num_groups = num_groups;
  p.normalize = normalize;
  p.kind = scalar_kind(x, "x");
  return p;
}

std::tuple<at::Tensor, at::Tensor> modality_centers_cuda(const at::Tensor& x_in, const at::Tensor& group_in,
                                                         int64_t num_groups, bool normalize) {
  check_center_groups(x_in, group_in, num_groups);
  check_on_device(x_in, "x");
  scalar_kind(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor group = group_in.to(at::kLong).contiguous();
  // Rows grouped by id: the stable sort keeps each group's rows in increasing order, and
  // searchsorted finds where each group starts. Ids outside [0, num_groups) (which the
  // device cannot report without a synchronisation) fall outside every group.
  const auto [sorted, members] = at::sort(group, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(num_groups + 1, group.options()));
  const at::Tensor counts = at::sub(offsets.slice(0, 1), offsets.slice(0, 0, num_groups));
  at::Tensor centers = at::empty({num_groups, x.size(1)}, x.options());
  at::Tensor inv = at::empty({normalize ? x.size(0) : 0}, x.options().dtype(at::kFloat));
  CentersParams p = params_of(x, group, num_groups, normalize);
  p.offsets = offsets.data_ptr<int64_t>();
  p.members = members.data_ptr<int64_t>();
  p.inv = normalize ? inv.data_ptr<float>() : nullptr;
  check_launch(launch_centers_forward(p, centers.data_ptr(), current_stream()));
  return {centers, counts};
}

at::Tensor modality_centers_backward_cuda(const at::Tensor& grad_centers_in, const at::Tensor& x_in,
                                          const at::Tensor& group_in, const at::Tensor& counts_in, bool normalize) {
  TORCH_CHECK_VALUE(counts_in.dim() == 1, "counts must be a 1-D Tensor[G], got shape ", counts_in.sizes());
  const int64_t num_groups = counts_in.size(0);
  check_center_groups(x_in, group_in, num_groups);
  TORCH_CHECK_VALUE(grad_centers_in.dim() == 2 && grad_centers_in.size(0) == num_groups &&
                  grad_centers_in.size(1) == x_in.size(1),
              "grad_centers must be Tensor[G, D] = [", num_groups, ", ", x_in.size(1), "], got shape ",
              grad_centers_in.sizes());
  check_on_device(x_in, "x");
  TORCH_CHECK_VALUE(counts_in.device() == x_in.device() && grad_centers_in.device() == x_in.device(),
              "counts and grad_centers must be on ", x_in.device());
  scalar_kind(x_in, "x");
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor group = group_in.to(at::kLong).contiguous();
  const at::Tensor counts = counts_in.to(at::kLong).contiguous();
  const at::Tensor grad_centers = grad_centers_in.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  CentersParams p = params_of(x, group, num_groups, normalize);
  p.counts = counts.data_ptr<int64_t>();
  check_launch(launch_centers_backward(p, grad_centers.data_ptr<float>(), grad_x.data_ptr(),
                                         current_stream()));
  return grad_x;
}

}  // namespace

REID_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("modality_centers", &modality_centers_cuda);
  m.impl("_modality_centers_backward", &modality_centers_backward_cuda);
}

}  // namespace cuda
}  // namespace reid_ext
