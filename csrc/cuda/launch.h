// Plain launch parameters between the torch glue (*_cuda.cpp) and the kernels
// (*_kernel.cu): raw pointers and sizes only, so the .cu files need no torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace reid_ext {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- cosine_similarity

struct CosineForwardParams {
  const void* x;  // [n, d]
  const void* y;  // [m, d]
  void* out;      // [n, m], same dtype as x
  int64_t n, m, d;
  float eps;
  ScalarKind kind;
};

// grad_a[i] = inv_a[i] * (p_i - an_i (an_i . p_i)) with p_i = sum_j c_ij bn_j, an = a / max(|a|, eps),
// bn likewise, and c_ij = grad[i, j] (+ grad[j, i] when add_transpose, for y = x), read through strides.
struct CosineBackwardParams {
  const float* grad;  // float32 view of dL/dS
  int64_t row_stride, col_stride;
  bool add_transpose;
  const void* a;  // [rows, d], the side that receives the gradient
  const void* b;  // [cols, d]
  void* grad_a;   // [rows, d], dtype of a
  // float32 scratch: 1 / max(|a_i|, eps), its radial factor, 1 / max(|b_j|, eps), and p.
  float* inv_a;     // [rows]
  float* radial_a;  // [rows]
  float* inv_b;     // [cols]
  float* product;   // [rows, d]
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

// Rows per block and references per tile of the fused kernels.
constexpr int kTile = 64;

}  // namespace cuda
}  // namespace reid_ext
