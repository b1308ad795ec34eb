// Math shared by the CPU and CUDA kernels, and (host side only) argument checks.
//
// The device part includes nothing from torch so that the .cu files stay cheap
// to compile; the checks below it are compiled only into the .cpp glue.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE_INLINE inline __attribute__((always_inline))
#endif

namespace reid_ext {

// Which references may pair with an anchor, by modality (schema int `mode`).
enum PairMode : int { kModeAll = 0, kModeCross = 1, kModeIntra = 2 };

// Branch-free, so that CPU element loops vectorize: "cross" wants different
// modalities, "intra" equal ones, "all" either.
HOST_DEVICE_INLINE bool modality_allowed(int mode, int64_t anchor_modality, int64_t ref_modality) {
  return mode == kModeAll || ((mode == kModeCross) == (anchor_modality != ref_modality));
}

// Pair kind of anchor i and reference j: 0 = not a pair, 1 = positive, -1 = negative.
HOST_DEVICE_INLINE int pair_kind(
    int mode, bool self_pair, int64_t label_i, int64_t label_j, int64_t modality_i, int64_t modality_j) {
  if (self_pair || !modality_allowed(mode, modality_i, modality_j)) return 0;
  return label_i == label_j ? 1 : -1;
}

// Overloads that keep float arithmetic in float on both host and device.
HOST_DEVICE_INLINE float math_exp(float v) { return expf(v); }
HOST_DEVICE_INLINE double math_exp(double v) { return exp(v); }
HOST_DEVICE_INLINE float math_log(float v) { return logf(v); }
HOST_DEVICE_INLINE double math_log(double v) { return log(v); }
HOST_DEVICE_INLINE float math_log1p(float v) { return log1pf(v); }
HOST_DEVICE_INLINE double math_log1p(double v) { return log1p(v); }
HOST_DEVICE_INLINE float math_sqrt(float v) { return sqrtf(v); }
HOST_DEVICE_INLINE double math_sqrt(double v) { return sqrt(v); }

template <typename acc_t>
HOST_DEVICE_INLINE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Online log-sum-exp: the running (max, sum of exp(v - max)). A NaN value makes
// the sum NaN (v > max is false, exp(NaN) is NaN), so it is never dropped.
template <typename acc_t>
struct OnlineLSE {
  acc_t max;
  acc_t sum;

  HOST_DEVICE_INLINE OnlineLSE() : max(neg_infinity<acc_t>()), sum(0) {}

  HOST_DEVICE_INLINE void push(acc_t v) {
    if (v > max) {
      sum = sum * math_exp(max - v) + acc_t(1);  // exp(-inf) = 0 on the first value
      max = v;
    } else {
      sum += math_exp(v - max);
    }
  }

  HOST_DEVICE_INLINE void merge(acc_t other_max, acc_t other_sum) {
    if (other_sum == acc_t(0)) return;  // empty: nothing to add (also guards -inf - -inf)
    if (sum == acc_t(0)) {
      max = other_max;
      sum = other_sum;
    } else if (other_max > max) {
      sum = sum * math_exp(max - other_max) + other_sum;
      max = other_max;
    } else {
      sum += other_sum * math_exp(other_max - max);
    }
  }

  // log(sum exp(v)); -inf when nothing was pushed.
  HOST_DEVICE_INLINE acc_t value() const {
    return sum == acc_t(0) ? neg_infinity<acc_t>() : max + math_log(sum);
  }
};

template <typename acc_t>
HOST_DEVICE_INLINE acc_t softplus(acc_t v) {
  // log(1 + exp(v)) without overflow for large v.
  return v > acc_t(0) ? v + math_log1p(math_exp(-v)) : math_log1p(math_exp(v));
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t sigmoid(acc_t v) {
  if (v >= acc_t(0)) return acc_t(1) / (acc_t(1) + math_exp(-v));
  const acc_t e = math_exp(v);
  return e / (acc_t(1) + e);
}

// 1 / max(|x|, eps), from the squared norm.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t inverse_norm(acc_t squared_norm, acc_t eps) {
  const acc_t norm = math_sqrt(squared_norm);
  return acc_t(1) / (norm > eps ? norm : eps);
}

// The unified loss of one anchor from its two log-sum-exps:
// softplus(LSE_neg + LSE_pos) when it has both a positive and a negative, else 0.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_anchor_loss(acc_t lse_neg, acc_t lse_pos, bool valid) {
  return valid ? softplus(lse_neg + lse_pos) : acc_t(0);
}

// dL/dS_ij of the unified loss for one pair, given the anchor's statistics:
// w_i = grad_i * sigmoid(LSE_neg + LSE_pos) (0 for an invalid anchor), then
// negative: w_i * gamma * exp(gamma*(S+margin) - LSE_neg); positive: -w_i * gamma * exp(-gamma*S - LSE_pos).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_pair_grad(
    int kind, acc_t sim, acc_t weight, acc_t lse_neg, acc_t lse_pos, acc_t gamma, acc_t margin) {
  if (kind == 0 || weight == acc_t(0)) return acc_t(0);  // also keeps exp(+inf) of invalid anchors out
  if (kind < 0) return weight * gamma * math_exp(gamma * (sim + margin) - lse_neg);
  return -weight * gamma * math_exp(-gamma * sim - lse_pos);
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_anchor_weight(acc_t grad, acc_t lse_neg, acc_t lse_pos, bool valid) {
  return valid ? grad * sigmoid(lse_neg + lse_pos) : acc_t(0);
}

}  // namespace reid_ext

#if !defined(__CUDACC__) && !defined(__HIPCC__)
// ---- Host-side argument checks for the C++ glue (the Python wrappers check first, with friendlier text). ----
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace reid_ext
#endif
