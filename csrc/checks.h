// Argument checks of the ops, written once: every op calls them at the top of its
// host function (CPU kernels and CUDA glue alike), and reid_ext.reference calls them
// through the _check_* ops (csrc/check_ops.cpp), so a bad argument gives the same
// error, naming it, on every path. The backends add only their dtype rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>

#include "common.h"

namespace reid_ext {

enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };
enum class Mining : int { kAll = 0, kHard = 1 };

inline Reduction parse_reduction(c10::string_view value) {
  if (value == "mean") return Reduction::kMean;
  if (value == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(value == "none", "reduction must be one of 'mean', 'sum', 'none', got '", value, "'");
  return Reduction::kNone;
}

inline PairMode parse_mode(c10::string_view value) {
  if (value == "all") return kModeAll;
  if (value == "cross") return kModeCross;
  TORCH_CHECK_VALUE(value == "intra", "mode must be one of 'all', 'cross', 'intra', got '", value, "'");
  return kModeIntra;
}

inline Metric parse_metric(c10::string_view value) {
  if (value == "euclidean") return kMetricEuclidean;
  if (value == "sqeuclidean") return kMetricSqEuclidean;
  TORCH_CHECK_VALUE(value == "cosine", "metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got '", value,
                    "'");
  return kMetricCosine;
}

inline Mining parse_mining(c10::string_view value) {
  if (value == "all") return Mining::kAll;
  TORCH_CHECK_VALUE(value == "hard", "mining must be one of 'all', 'hard', got '", value, "'");
  return Mining::kHard;
}

inline void check_finite(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be a finite number, got ", value);
}

inline void check_finite_positive(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, name, " must be a finite number > 0, got ", value);
}

inline void check_finite_nonnegative(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be a finite number >= 0, got ", value);
}

inline void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is required (a Tensor[N, D])");
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D Tensor[N, D], got shape ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.sym_size(1) > 0, name, " must have a non-empty feature dimension D, got shape ", t.sym_sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a floating-point Tensor[N, D], got ", t.scalar_type());
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is required (an integer Tensor[N])");
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be a 1-D integer Tensor[N], got shape ", t.sym_sizes());
  TORCH_CHECK_TYPE(!t.is_floating_point() && !t.is_complex() && t.scalar_type() != at::kBool, name,
                   " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sym_size(0) == like.sym_size(0), name, " has ", t.sym_size(0), " entries but ", like_name,
                    " has ", like.sym_size(0), " rows");
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
                    like.device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
                    like.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
                   " has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.sym_size(-1) == like.sym_size(-1), name, " has D=", t.sym_size(-1), " but ", like_name,
                    " has D=", like.sym_size(-1));
}

// A per-anchor tensor (Tensor[N]) that a backward op receives from its forward.
inline void check_per_row(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == like.sym_size(0), name, " must be a 1-D Tensor[",
                    like.sym_size(0), "], got shape ", t.sym_sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but x is on ", like.device());
}

// The CPU kernels' dtypes (the CUDA glue has its own: float32, float16, bfloat16).
inline void check_cpu_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64 on CPU, got ", t.scalar_type());
}

// ---- per op

inline void check_cosine_similarity_args(const at::Tensor& x, const c10::optional<at::Tensor>& y, double eps) {
  check_features(x, "x");
  if (y.has_value()) {
    check_features(*y, "y");
    check_same(*y, "y", x, "x");
  }
  check_finite_positive(eps, "eps");
}

inline void check_topk_similarity_args(const at::Tensor& x, const c10::optional<at::Tensor>& y, int64_t k,
                                       double eps) {
  check_cosine_similarity_args(x, y, eps);
  const int64_t m = y.has_value() ? y->size(0) : x.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= m, "k must be in [1, M] with M = ", m, " the number of rows of ",
                    y.has_value() ? "y" : "x (y=None)", ", got k=", k);
}

struct UnifiedArgs {
  PairMode mode;
  Reduction reduction;
};

inline UnifiedArgs check_unified_args(const at::Tensor& x, const at::Tensor& labels,
                                      const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
                                      const c10::optional<at::Tensor>& ref_labels,
                                      const c10::optional<at::Tensor>& ref_modalities, double gamma, double margin,
                                      c10::string_view mode_name, c10::string_view reduction) {
  check_features(x, "x");
  check_index(labels, "labels", x, "x");
  check_finite_positive(gamma, "gamma");
  check_finite(margin, "margin");
  const PairMode mode = parse_mode(mode_name);
  const UnifiedArgs args{mode, parse_reduction(reduction)};
  if (modalities.has_value()) {
    check_index(*modalities, "modalities", x, "x");
  } else {
    TORCH_CHECK_VALUE(mode == kModeAll, "modalities is required when mode='", mode_name, "'");
  }
  if (!ref.has_value()) {
    TORCH_CHECK_VALUE(!ref_labels.has_value(), "ref_labels was given without ref");
    TORCH_CHECK_VALUE(!ref_modalities.has_value(), "ref_modalities was given without ref");
    return args;
  }
  check_features(*ref, "ref");
  check_same(*ref, "ref", x, "x");
  TORCH_CHECK_VALUE(ref_labels.has_value(), "ref_labels is required when ref is given");
  check_index(*ref_labels, "ref_labels", *ref, "ref");
  if (ref_modalities.has_value()) {
    check_index(*ref_modalities, "ref_modalities", *ref, "ref");
  } else {
    TORCH_CHECK_VALUE(mode == kModeAll, "ref_modalities is required when ref is given and mode='", mode_name, "'");
  }
  return args;
}

struct BatchHardArgs {
  Metric metric;
  Reduction reduction;
};

inline BatchHardArgs check_batch_hard_args(const at::Tensor& x, const at::Tensor& labels, double margin,
                                           c10::string_view metric, c10::string_view reduction) {
  check_features(x, "x");
  check_index(labels, "labels", x, "x");
  check_finite_nonnegative(margin, "margin");
  return BatchHardArgs{parse_metric(metric), parse_reduction(reduction)};
}

inline void check_centers_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& modalities) {
  check_features(x, "x");
  check_index(labels, "labels", x, "x");
  check_index(modalities, "modalities", x, "x");
}

// The op on known groups: group[i] in [0, num_groups).
inline void check_center_groups(const at::Tensor& x, const at::Tensor& group, int64_t num_groups) {
  check_features(x, "x");
  check_index(group, "group", x, "x");
  TORCH_CHECK_VALUE(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
}

struct HeteroArgs {
  Mining mining;
  Reduction reduction;
};

inline HeteroArgs check_hetero_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& modalities,
                                    c10::string_view mining, double gamma, double margin,
                                    c10::string_view reduction) {
  check_centers_args(x, labels, modalities);
  const HeteroArgs args{parse_mining(mining), parse_reduction(reduction)};
  check_finite_positive(gamma, "gamma");
  if (args.mining == Mining::kHard) {
    check_finite_nonnegative(margin, "margin");
  } else {
    check_finite(margin, "margin");
  }
  return args;
}

inline Reduction check_cosine_softmax_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                                           double scale, double margin, double label_smoothing,
                                           c10::string_view reduction) {
  check_features(x, "x");
  check_features(weight, "weight");
  check_same(weight, "weight", x, "x");
  check_index(labels, "labels", x, "x");
  check_finite_positive(scale, "scale");
  check_finite(margin, "margin");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 1, "label_smoothing must be in [0, 1), got ",
                    label_smoothing);
  return parse_reduction(reduction);
}

// ---- inputs as the kernels read them

// The unified loss's inputs, contiguous with int64 labels; the batch is its own reference when
// ref is absent. Modalities matter to modes "cross" and "intra" only.
struct UnifiedInputs {
  at::Tensor x, labels, modalities, ref, ref_labels, ref_modalities;
  bool self_ref;
};

inline UnifiedInputs unified_inputs(const at::Tensor& x, const at::Tensor& labels,
                                    const c10::optional<at::Tensor>& modalities, const c10::optional<at::Tensor>& ref,
                                    const c10::optional<at::Tensor>& ref_labels,
                                    const c10::optional<at::Tensor>& ref_modalities, PairMode mode) {
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
  } else {
    in.ref = ref->contiguous();
    in.ref_labels = ref_labels->to(at::kLong).contiguous();
    in.ref_modalities = use_modalities ? ref_modalities->to(at::kLong).contiguous() : at::Tensor();
  }
  return in;
}

}  // namespace reid_ext
