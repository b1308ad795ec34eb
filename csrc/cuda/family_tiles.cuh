// Device helpers of the batch_hard_triplet_loss, modality_centers and
// cosine_softmax_loss kernels: per-row norms and fixed-order reductions (the
// same inputs give bitwise the same result on every run).
#pragma once

#include "cuda/tile_gemm.cuh"

namespace reid_ext {
namespace cuda {

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

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
