// Host-side argument checks of the ops, shared by the CPU kernels and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace reid_ext {

inline void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D Tensor[N, D], got ", t.dim(), " dimensions");
  TORCH_CHECK(t.size(1) > 0, name, " must have a non-empty feature dimension D");
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.dim() == 1, name, " must be a 1-D integer Tensor[N], got ", t.dim(), " dimensions");
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool,
              name, " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == like.size(0), name, " has ", t.size(0), " entries but ", like_name, " has ",
              like.size(0), " rows");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ", like.device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
              " has ", like.scalar_type());
  TORCH_CHECK(t.size(-1) == like.size(-1), name, " has D=", t.size(-1), " but ", like_name, " has D=", like.size(-1));
}

inline void check_mode(int64_t mode) {
  TORCH_CHECK(mode == kModeAll || mode == kModeCross || mode == kModeIntra,
              "mode must be 0 (all), 1 (cross) or 2 (intra), got ", mode);
}

// The inputs of the unified loss with the batch as its own reference when ref is absent.
struct UnifiedInputs {
  at::Tensor x, labels, modalities, ref, ref_labels, ref_modalities;
  bool self_ref;
};

inline UnifiedInputs check_unified_inputs(
    const at::Tensor& x, const at::Tensor& labels, const c10::optional<at::Tensor>& modalities,
    const c10::optional<at::Tensor>& ref, const c10::optional<at::Tensor>& ref_labels,
    const c10::optional<at::Tensor>& ref_modalities, double gamma, int64_t mode) {
  check_features(x, "x");
  check_index(labels, "labels", x, "x");
  check_mode(mode);
  TORCH_CHECK(gamma > 0, "gamma must be > 0, got ", gamma);
  TORCH_CHECK(mode == kModeAll || modalities.has_value(), "modalities is required unless mode is 'all'");
  if (modalities.has_value()) check_index(*modalities, "modalities", x, "x");
  // Modalities matter only to modes "cross" and "intra"; "all" ignores them.
  const bool use_modalities = mode != kModeAll;
  UnifiedInputs in;
  in.self_ref = !ref.has_value();
  in.x = x.contiguous();
  in.labels = labels.to(at::kLong).contiguous();
  in.modalities = use_modalities ? modalities->to(at::kLong).contiguous() : at::Tensor();
  if (in.self_ref) {
    in.ref = in.x;
    in.ref_labels = in.labels;
    in.ref_modalities = in.modalities;
    return in;
  }
  check_features(*ref, "ref");
  check_same(*ref, "ref", x, "x");
  TORCH_CHECK(ref_labels.has_value(), "ref_labels is required when ref is given");
  check_index(*ref_labels, "ref_labels", *ref, "ref");
  TORCH_CHECK(!use_modalities || ref_modalities.has_value(),
              "ref_modalities is required when ref is given unless mode is 'all'");
  if (ref_modalities.has_value()) check_index(*ref_modalities, "ref_modalities", *ref, "ref");
  in.ref = ref->contiguous();
  in.ref_labels = ref_labels->to(at::kLong).contiguous();
  in.ref_modalities = use_modalities ? ref_modalities->to(at::kLong).contiguous() : at::Tensor();
  return in;
}

// ---- batch_hard_triplet_loss, modality_centers, cosine_softmax_loss

// A per-anchor tensor (Tensor[n]) that a backward op receives from its forward.
inline void check_per_row(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), name, " must be a 1-D Tensor[", like.size(0), "], got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but x is on ", like.device());
}

inline void check_batch_hard_options(double margin, int64_t metric) {
  TORCH_CHECK(metric == kMetricEuclidean || metric == kMetricSqEuclidean || metric == kMetricCosine,
              "metric must be 0 (euclidean), 1 (sqeuclidean) or 2 (cosine), got ", metric);
  TORCH_CHECK(margin >= 0, "margin must be >= 0, got ", margin);
}

inline void check_batch_hard_inputs(const at::Tensor& x, const at::Tensor& labels, double margin, int64_t metric) {
  check_features(x, "x");
  check_index(labels, "labels", x, "x");
  check_batch_hard_options(margin, metric);
}

inline void check_center_inputs(const at::Tensor& x, const at::Tensor& group, int64_t num_groups) {
  check_features(x, "x");
  check_index(group, "group", x, "x");
  TORCH_CHECK(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
}

inline void check_cosine_softmax_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                                        double scale, double label_smoothing) {
  check_features(x, "x");
  check_features(weight, "weight");
  check_same(weight, "weight", x, "x");
  check_index(labels, "labels", x, "x");
  TORCH_CHECK(scale > 0, "scale must be > 0, got ", scale);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 1, "label_smoothing must be in [0, 1), got ",
              label_smoothing);
}

}  // namespace reid_ext
