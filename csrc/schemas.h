// Every reid_ext operator schema. The extension defines them in the reid_ext
// namespace (csrc/reid_ext.cpp) and the emulated-GPU build of csrc/cuda in
// reid_ext_cudasim (tools/cudasim/module.cpp), so both have exactly these.
//
// A loss op reduces over anchors itself (reduction: "mean" over valid anchors,
// "sum", or "none"), and with a scalar reduction it returns the gradients that
// grad_* ask for along with the loss, so that its backward only scales them; else
// its backward op recomputes the pairs from the saved per-anchor statistics (its
// grad_loss is Tensor[N] for "none", Tensor[] otherwise). Which kernel path
// computes them is the op's own choice.
#pragma once

#include <torch/library.h>

namespace reid_ext {

inline void define_schemas(torch::Library& m) {
  m.def("cosine_similarity(Tensor x, Tensor? y, float eps) -> Tensor");
  // Needs no S: the radial term of the normalization Jacobian is xn_i . (sum_j dS_ij yn_j).
  m.def("_cosine_similarity_backward(Tensor grad, Tensor x, Tensor? y, float eps) -> (Tensor, Tensor)");
  // loss; grad_x [N, D] and grad_ref [M, D] (else [0, D]); per-anchor validity and the two
  // log-sum-exps that the backward reuses.
  m.def(
      "unified_triplet_loss(Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, Tensor? ref_labels, "
      "Tensor? ref_modalities, float gamma, float margin, str mode, str reduction, bool grad_x, bool grad_ref) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_ref, Tensor valid, Tensor lse_neg, Tensor lse_pos)");
  m.def(
      "_unified_triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, "
      "Tensor? ref_labels, Tensor? ref_modalities, Tensor valid, Tensor lse_neg, Tensor lse_pos, float gamma, "
      "float margin, str mode, str reduction, bool grad_ref) -> (Tensor, Tensor)");
  // loss; grad_x [N, D] (else [0, D]); per anchor: validity, hardest positive / negative
  // index (-1: none) and their distances.
  m.def(
      "batch_hard_triplet_loss(Tensor x, Tensor labels, float margin, str metric, bool soft_margin, str reduction, "
      "bool grad_x) -> (Tensor loss, Tensor grad_x, Tensor valid, Tensor pos_idx, Tensor neg_idx, Tensor dist_ap, "
      "Tensor dist_an)");
  m.def(
      "_batch_hard_triplet_loss_backward(Tensor grad_loss, Tensor x, Tensor pos_idx, Tensor neg_idx, "
      "Tensor dist_ap, Tensor dist_an, float margin, str metric, bool soft_margin, str reduction) -> Tensor");
  // One group per distinct (label, modality) pair, ordered by (label, modality): each row's group,
  // and the label and modality of each group (their number depends on the data).
  m.def("_modality_groups(Tensor labels, Tensor modalities) -> (Tensor group, Tensor labels, Tensor modalities)");
  // Mean of the (normalized) rows of each group 0 <= group[i] < num_groups, and the group sizes.
  m.def("modality_centers(Tensor x, Tensor group, SymInt num_groups, bool normalize) -> (Tensor, Tensor)");
  m.def(
      "_modality_centers_backward(Tensor grad_centers, Tensor x, Tensor group, Tensor counts, bool normalize) "
      "-> Tensor");
  // The loss over the modality centers of the batch, with grad_x [N, D] (else [0, D]);
  // reduction "mean" or "sum" (per-center losses come from the two ops it composes).
  m.def(
      "hetero_center_triplet_loss(Tensor x, Tensor labels, Tensor modalities, str mining, float gamma, "
      "float margin, str reduction, bool grad_x) -> (Tensor loss, Tensor grad_x)");
  // loss; grad_x [N, D] and grad_weight [C, D] (else [0, D]); the log-sum-exp of each row's logits.
  m.def(
      "cosine_softmax_loss(Tensor x, Tensor weight, Tensor labels, float scale, float margin, "
      "float label_smoothing, str reduction, bool grad_x, bool grad_weight) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_weight, Tensor lse)");
  m.def(
      "_cosine_softmax_loss_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor labels, Tensor lse, "
      "float scale, float margin, float label_smoothing, str reduction, bool grad_x, bool grad_weight) "
      "-> (Tensor, Tensor)");
  // For each row of x, the k most (largest) or least similar rows of y (y = None: of x, itself included),
  // sorted, ties to the lower index, and the row's similarity extreme at the other end. Not differentiable.
  m.def("topk_similarity(Tensor x, Tensor? y, int k, bool largest, float eps) -> (Tensor, Tensor, Tensor)");
  // Re-ranking's sparse stages (reid_ext.evaluation; CPU): V as its entries sorted by (row, column), the local
  // query expansion over each row's k2 nearest (ranks) when k2 > 1, and the Q x G Jaccard distances of V's rows.
  m.def("_jaccard_distance(Tensor rows, Tensor cols, Tensor vals, Tensor ranks, int num_query, int k2) -> Tensor");
}

// The argument checks alone (csrc/check_ops.cpp), for reid_ext.reference: it raises the errors the
// fused ops raise.
inline void define_check_schemas(torch::Library& m) {
  m.def("_check_cosine_similarity(Tensor x, Tensor? y, float eps) -> ()");
  m.def(
      "_check_unified_triplet_loss(Tensor x, Tensor labels, Tensor? modalities, Tensor? ref, Tensor? ref_labels, "
      "Tensor? ref_modalities, float gamma, float margin, str mode, str reduction) -> ()");
  m.def("_check_batch_hard_triplet_loss(Tensor x, Tensor labels, float margin, str metric, str reduction) -> ()");
  m.def("_check_modality_centers(Tensor x, Tensor labels, Tensor modalities) -> ()");
  m.def(
      "_check_hetero_center_triplet_loss(Tensor x, Tensor labels, Tensor modalities, str mining, float gamma, "
      "float margin, str reduction) -> ()");
  m.def(
      "_check_cosine_softmax_loss(Tensor x, Tensor weight, Tensor labels, float scale, float margin, "
      "float label_smoothing, str reduction) -> ()");
}

}  // namespace reid_ext
