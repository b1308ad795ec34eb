// Per-row kernels shared by the ops' glue: the rows' norms (RowNorm, without overflow), and the
// normalized rows in float32 that the cuBLAS products read.
#include <algorithm>

#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

// out[r] = v_r * inv[r] (in T with same_dtype, else float32), with inv / radial as row_norms_kernel.
// One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    normalized_rows_kernel(const T* __restrict__ v, int64_t rows, int64_t d, float eps, float* inv, float* radial,
                           void* __restrict__ out, bool same_dtype) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (r >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const RowNorm norm = warp_row_norm(v + r * d, d, eps);
  for (int64_t k = lane; k < d; k += kWarp) {
    const float value = load_float(v + r * d + k) * norm.inv;
    if (same_dtype) {
      store_float(static_cast<T*>(out) + r * d + k, value);
    } else {
      static_cast<float*>(out)[r * d + k] = value;
    }
  }
  if (lane == 0) {
    inv[r] = norm.inv;
    if (radial) radial[r] = norm.radial;
  }
}

}  // namespace

cudaError_t launch_row_norms(ScalarKind kind, const void* v, int64_t rows, int64_t d, float eps, float* inv,
                             float* radial, cudaStream_t stream) {
  return with_scalar_type(kind, [&](auto tag) {
    launch_row_norms<decltype(tag)>(v, rows, d, eps, inv, radial, stream);
    return cudaGetLastError();
  });
}

cudaError_t launch_normalized_rows(ScalarKind kind, const void* v, int64_t rows, int64_t d, float eps, float* inv,
                                   float* radial, void* out, bool same_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return with_scalar_type(kind, [&](auto tag) {
    using T = decltype(tag);
    REID_EXT_LAUNCH(normalized_rows_kernel<T>, blocks_for(rows, kWarpsPerRowBlock), kRowThreads, 0, stream,
                    static_cast<const T*>(v), rows, d, eps, inv, radial, out, same_dtype);
    return cudaGetLastError();
  });
}

// out[e] = inv[r] * acc[e] - radial[r] * sums[r] * rown[e], r = e / d; grid-stride.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    normalization_finish_kernel(const T* __restrict__ rown, int64_t count, int64_t d, const float* __restrict__ acc,
                                const float* __restrict__ inv, const float* __restrict__ radial,
                                const float* __restrict__ sums, T* __restrict__ out) {
  const int64_t total = count * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kRowThreads) {
    const int64_t r = e / d;
    store_float(out + e, inv[r] * acc[e] - radial[r] * sums[r] * load_float(rown + e));
  }
}

cudaError_t launch_normalization_finish(ScalarKind kind, const void* rown, int64_t count, int64_t d, const float* acc,
                                        const float* inv, const float* radial, const float* sums, void* out,
                                        cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return with_scalar_type(kind, [&](auto tag) {
    using T = decltype(tag);
    // Enough blocks to cover the GPU; the grid-stride loop takes the rest.
    const int blocks = static_cast<int>(std::min<int64_t>(blocks_for(count * d, kRowThreads), 4096));
    REID_EXT_LAUNCH(normalization_finish_kernel<T>, blocks, kRowThreads, 0, stream, static_cast<const T*>(rown),
                    count, d, acc, inv, radial, sums, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace reid_ext
