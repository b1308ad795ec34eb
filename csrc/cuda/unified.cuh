// Device helpers of the unified loss's kernels (unified_triplet_loss_kernel.cu: the tile kernels;
// unified_chunks_kernel.cu: around the cuBLAS products of large problems): the pair rule, an
// anchor's outputs, and dL/dS of a pair from its anchor's statistics.
#pragma once

#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {

constexpr int kPartialFields = 5;  // max_neg, sum_neg, max_pos, sum_pos, pair flags (1 = neg, 2 = pos)

struct PairRuleDevice {
  const int64_t* labels;
  const int64_t* modalities;
  const int64_t* ref_labels;
  const int64_t* ref_modalities;
  int mode;
  bool self_ref;

  __device__ __forceinline__ int kind(int64_t anchor, int64_t reference) const {
    return pair_kind(mode, self_ref && anchor == reference, labels[anchor], ref_labels[reference],
                     modalities ? modalities[anchor] : 0, ref_modalities ? ref_modalities[reference] : 0);
  }
};

__device__ __forceinline__ PairRuleDevice rule_of(const UnifiedProblem& pb) {
  return PairRuleDevice{pb.labels, pb.modalities, pb.ref_labels, pb.ref_modalities, pb.mode, pb.self_ref};
}

// An anchor's outputs. A NaN in its row or in a paired reference makes its loss NaN even when it
// has no positive or no negative (which would otherwise give 0): a NaN never vanishes.
template <typename T>
__device__ __forceinline__ void write_anchor(const UnifiedProblem& pb, const UnifiedForwardParams& out, int64_t i,
                                             const OnlineLSE<float>& neg, const OnlineLSE<float>& pos, bool has_neg,
                                             bool has_pos) {
  const float lse_neg = neg.value(), lse_pos = pos.value();
  const bool valid = has_neg && has_pos;
  out.lse_neg[i] = lse_neg;
  out.lse_pos[i] = lse_pos;
  out.valid[i] = valid;
  store_float(static_cast<T*>(out.loss) + i, unified_anchor_loss(lse_neg, lse_pos, valid, pb.inv_x[i]));
}

struct AnchorStats {
  const float* grad_loss;
  const bool* valid;
  const float* lse_neg;
  const float* lse_pos;
  float gamma, margin;

  // dL/dS of (anchor, reference) at similarity s.
  __device__ __forceinline__ float pair_grad(int kind, int64_t anchor, float s) const {
    if (kind == 0) return 0.f;
    const float weight = unified_anchor_weight(grad_loss[anchor], lse_neg[anchor], lse_pos[anchor], valid[anchor]);
    return unified_pair_grad(kind, s, weight, lse_neg[anchor], lse_pos[anchor], gamma, margin);
  }
};

}  // namespace cuda
}  // namespace reid_ext
