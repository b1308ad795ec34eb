// The argument checks as ops of their own, for reid_ext.reference: the plain-PyTorch losses raise
// exactly the errors of the fused ones. Device-independent (CompositeExplicitAutograd).
#include <torch/library.h>

#include "checks.h"

namespace reid_ext {
namespace {

void check_cosine_similarity(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_cosine_similarity_args(x, y, eps);
}

void check_unified_triplet_loss(const at::Tensor& x, const at::Tensor& labels,
                                const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
                                const c10::optional<at::Tensor>& ref_labels,
                                const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin,
                                c10::string_view mode, c10::string_view reduction) {
  check_unified_args(x, labels, modalities, ref, ref_labels, ref_modalities, gamma, margin, mode, reduction);
}

void check_batch_hard_triplet_loss(const at::Tensor& x, const at::Tensor& labels, double margin,
                                   c10::string_view metric, c10::string_view reduction) {
  check_batch_hard_args(x, labels, margin, metric, reduction);
}

void check_modality_centers(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& modalities) {
  check_centers_args(x, labels, modalities);
}

void check_hetero_center_triplet_loss(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& modalities,
                                      c10::string_view mining, double gamma, double margin,
                                      c10::string_view reduction) {
  check_hetero_args(x, labels, modalities, mining, gamma, margin, reduction);
}

void check_cosine_softmax_loss(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, double scale,
                               double margin, double label_smoothing, c10::string_view reduction) {
  check_cosine_softmax_args(x, weight, labels, scale, margin, label_smoothing, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(reid_ext, CompositeExplicitAutograd, m) {
  m.impl("_check_cosine_similarity", &check_cosine_similarity);
  m.impl("_check_unified_triplet_loss", &check_unified_triplet_loss);
  m.impl("_check_batch_hard_triplet_loss", &check_batch_hard_triplet_loss);
  m.impl("_check_modality_centers", &check_modality_centers);
  m.impl("_check_hetero_center_triplet_loss", &check_hetero_center_triplet_loss);
  m.impl("_check_cosine_softmax_loss", &check_cosine_softmax_loss);
}

}  // namespace reid_ext
