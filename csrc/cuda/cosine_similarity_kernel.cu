// cosine_similarity CUDA kernels.
//
// Forward: the rows' norms (one warp per row, without overflow), then one 64 x 64
// output tile per block of dot products of the rows normalized as they are loaded
// (no normalized copies). Backward, per side: p_i = sum_j c_ij bn_j with one block
// per 64 rows x 64 feature columns streaming 64-column tiles of c, then the
// normalization Jacobian grad_a[i] = inv_a[i] p_i - radial_a[i] an_i (an_i . p_i),
// one warp per row (the radial term needs no S).
#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_forward_kernel(const CosineForwardParams p) {
  __shared__ DotTile tile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kMicro][kMicro];
  tile_dots(static_cast<const T*>(p.x), p.inv_x, p.n, i0, static_cast<const T*>(p.y), p.inv_y, p.m, j0, p.d, tile,
            acc);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty * kMicro + u;
    if (i >= p.n) continue;
#pragma unroll
    for (int v = 0; v < kMicro; ++v) {
      const int64_t j = j0 + tx * kMicro + v;
      if (j < p.m) store_float(out + i * p.m + j, acc[u][v]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cosine_backward_product_kernel(const CosineBackwardParams p) {
  __shared__ float coef[kTile][kTile + 1];
  __shared__ float b_chunk[kTile][kTile];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile, k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const T* b = static_cast<const T*>(p.b);
  float out[kMicro][kMicro] = {};
  for (int64_t j0 = 0; j0 < p.cols; j0 += kTile) {
    for (int l = tid; l < kTile * kTile; l += kThreads) {
      const int r = l / kTile, c = l % kTile;
      const int64_t i = i0 + r, j = j0 + c;
      float value = 0.f;
      if (i < p.rows && j < p.cols) {
        value = p.grad[i * p.row_stride + j * p.col_stride];
        if (p.add_transpose) value += p.grad[j * p.row_stride + i * p.col_stride];
      }
      coef[r][c] = value;
      b_chunk[r][c] =
          (j0 + r < p.cols && k0 + c < p.d) ? load_float(b + (j0 + r) * p.d + k0 + c) * p.inv_b[j0 + r] : 0.f;
    }
    __syncthreads();
    accumulate_tile_product(coef, b_chunk, tx, ty, out);
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty * kMicro + u;
    if (i >= p.rows) continue;
#pragma unroll
    for (int v = 0; v < kMicro; ++v) {
      const int64_t k = k0 + tx * kMicro + v;
      if (k < p.d) p.product[i * p.d + k] = out[u][v];
    }
  }
}

// grad_a[i] = inv_a[i] * p_i - radial_a[i] * (an_i . p_i) * an_i, an_i = a_i * inv_a[i]; one warp per row.
template <typename T>
__global__ void cosine_backward_finish_kernel(const CosineBackwardParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (i >= p.rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const T* a = static_cast<const T*>(p.a) + i * p.d;
  const float* prod = p.product + i * p.d;
  const float inv = p.inv_a[i];
  float dot = 0.f;
  for (int64_t k = lane; k < p.d; k += kWarp) dot = fmaf(load_float(a + k) * inv, prod[k], dot);
  const float shrink = p.radial_a[i] * warp_sum(dot);
  T* grad = static_cast<T*>(p.grad_a) + i * p.d;
  for (int64_t k = lane; k < p.d; k += kWarp) store_float(grad + k, inv * prod[k] - shrink * load_float(a + k) * inv);
}

template <typename T>
cudaError_t forward_typed(const CosineForwardParams& p, cudaStream_t stream) {
  launch_row_norms<T>(p.x, p.n, p.d, p.eps, p.inv_x, nullptr, stream);
  if (p.inv_y != p.inv_x) launch_row_norms<T>(p.y, p.m, p.d, p.eps, p.inv_y, nullptr, stream);
  const dim3 grid(blocks_for(p.m, kTile), blocks_for(p.n, kTile));
  REID_EXT_LAUNCH(cosine_forward_kernel<T>, grid, kThreads, 0, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const CosineBackwardParams& p, cudaStream_t stream) {
  launch_row_norms<T>(p.a, p.rows, p.d, p.eps, p.inv_a, p.radial_a, stream);
  if (!p.product_given) {
    launch_row_norms<T>(p.b, p.cols, p.d, p.eps, p.inv_b, nullptr, stream);
    const dim3 grid(blocks_for(p.d, kTile), blocks_for(p.rows, kTile));
    REID_EXT_LAUNCH(cosine_backward_product_kernel<T>, grid, kThreads, 0, stream, p);
  }
  REID_EXT_LAUNCH(cosine_backward_finish_kernel<T>, blocks_for(p.rows, kWarpsPerRowBlock), kRowThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cosine_forward(const CosineForwardParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.m == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return forward_typed<decltype(tag)>(p, stream); });
}

cudaError_t launch_cosine_backward(const CosineBackwardParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return backward_typed<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
