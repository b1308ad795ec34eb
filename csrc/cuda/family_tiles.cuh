// Device helpers of the batch_hard_triplet_loss, modality_centers and
// cosine_softmax_loss kernels: per-row norms and fixed-order reductions (the
// same inputs give bitwise the same result on every run).
#pragma once

#include "cuda/tile_gemm.cuh"

namespace reid_ext {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // threads of the one-block-per-row kernels
constexpr int kWarpsPerRowBlock = kRowThreads / kWarp;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Sum over a warp in a fixed butterfly; every lane ends with the same total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// inv[r] = 1 / max(|v_r|, eps) and, unless radial is null, radial[r] = inv[r]^2 where
// |v_r| > eps else 0 (the normalization's Jacobian has no radial part under the clamp).
// One warp per row; launch with kRowThreads threads and blocks_for(rows, kWarpsPerRowBlock) blocks.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    family_row_norms_kernel(const T* __restrict__ v, int64_t rows, int64_t d, float* inv, float* radial) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (r >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  float sq = 0.f;
  for (int64_t k = lane; k < d; k += kWarp) {
    const float value = load_float(v + r * d + k);
    sq = fmaf(value, value, sq);
  }
  sq = warp_sum(sq);
  if (lane == 0) {
    const float inverse = inverse_norm(sq, kNormEps);
    inv[r] = inverse;
    if (radial) radial[r] = sqrtf(sq) > kNormEps ? inverse * inverse : 0.f;
  }
}

template <typename T>
void launch_family_row_norms(const void* v, int64_t rows, int64_t d, float* inv, float* radial, cudaStream_t stream) {
  if (rows == 0) return;
  family_row_norms_kernel<T><<<blocks_for(rows, kWarpsPerRowBlock), kRowThreads, 0, stream>>>(
      static_cast<const T*>(v), rows, d, inv, radial);
}

// Sum over a block of kRowThreads threads: warps in a fixed butterfly, then the warp totals in
// warp order. Every thread must call it; every thread gets the total. `scratch` holds
// kWarpsPerRowBlock floats and may be reused right after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  __syncthreads();  // an earlier call's readers are done with scratch
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarpsPerRowBlock; ++w) total += scratch[w];
  return total;
}

// Online log-sum-exp merged over a block, in the same fixed order as block_sum.
__device__ __forceinline__ OnlineLSE<float> block_lse(OnlineLSE<float> s, float* scratch_max, float* scratch_sum) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float other_max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    s.merge(other_max, other_sum);
  }
  __syncthreads();
  if (threadIdx.x % kWarp == 0) {
    scratch_max[threadIdx.x / kWarp] = s.max;
    scratch_sum[threadIdx.x / kWarp] = s.sum;
  }
  __syncthreads();
  OnlineLSE<float> total;
#pragma unroll
  for (int w = 0; w < kWarpsPerRowBlock; ++w) total.merge(scratch_max[w], scratch_sum[w]);
  return total;
}

}  // namespace cuda
}  // namespace reid_ext
