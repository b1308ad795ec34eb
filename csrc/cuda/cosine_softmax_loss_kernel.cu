// cosine_softmax_loss CUDA kernels, around the products with the class weights
// that the glue runs through cuBLAS in float32 on the normalized rows (xn @ wn^T
// forward, and coef @ wn, coef^T @ xn backward: a classifier's logits are N x C by
// nature, and cuBLAS gives them tensor cores under torch's matmul precision
// setting; normalized operands cannot overflow whatever the features' magnitude).
//
// Forward: one block per anchor applies the margin to its row of cosines and folds
// the logits into an online log-sum-exp, the target logit and their sum: the
// label-smoothed cross-entropy. Backward: one block per anchor turns its row into
// coef = dL/dcos (the operand of the cuBLAS products) and the radial sums of the
// normalization Jacobian; column sums over anchors run one thread per class. Every
// reduction has a fixed order: deterministic, no atomics.
#include <algorithm>

#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

constexpr int kColumnThreads = 256;
constexpr int kFinishThreads = 256;

__device__ __forceinline__ bool label_in_range(int64_t label, int64_t num_classes) {
  return label >= 0 && label < num_classes;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    cosine_softmax_forward_kernel(const CosineSoftmaxParams p, T* __restrict__ loss, float* __restrict__ lse_out) {
  __shared__ float scratch_max[kWarpsPerRowBlock], scratch_sum[kWarpsPerRowBlock], scratch[kWarpsPerRowBlock];
  const int64_t i = blockIdx.x;
  const float* cos = p.cos + i * p.c;
  const int64_t label = p.labels[i];
  OnlineLSE<float> lse;
  float logit_sum = 0.f, target = 0.f;
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) {
    const float z = cosine_logit(cos[j], j == label, p.scale, p.margin);
    lse.push(z);
    logit_sum += z;
    if (j == label) target = z;
  }
  const OnlineLSE<float> total = block_lse(lse, scratch_max, scratch_sum);
  logit_sum = block_sum(logit_sum, scratch);
  target = block_sum(target, scratch);  // one thread holds it, the others add 0
  if (threadIdx.x != 0) return;
  const float value = total.value();
  lse_out[i] = value;
  // An out-of-range label cannot be reported without a synchronisation: the loss says so with a NaN.
  const float ce = smoothed_cross_entropy(value, target, logit_sum, p.smoothing, p.c);
  store_float(loss + i, label_in_range(label, p.c) ? ce : quiet_nan());
}

__global__ void __launch_bounds__(kRowThreads)
    cosine_softmax_coef_kernel(const CosineSoftmaxParams p, const float* __restrict__ grad_loss,
                               const float* __restrict__ lse, float* __restrict__ coef, float* __restrict__ row_sum) {
  __shared__ float scratch[kWarpsPerRowBlock];
  const int64_t i = blockIdx.x;
  const float* cos = p.cos + i * p.c;
  float* out = coef + i * p.c;
  const int64_t label = p.labels[i];
  const float lse_i = lse[i];
  // dL/dcos = grad * scale * dCE/dz; NaN for an out-of-range label, as the forward.
  const float scale = label_in_range(label, p.c) ? grad_loss[i] * p.scale : quiet_nan();
  float radial = 0.f;
  for (int64_t j = threadIdx.x; j < p.c; j += kRowThreads) {
    const bool is_target = j == label;
    const float z = cosine_logit(cos[j], is_target, p.scale, p.margin);
    const float g = scale * smoothed_cross_entropy_grad(z, lse_i, is_target, p.smoothing, p.c);
    out[j] = g;
    radial = fmaf(g, cos[j], radial);
  }
  radial = block_sum(radial, scratch);
  if (threadIdx.x == 0) row_sum[i] = radial;
}

// col_sum[j] = sum_i G_ij cos_ij.
__global__ void __launch_bounds__(kColumnThreads)
    cosine_softmax_col_sum_kernel(const CosineSoftmaxParams p, const float* __restrict__ coef,
                                  float* __restrict__ col_sum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (j >= p.c) return;
  float sum = 0.f;
  for (int64_t i = 0; i < p.n; ++i) sum = fmaf(coef[i * p.c + j], p.cos[i * p.c + j], sum);
  col_sum[j] = sum;
}

// out = inv * acc - radial * sums * rown per row (see launch_cosine_softmax_finish), grid-stride.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads)
    cosine_softmax_finish_kernel(const float* __restrict__ rown, int64_t count, int64_t d,
                                 const float* __restrict__ acc, const float* __restrict__ inv,
                                 const float* __restrict__ radial, const float* __restrict__ sums,
                                 T* __restrict__ out) {
  const int64_t total = count * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kFinishThreads) {
    const int64_t r = e / d;
    store_float(out + e, inv[r] * acc[e] - radial[r] * sums[r] * rown[e]);
  }
}

template <typename T>
cudaError_t forward_typed(const CosineSoftmaxParams& p, void* loss, float* lse, cudaStream_t stream) {
  REID_EXT_LAUNCH(cosine_softmax_forward_kernel<T>, static_cast<unsigned>(p.n), kRowThreads, 0, stream, p,
                  static_cast<T*>(loss), lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t finish_typed(const CosineSoftmaxParams& p, bool rows_are_anchors, const float* acc, const float* sums,
                         void* out, cudaStream_t stream) {
  const int64_t count = rows_are_anchors ? p.n : p.c;
  if (count == 0) return cudaSuccess;
  const float* rown = rows_are_anchors ? p.xn : p.wn;
  const float* inv = rows_are_anchors ? p.inv_x : p.inv_w;
  const float* radial = rows_are_anchors ? p.radial_x : p.radial_w;
  // Enough blocks to cover the GPU; the grid-stride loop takes the rest.
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_for(count * p.d, kFinishThreads), 4096));
  REID_EXT_LAUNCH(cosine_softmax_finish_kernel<T>, blocks, kFinishThreads, 0, stream, rown, count, p.d, acc, inv,
                  radial, sums, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cosine_softmax_forward(const CosineSoftmaxParams& p, void* loss, float* lse, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return forward_typed<decltype(tag)>(p, loss, lse, stream); });
}

cudaError_t launch_cosine_softmax_coefficients(const CosineSoftmaxParams& p, const float* grad_loss, const float* lse,
                                               float* coef, float* row_sum, float* col_sum, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  REID_EXT_LAUNCH(cosine_softmax_coef_kernel, static_cast<unsigned>(p.n), kRowThreads, 0, stream, p, grad_loss, lse,
                  coef, row_sum);
  if (col_sum != nullptr && p.c > 0) {
    REID_EXT_LAUNCH(cosine_softmax_col_sum_kernel, blocks_for(p.c, kColumnThreads), kColumnThreads, 0, stream, p, coef,
                    col_sum);
  }
  return cudaGetLastError();
}

cudaError_t launch_cosine_softmax_finish(const CosineSoftmaxParams& p, bool rows_are_anchors, const float* acc,
                                         const float* sums, void* out, cudaStream_t stream) {
  return with_scalar_type(
      p.kind, [&](auto tag) { return finish_typed<decltype(tag)>(p, rows_are_anchors, acc, sums, out, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
