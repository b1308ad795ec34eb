// Math shared by the CPU and CUDA kernels (host-side argument checks are in checks.h).
//
// Includes nothing from torch, so that the .cu files stay cheap to compile.
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

// The pair rule, branch-free (no short-circuit), so that the CPU element loops vectorize it; over any
// integer type, so that they can compare int32 codes (8 lanes per AVX2 instruction instead of 4).
// "cross" wants different modalities, "intra" equal ones, "all" either.
template <typename code_t>
HOST_DEVICE_INLINE bool modality_allowed(int mode, code_t anchor_modality, code_t ref_modality) {
  return (mode == kModeAll) | ((mode == kModeCross) == (anchor_modality != ref_modality));
}

// Pair kind of anchor i and reference j: 0 = not a pair, 1 = positive, -1 = negative.
template <typename code_t>
HOST_DEVICE_INLINE int pair_kind(int mode, bool self_pair, code_t label_i, code_t label_j, code_t modality_i,
                                 code_t modality_j) {
  const int allowed = !self_pair & modality_allowed(mode, modality_i, modality_j);
  const int sign = (int(label_i == label_j) << 1) - 1;
  return sign & -allowed;  // in bits, so that no select is left to if-convert
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
HOST_DEVICE_INLINE float math_frexp(float v, int* exponent) { return frexpf(v, exponent); }
HOST_DEVICE_INLINE double math_frexp(double v, int* exponent) { return frexp(v, exponent); }
HOST_DEVICE_INLINE float math_ldexp(float v, int exponent) { return ldexpf(v, exponent); }
HOST_DEVICE_INLINE double math_ldexp(double v, int exponent) { return ldexp(v, exponent); }

template <typename acc_t>
HOST_DEVICE_INLINE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// exp as a function object, for the math below that takes its exp as an argument (the CPU element
// loops pass their vectorizable one, cpu::VExp).
struct MathExp {
  template <typename acc_t>
  HOST_DEVICE_INLINE acc_t operator()(acc_t v) const {
    return math_exp(v);
  }
};

// Online log-sum-exp: the running (max, sum of exp(v - max)). A NaN value makes
// the sum NaN (v > max is false, exp(NaN) is NaN), so it is never dropped: push(NaN)
// is how a fold that found a NaN outside push/merge records it.
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

  // Adds a block of values given as its (max, sum of exp(v - max)). A NaN other_sum (the block had
  // a NaN) makes the sum NaN whatever other_max is, -inf included.
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

  // Whether nothing was pushed or merged in (a NaN counts as a value).
  HOST_DEVICE_INLINE bool empty() const { return sum == acc_t(0); }

  // log(sum exp(v)); -inf when empty, NaN once a NaN was folded in.
  HOST_DEVICE_INLINE acc_t value() const {
    return empty() ? neg_infinity<acc_t>() : max + math_log(sum);
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

// The floor of the norms that the losses normalize by: x / max(|x|, norm_eps).
template <typename acc_t>
HOST_DEVICE_INLINE constexpr acc_t norm_eps() {
  return acc_t(1e-12);
}

// Rows of large magnitude, scaled. Cosine similarity is scale-invariant, so the kernels may compute
// it from c_i * x_i for any c_i > 0; with c_i a power of two the scaling is exact. A row whose
// largest magnitude exceeds big_row<acc_t>() is scaled by row_scale(max_abs) into [0.5, 1), so that
// neither its squared norm nor its dot products (D terms) can overflow; other rows keep c_i = 1
// (small rows too: the norm floor norm_eps applies to the unscaled norm). The gradient of the
// scaled row is c_i times the gradient of the row itself.
template <typename acc_t>
HOST_DEVICE_INLINE constexpr acc_t big_row();
template <>
HOST_DEVICE_INLINE constexpr float big_row<float>() {
  return 1099511627776.0f;  // 2^40: squares of 2^80, sums over D < 2^47 terms stay below float's 2^128
}
template <>
HOST_DEVICE_INLINE constexpr double big_row<double>() {
  return 2.582249878086908e+120;  // 2^400
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t row_scale(acc_t max_abs) {
  // Small, NaN and infinite rows stay as they are (inf - inf is NaN): a NaN or inf stays one.
  if (!(max_abs > big_row<acc_t>()) || max_abs - max_abs != acc_t(0)) return acc_t(1);
  int exponent = 0;
  math_frexp(max_abs, &exponent);  // max_abs = m * 2^exponent, m in [0.5, 1)
  return math_ldexp(acc_t(1), -exponent);
}

// 1 / max(|x|, eps), from the squared norm.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t inverse_norm(acc_t squared_norm, acc_t eps) {
  const acc_t norm = math_sqrt(squared_norm);
  return acc_t(1) / (norm > eps ? norm : eps);
}

// The loss of an anchor that has no positive or no negative: 0, unless a NaN reached it (NaN
// features never vanish): its own feature row (row_stat: any statistic of that row that is NaN
// when the row has a NaN, its squared norm on the CPU, its inverse norm on CUDA) or a paired
// reference's (a NaN statistic, here a and b: the log-sum-exps or the hardest distances).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t invalid_anchor_loss(acc_t a, acc_t b, acc_t row_stat) {
  return (a != a) | (b != b) | (row_stat != row_stat) ? quiet_nan<acc_t>() : acc_t(0);
}

// The unified loss of one anchor from its two log-sum-exps: softplus(LSE_neg + LSE_pos) when it has
// both a positive and a negative, else invalid_anchor_loss (row_stat as there).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_anchor_loss(acc_t lse_neg, acc_t lse_pos, bool valid, acc_t row_stat) {
  return valid ? softplus(lse_neg + lse_pos) : invalid_anchor_loss(lse_neg, lse_pos, row_stat);
}

// The value a pair adds to its anchor's log-sum-exp: -gamma*S for a positive, gamma*(S + margin)
// for a negative.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_pair_value(bool positive, acc_t sim, acc_t gamma, acc_t margin) {
  return positive ? -gamma * sim : gamma * (sim + margin);
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_anchor_weight(acc_t grad, acc_t lse_neg, acc_t lse_pos, bool valid) {
  return valid ? grad * sigmoid(lse_neg + lse_pos) : acc_t(0);
}

// What dL/dS subtracts in the exponent of an anchor with weight w: its log-sum-exp, or +inf where w = 0,
// so that exp(v - shift) is 0 there rather than exp(+inf) (an invalid anchor's LSE may be -inf).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_grad_shift(acc_t weight, acc_t lse) {
  return weight == acc_t(0) ? std::numeric_limits<acc_t>::infinity() : lse;
}

// dL/dS_ij of the unified loss for one pair, branch-free (the CPU element loops vectorize it), given
// the anchor's weight w_i = grad_i * sigmoid(LSE_neg + LSE_pos) (unified_anchor_weight) and shifts
// (unified_grad_shift): negative: w_i * gamma * exp(gamma*(S+margin) - LSE_neg); positive:
// -w_i * gamma * exp(-gamma*S - LSE_pos); 0 when kind = 0. A NaN S gives NaN, also where w_i = 0.
template <typename acc_t, typename Exp>
HOST_DEVICE_INLINE acc_t unified_pair_grad_shifted(int kind, acc_t sim, acc_t weight, acc_t shift_neg,
                                                   acc_t shift_pos, acc_t gamma, acc_t margin, const Exp& exp) {
  const bool positive = kind > 0;
  const acc_t value = unified_pair_value(positive, sim, gamma, margin);
  const acc_t grad = (positive ? -weight : weight) * gamma * exp(value - (positive ? shift_pos : shift_neg));
  return kind != 0 ? grad : acc_t(0);
}

// The same from the anchor's log-sum-exps.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t unified_pair_grad(int kind, acc_t sim, acc_t weight, acc_t lse_neg, acc_t lse_pos,
                                           acc_t gamma, acc_t margin) {
  return unified_pair_grad_shifted(kind, sim, weight, unified_grad_shift(weight, lse_neg),
                                   unified_grad_shift(weight, lse_pos), gamma, margin, MathExp());
}

// ---- batch_hard_triplet_loss

// Distance of batch_hard_triplet_loss (schema int `metric`).
enum Metric : int { kMetricEuclidean = 0, kMetricSqEuclidean = 1, kMetricCosine = 2 };

// Floor of the squared euclidean distance under the square root: keeps 1 / d finite.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t min_squared_distance() {
  return acc_t(1e-12);
}

// Distance of a pair from its dot product and the squared norms (euclidean metrics) or the
// inverse norms (cosine: 1 - S). The clamps are written `v < floor ? floor : v` so that NaN stays NaN.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t pair_distance(int metric, acc_t dot, acc_t sq_i, acc_t sq_j, acc_t inv_i, acc_t inv_j) {
  if (metric == kMetricCosine) return acc_t(1) - dot * inv_i * inv_j;
  acc_t d2 = sq_i + sq_j - acc_t(2) * dot;
  if (d2 < acc_t(0)) d2 = acc_t(0);  // cancellation can leave it slightly negative
  if (metric == kMetricSqEuclidean) return d2;
  return math_sqrt(d2 < min_squared_distance<acc_t>() ? min_squared_distance<acc_t>() : d2);
}

// The hardest positive (largest distance) or hardest negative (smallest distance) seen so far.
// Candidates are ranked by a total order, so every reduction order picks the same one: a NaN
// distance beats any number (torch.max/min propagate NaN, so a NaN feature reaches the loss),
// then the harder distance, then the lower index. index = -1: no candidate yet.
template <typename acc_t>
struct Hardest {
  acc_t dist;
  int64_t index;

  HOST_DEVICE_INLINE Hardest() : dist(0), index(-1) {}

  HOST_DEVICE_INLINE bool beaten_by(acc_t d, int64_t j, bool largest) const {
    if (j < 0) return false;
    if (index < 0) return true;
    const bool nan_d = d != d, nan_here = dist != dist;
    if (nan_d || nan_here) return nan_d && (!nan_here || j < index);
    if (d != dist) return largest ? d > dist : d < dist;
    return j < index;
  }

  HOST_DEVICE_INLINE void offer(acc_t d, int64_t j, bool largest) {
    if (beaten_by(d, j, largest)) {
      dist = d;
      index = j;
    }
  }

  // offer() for candidates that arrive in increasing index order: a tie keeps the earlier one.
  HOST_DEVICE_INLINE void offer_in_order(acc_t d, int64_t j, bool largest) {
    const bool harder = largest ? d > dist : d < dist;
    if (index < 0 || harder || (d != d && dist == dist)) {
      dist = d;
      index = j;
    }
  }
};

// Loss of one anchor from its hardest pair distances: relu(d_ap - d_an + margin), or
// softplus(d_ap - d_an) with the soft margin; invalid_anchor_loss without a positive or a negative
// (row_stat as there).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t batch_hard_anchor_loss(acc_t d_ap, acc_t d_an, acc_t margin, bool soft, bool valid,
                                                acc_t row_stat) {
  if (!valid) return invalid_anchor_loss(d_ap, d_an, row_stat);
  const acc_t diff = d_ap - d_an;
  if (soft) return softplus(diff);
  const acc_t hinge = diff + margin;
  return hinge < acc_t(0) ? acc_t(0) : hinge;
}

// grad * dL_i/d(d_ap), which is also -grad * dL_i/d(d_an). As torch.relu, no gradient at the kink.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t batch_hard_anchor_weight(acc_t grad, acc_t d_ap, acc_t d_an, acc_t margin, bool soft,
                                                  bool valid) {
  if (!valid) return acc_t(0);
  const acc_t diff = d_ap - d_an;
  if (soft) return grad * sigmoid(diff);
  return diff + margin > acc_t(0) ? grad : acc_t(0);
}

// d dist / d x_self = self * x_self + other * x_other for a pair at distance `dist`; inv_* are
// 1 / max(|x|, eps) and radial_self is inv_self^2 where |x_self| > eps, else 0 (cosine only).
template <typename acc_t>
struct PairGrad {
  acc_t self, other;
};

template <typename acc_t>
HOST_DEVICE_INLINE PairGrad<acc_t> distance_grad(int metric, acc_t dist, acc_t inv_self, acc_t inv_other,
                                                 acc_t radial_self) {
  if (metric == kMetricCosine) {
    // dist = 1 - S, dS/dx_self = inv_self * inv_other * x_other - S * radial_self * x_self
    return PairGrad<acc_t>{(acc_t(1) - dist) * radial_self, -inv_self * inv_other};
  }
  if (metric == kMetricSqEuclidean) {
    // 2 (x_self - x_other); none where the clamp at 0 was active
    return dist <= acc_t(0) ? PairGrad<acc_t>{0, 0} : PairGrad<acc_t>{2, -2};
  }
  // (x_self - x_other) / dist; none where the floor under the square root was active
  const acc_t floor = math_sqrt(min_squared_distance<acc_t>());
  return dist <= floor ? PairGrad<acc_t>{0, 0} : PairGrad<acc_t>{acc_t(1) / dist, -acc_t(1) / dist};
}

// ---- cosine_softmax_loss

// Logit of a class: scale * (cos - margin) for the target class, scale * cos otherwise.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t cosine_logit(acc_t cos, bool is_target, acc_t scale, acc_t margin) {
  return scale * (is_target ? cos - margin : cos);
}

// Cross-entropy with label smoothing eps over C classes, from the row's log-sum-exp, target
// logit and sum of logits: (1 - eps) * (lse - z_y) + eps / C * sum_c (lse - z_c).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t smoothed_cross_entropy(acc_t lse, acc_t target_logit, acc_t logit_sum, acc_t smoothing,
                                                int64_t num_classes) {
  return lse - (acc_t(1) - smoothing) * target_logit - smoothing / acc_t(num_classes) * logit_sum;
}

// dCE/dz_c = softmax_c - (1 - eps) [c == y] - eps / C, with the exp given (the CPU row loops pass
// their vectorizable one).
template <typename acc_t, typename Exp>
HOST_DEVICE_INLINE acc_t smoothed_cross_entropy_grad(acc_t logit, acc_t lse, bool is_target, acc_t smoothing,
                                                     int64_t num_classes, const Exp& exp) {
  return exp(logit - lse) - (is_target ? acc_t(1) - smoothing : acc_t(0)) - smoothing / acc_t(num_classes);
}

template <typename acc_t>
HOST_DEVICE_INLINE acc_t smoothed_cross_entropy_grad(acc_t logit, acc_t lse, bool is_target, acc_t smoothing,
                                                     int64_t num_classes) {
  return smoothed_cross_entropy_grad(logit, lse, is_target, smoothing, num_classes, MathExp());
}

// ---- topk_similarity

// Whether (a, ja) ranks before (b, jb) in a top-k, as torch.topk orders: by value, largest or
// smallest first, NaN above every number (so first with largest, last without), and equal values
// (NaNs too) by the lower index. A total order, so every merge order of tiles gives the same result.
template <typename acc_t>
HOST_DEVICE_INLINE bool topk_before(acc_t a, int64_t ja, acc_t b, int64_t jb, bool largest) {
  const bool nan_a = a != a, nan_b = b != b;
  if (nan_a != nan_b) return nan_a == largest;
  if (!nan_a && a != b) return largest ? a > b : a < b;
  return ja < jb;
}

}  // namespace reid_ext
