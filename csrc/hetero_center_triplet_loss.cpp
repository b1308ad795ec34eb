// hetero_center_triplet_loss, composed of the other ops of its namespace through the
// dispatcher (so each backend runs its own kernels): the groups, their centers, the loss over
// the centers with its gradient, and the centers' backward into grad_x, in one op call. The
// same file builds the emulated-GPU build's op (REID_EXT_CUDASIM), on its own namespace.
#include <ATen/ops/_unique2.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "reduction.h"

#ifdef REID_EXT_CUDASIM
#define REID_EXT_OPS_NAMESPACE "reid_ext_cudasim"
#define REID_EXT_COMPOSITE_IMPL(m) TORCH_LIBRARY_IMPL(reid_ext_cudasim, CompositeExplicitAutograd, m)
#else
#define REID_EXT_OPS_NAMESPACE "reid_ext"
#define REID_EXT_COMPOSITE_IMPL(m) TORCH_LIBRARY_IMPL(reid_ext, CompositeExplicitAutograd, m)
#endif

namespace reid_ext {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(REID_EXT_OPS_NAMESPACE "::") + name).c_str(), "")
      .typed<Signature>();
}

using Tensor = at::Tensor;
using OptionalTensor = c10::optional<at::Tensor>;

// The group of each row and the (label, modality) of each group, groups ordered by (label, modality).
// On the CPU a sort of the N (label, modality) pairs; on a device a unique over one int64 key per
// row built from order-preserving ranks (< N) of the two values. The number of groups depends on
// the data, so on CUDA this waits for the device once.
std::tuple<Tensor, Tensor, Tensor> modality_groups(const Tensor& labels, const Tensor& modalities) {
  TORCH_CHECK_VALUE(labels.dim() == 1 && modalities.dim() == 1 && labels.size(0) == modalities.size(0),
                    "labels and modalities must be 1-D of one length, got shapes ", labels.sizes(), " and ",
                    modalities.sizes());
  const Tensor label_values = labels.to(at::kLong).contiguous(), modality_values = modalities.to(at::kLong).contiguous();
  const int64_t n = labels.numel();
  if (kHostLoops && labels.is_cpu()) {
    const int64_t* l = label_values.data_ptr<int64_t>();
    const int64_t* m = modality_values.data_ptr<int64_t>();
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return std::pair(l[a], m[a]) < std::pair(l[b], m[b]); });
    Tensor group = at::empty({n}, label_values.options());
    std::vector<int64_t> first;  // the first row (in sorted order) of each group
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = order[k];
      if (k == 0 || std::pair(l[i], m[i]) != std::pair(l[order[k - 1]], m[order[k - 1]])) first.push_back(i);
      group.data_ptr<int64_t>()[i] = static_cast<int64_t>(first.size()) - 1;
    }
    const int64_t groups = static_cast<int64_t>(first.size());
    Tensor center_labels = at::empty({groups}, label_values.options()), center_modalities = at::empty({groups}, label_values.options());
    for (int64_t g = 0; g < groups; ++g) {
      center_labels.data_ptr<int64_t>()[g] = l[first[g]];
      center_modalities.data_ptr<int64_t>()[g] = m[first[g]];
    }
    return {group, center_labels.to(labels.scalar_type()), center_modalities.to(modalities.scalar_type())};
  }
  const int64_t scale = std::max<int64_t>(n, 1);
  const Tensor sorted_labels = std::get<0>(at::sort(label_values));
  const Tensor sorted_modalities = std::get<0>(at::sort(modality_values));
  const Tensor key =
      at::searchsorted(sorted_labels, label_values).mul_(scale).add_(at::searchsorted(sorted_modalities, modality_values));
  const auto [keys, group, counts] = at::_unique2(key, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  return {group.reshape({-1}), sorted_labels.index_select(0, keys.div(scale, "floor")).to(labels.scalar_type()),
          sorted_modalities.index_select(0, keys.remainder(scale)).to(modalities.scalar_type())};
}

std::tuple<Tensor, Tensor> hetero_center_triplet_loss(const Tensor& x, const Tensor& labels, const Tensor& modalities,
                                                      c10::string_view mining, double gamma, double margin,
                                                      c10::string_view reduction, bool grad_x) {
  const HeteroArgs args = check_hetero_args(x, labels, modalities, mining, gamma, margin, reduction);
  TORCH_CHECK_VALUE(args.reduction != Reduction::kNone,
                    "this op reduces over the centers: reduction must be 'mean' or 'sum' (with 'none', "
                    "reid_ext.hetero_center_triplet_loss composes modality_centers and the loss per center)");
  static const auto centers_op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymInt, bool)>(
      "modality_centers");
  static const auto centers_backward_op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>("_modality_centers_backward");
  static const auto unified_op =
      find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
          const OptionalTensor&, double, double, c10::string_view, c10::string_view, bool, bool)>("unified_triplet_loss");
  static const auto batch_hard_op =
      find_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, double, c10::string_view, bool, c10::string_view, bool)>(
          "batch_hard_triplet_loss");

  const auto [group, center_labels, center_modalities] = modality_groups(labels, modalities);
  // Batch-all (UBAT): the unified loss over the normalized centers, mode "all": a center's only
  // same-label partners are its other-modality centers, its negatives every other identity's.
  // Batch-hard (Liu et al.): euclidean over the raw centers.
  const bool all = args.mining == Mining::kAll;
  const auto [centers, counts] = centers_op.call(x, group, center_labels.sym_size(0), all);
  Tensor loss, grad_centers;
  if (all) {
    std::tie(loss, grad_centers, std::ignore, std::ignore, std::ignore, std::ignore) =
        unified_op.call(centers, center_labels, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, gamma, margin,
                        "all", reduction, grad_x, false);
  } else {
    std::tie(loss, grad_centers, std::ignore, std::ignore, std::ignore, std::ignore, std::ignore) =
        batch_hard_op.call(centers, center_labels, margin, "euclidean", false, reduction, grad_x);
  }
  if (!grad_x) return {loss, no_gradient(x)};
  return {loss, centers_backward_op.call(grad_centers, x, group, counts, all)};
}

}  // namespace

REID_EXT_COMPOSITE_IMPL(m) {
  m.impl("_modality_groups", &modality_groups);
  m.impl("hetero_center_triplet_loss", &hetero_center_triplet_loss);
}

}  // namespace reid_ext
