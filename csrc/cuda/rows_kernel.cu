// Per-row kernels shared by the ops' glue: the rows' norms (RowNorm, without overflow), and the
// normalized rows in float32 that the cuBLAS products read.
#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

// out[r] = v_r * inv[r] in float32, with inv / radial as row_norms_kernel. One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    normalized_rows_kernel(const T* __restrict__ v, int64_t rows, int64_t d, float eps, float* inv, float* radial,
                           float* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (r >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const RowNorm norm = warp_row_norm(v + r * d, d, eps);
  for (int64_t k = lane; k < d; k += kWarp) out[r * d + k] = load_float(v + r * d + k) * norm.inv;
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
                                   float* radial, float* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return with_scalar_type(kind, [&](auto tag) {
    using T = decltype(tag);
    REID_EXT_LAUNCH(normalized_rows_kernel<T>, blocks_for(rows, kWarpsPerRowBlock), kRowThreads, 0, stream,
                    static_cast<const T*>(v), rows, d, eps, inv, radial, out);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace reid_ext
