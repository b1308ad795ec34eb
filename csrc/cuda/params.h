// Plain launch parameters between the torch glue (*_cuda.cpp) and the kernels
// (*_kernel.cu): raw pointers and sizes only, so the .cu files need no torch
// headers. Scratch buffers come from the glue (the caching allocator).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace reid_ext {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- rows (csrc/cuda/rows_kernel.cu)

// inv[r] = 1 / max(|v_r|, eps) and, unless radial is null, radial[r] = inv[r] where |v_r| > eps, else 0
// (RowNorm in device.cuh), computed without overflow; NaN for a row with a NaN. v: [rows, d].
cudaError_t launch_row_norms(ScalarKind kind, const void* v, int64_t rows, int64_t d, float eps, float* inv,
                             float* radial, cudaStream_t stream);
// The same, and out[r] = v_r * inv[r] (the normalized rows, for cuBLAS products), in float32 or, with
// same_dtype, in v's dtype (tensor cores for half precision).
cudaError_t launch_normalized_rows(ScalarKind kind, const void* v, int64_t rows, int64_t d, float eps, float* inv,
                                   float* radial, void* out, bool same_dtype, cudaStream_t stream);

// ---- cosine_similarity

struct CosineForwardParams {
  const void* x;  // [n, d]
  const void* y;  // [m, d]
  void* out;      // [n, m], same dtype as x
  // float32 scratch: the rows' inverse norms (inv_y may be inv_x when y is x).
  float* inv_x;  // [n]
  float* inv_y;  // [m]
  int64_t n, m, d;
  float eps;
  ScalarKind kind;
};

// grad_a[i] = inv_a[i] * p_i - radial_a[i] * an_i (an_i . p_i) with p_i = sum_j c_ij bn_j, an = a * inv_a,
// bn likewise, and c_ij = grad[i, j] (+ grad[j, i] when add_transpose, for y = x), read through strides.
struct CosineBackwardParams {
  const float* grad;  // float32 view of dL/dS
  int64_t row_stride, col_stride;
  bool add_transpose;
  const void* a;  // [rows, d], the side that receives the gradient
  const void* b;  // [cols, d]
  void* grad_a;   // [rows, d], dtype of a
  // float32 scratch: the RowNorms of a (inv, radial) and b (inv), and p.
  float* inv_a;     // [rows]
  float* radial_a;  // [rows]
  float* inv_b;     // [cols]
  float* product;   // [rows, d]
  bool product_given;  // p was computed already (cuBLAS, for large problems): only the Jacobian is left
  int64_t rows, cols, d;
  float eps;
  ScalarKind kind;
};

cudaError_t launch_cosine_forward(const CosineForwardParams& p, cudaStream_t stream);
cudaError_t launch_cosine_backward(const CosineBackwardParams& p, cudaStream_t stream);

// ---- unified_triplet_loss

struct UnifiedProblem {
  const void* x;    // [n, d] anchors
  const void* ref;  // [m, d] references (x itself when self_ref)
  const int64_t* labels;          // [n]
  const int64_t* modalities;      // [n] or null (mode "all")
  const int64_t* ref_labels;      // [m]
  const int64_t* ref_modalities;  // [m] or null
  // The RowNorms of x and ref (the same arrays when self_ref), computed by the launchers into
  // these float32 buffers.
  float* inv_x;       // [n]
  float* radial_x;    // [n]
  float* inv_ref;     // [m]
  float* radial_ref;  // [m]
  int64_t n, m, d;
  float gamma, margin;
  int mode;
  bool self_ref;
  ScalarKind kind;
};

struct UnifiedForwardParams {
  void* loss;      // [n], dtype of x
  bool* valid;     // [n]
  float* lse_neg;  // [n]
  float* lse_pos;  // [n]
  // With splits > 1, the reference range is split across blocks, which write
  // (max_neg, sum_neg, max_pos, sum_pos, pair counts) per split into `partial`
  // ([splits, 5, n] floats) for a merge kernel.
  float* partial;
  int splits;
};

struct UnifiedBackwardParams {
  const float* grad_loss;  // [n]
  const bool* valid;       // [n]
  const float* lse_neg;    // [n]
  const float* lse_pos;    // [n]
  bool rows_are_anchors;   // grad_x (true) or grad_ref (false)
  // [splits, rows, d] and [splits, rows] float32 partial sums, merged by a second kernel.
  float* partial_grad;
  float* partial_radial;
  int splits;
  void* grad;  // [rows, d], dtype of x
};

cudaError_t launch_unified_forward(const UnifiedProblem& problem, const UnifiedForwardParams& p, cudaStream_t stream);
cudaError_t launch_unified_backward(const UnifiedProblem& problem, const UnifiedBackwardParams& p,
                                    cudaStream_t stream);

// Bank- and global-batch-sized problems: the cosines come from cuBLAS, a chunk of references at a
// time (sim: [n, cols] float32, the anchors against references [j0, j0 + cols)), and these kernels
// fold each chunk into per-anchor running statistics (stats: [5, n] floats, max_neg, sum_neg,
// max_pos, sum_pos, pair flags; `first` initializes them), finish them into the forward's
// outputs, and turn a chunk into dL/dS for the products of the backward.
struct UnifiedChunk {
  const float* sim;
  int64_t j0, cols;
  bool first;
};

cudaError_t launch_unified_chunk_forward(const UnifiedProblem& problem, const UnifiedChunk& chunk, float* stats,
                                         cudaStream_t stream);
cudaError_t launch_unified_chunk_finish(const UnifiedProblem& problem, const float* stats,
                                        const UnifiedForwardParams& out, cudaStream_t stream);
// coef [n, cols] (dtype of x) = dL/dS of the chunk (with the batch as its own reference,
// dL/dS_ij + dL/dS_ji: the anchors' gradient), and row_radial[i] += sum_j coef_ij S_ij; with
// col_radial not null (a bank that receives a gradient, which coef^T serves), col_radial[c] =
// sum_i coef_ic S_ic. stats: the backward's per-anchor inputs (grad_loss, valid, lse_neg, lse_pos).
cudaError_t launch_unified_chunk_backward(const UnifiedProblem& problem, const UnifiedBackwardParams& stats,
                                          const UnifiedChunk& chunk, void* coef, float* row_radial, float* col_radial,
                                          cudaStream_t stream);

// out[r] = inv[r] * acc[r] - radial[r] * sums[r] * rown[r] (the normalization Jacobian after
// acc = dL/dS @ the other side's normalized rows went through cuBLAS); rown: the normalized rows,
// of `kind` as out. [count, d] each.
cudaError_t launch_normalization_finish(ScalarKind kind, const void* rown, int64_t count, int64_t d, const float* acc,
                                        const float* inv, const float* radial, const float* sums, void* out,
                                        cudaStream_t stream);

// Rows per block and references per tile of the fused kernels.
constexpr int kTile = 64;

// ---- batch_hard_triplet_loss

struct BatchHardForwardParams {
  const void* x;          // [n, d]
  const int64_t* labels;  // [n]
  // float32 scratch [n], filled by the launcher: the rows' inverse norms. The cosine metric reads
  // the normalized rows; every metric gives an anchor whose row has a NaN a NaN loss.
  float* inv;
  int64_t n, d;
  int metric;
  float margin;
  bool soft_margin;
  ScalarKind kind;
  void* loss;        // [n], dtype of x
  bool* valid;       // [n]
  int64_t* pos_idx;  // [n]
  int64_t* neg_idx;  // [n]
  float* dist_ap;    // [n]
  float* dist_an;    // [n]
  // With splits > 1 the reference range is split across blocks (grid.y); each writes the
  // hardest positive and negative of its range ([splits, 2, n]) for a merge kernel.
  float* partial_dist;
  int64_t* partial_idx;
  int splits;
};

struct BatchHardBackwardParams {
  const void* x;             // [n, d]
  const float* grad_loss;    // [n]
  const int64_t* pos_idx;    // [n]
  const int64_t* neg_idx;    // [n]
  const float* dist_ap;      // [n]
  const float* dist_an;      // [n]
  // Pair p < n is (anchor p, pos_idx[p]), pair p >= n is (anchor p - n, neg_idx[p - n]).
  // incoming_pairs[incoming_offsets[k], incoming_offsets[k + 1]) are the pairs whose
  // reference is row k, in increasing p.
  const int64_t* incoming_offsets;  // [n + 1]
  const int64_t* incoming_pairs;    // [2n]
  int64_t n, d;
  int metric;
  float margin;
  bool soft_margin;
  ScalarKind kind;
  // float32 scratch [n]: the RowNorm of each row (inv, radial), and dL/d(d_ap) of each anchor.
  float* inv;
  float* radial;
  float* weight;
  void* grad_x;  // [n, d], dtype of x
};

cudaError_t launch_batch_hard_forward(const BatchHardForwardParams& p, cudaStream_t stream);

// A large batch, a chunk of references at a time (the glue's cuBLAS products, as for the unified
// loss): dots [n, cols] against references [j0, j0 + cols), the cosines of the normalized rows for
// the cosine metric, else the raw dot products with the rows' squared norms sq [n]. Each chunk
// offers its hardest pairs to p.partial_dist / partial_idx ([2, n]; `first` initializes them);
// the finish writes the outputs from them (p.splits = 1). p.inv must hold the rows' inverse norms.
struct BatchHardChunk {
  const float* dots;
  int64_t j0, cols;
  bool first;
};

cudaError_t launch_batch_hard_chunk(const BatchHardForwardParams& p, const BatchHardChunk& chunk, const float* sq,
                                    cudaStream_t stream);
cudaError_t launch_batch_hard_chunk_finish(const BatchHardForwardParams& p, cudaStream_t stream);
cudaError_t launch_batch_hard_backward(const BatchHardBackwardParams& p, cudaStream_t stream);

// ---- modality_centers

struct CentersParams {
  const void* x;         // [n, d]
  const int64_t* group;  // [n]
  // Forward: members[offsets[g], offsets[g + 1]) are the rows of group g in increasing order.
  const int64_t* offsets;  // [num_groups + 1]
  const int64_t* members;  // [n]
  // Backward: the group sizes the forward returned.
  const int64_t* counts;  // [num_groups]
  int64_t n, d, num_groups;
  bool normalize;
  ScalarKind kind;
  float* inv;  // float32 scratch [n]
};

// centers[g] = mean over the members of g of x_i (* inv_i with normalize); [num_groups, d], dtype of x.
cudaError_t launch_centers_forward(const CentersParams& p, void* centers, cudaStream_t stream);
// grad_x[i] = J_i^T grad_centers[group[i]] / |group[i]|; grad_centers [num_groups, d] float32.
cudaError_t launch_centers_backward(const CentersParams& p, const float* grad_centers, void* grad_x,
                                    cudaStream_t stream);

// ---- cosine_softmax_loss

struct CosineSoftmaxParams {
  // The normalized rows in float32 (launch_normalized_rows) and their RowNorms.
  const float* xn;  // [n, d]
  const float* wn;  // [c, d]
  const float* inv_x;     // [n]
  const float* radial_x;  // [n]
  const float* inv_w;     // [c]
  const float* radial_w;  // [c]
  const float* cos;       // [n, c] = xn @ wn^T (from cuBLAS)
  const int64_t* labels;  // [n]
  int64_t n, c, d;
  float scale, margin, smoothing;
  ScalarKind kind;  // of x and weight, and of the gradients the finish kernel writes
};

// loss [n] (dtype of x) and the log-sum-exp of each row's logits, lse [n] (float32).
cudaError_t launch_cosine_softmax_forward(const CosineSoftmaxParams& p, void* loss, float* lse, cudaStream_t stream);

// coef[i, j] = G_ij = dL/dcos_ij, row_sum[i] = sum_j G_ij cos_ij and, unless col_sum is null,
// col_sum[j] = sum_i G_ij cos_ij.
cudaError_t launch_cosine_softmax_coefficients(const CosineSoftmaxParams& p, const float* grad_loss, const float* lse,
                                               float* coef, float* row_sum, float* col_sum, cudaStream_t stream);

// out[r] = inv[r] * acc[r] - radial[r] * sums[r] * rown[r] for the rows of x (rows_are_anchors) or
// weight: the normalization Jacobian, after acc = coef @ wn (or coef^T @ xn) went through cuBLAS.
cudaError_t launch_cosine_softmax_finish(const CosineSoftmaxParams& p, bool rows_are_anchors, const float* acc,
                                         const float* sums, void* out, cudaStream_t stream);

// ---- topk_similarity

// The largest k of the fused kernel: each of a block's 64 rows keeps its best k so far in shared
// memory. Larger k take the glue's chunked path (topk_similarity_cuda.cpp: use_fused_kernel).
constexpr int kTopKFusedMax = 32;

struct TopKParams {
  const void* x;  // [n, d]
  const void* y;  // [m, d] (x itself for y = None)
  const float* inv_x;  // [n] inverse norms (launch_row_norms); the rows are normalized as they are loaded
  const float* inv_y;  // [m]
  int64_t n, m, d, k;  // 1 <= k <= min(m, kTopKFusedMax)
  bool largest;
  ScalarKind kind;
  void* values;      // [n, k], dtype of x, sorted
  int64_t* indices;  // [n, k]
  void* far;         // [n], dtype of x
  // With splits > 1 the columns are split across blocks (grid.y, whole tiles); split s leaves its
  // sorted best min(k, its columns) of row i at [(s * n + i) * k, ...) of partial_values and
  // partial_indices, and its far extreme at partial_far[s * n + i], for a merge kernel.
  float* partial_values;     // [splits, n, k]
  int64_t* partial_indices;  // [splits, n, k]
  float* partial_far;        // [splits, n]
  int splits;
};

cudaError_t launch_topk_similarity(const TopKParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace reid_ext
