// modality_centers CUDA kernels.
//
// Forward: one thread per (group, feature column) sums the group's rows in
// increasing index order (the CSR list from the glue) and divides by the count:
// bitwise deterministic, no atomics. Backward: each row reads only its own
// group's gradient; one warp per row takes the dot product the normalization's
// Jacobian needs, in a fixed order.
#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

constexpr int kColumnThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kColumnThreads)
    centers_forward_kernel(const CentersParams p, T* __restrict__ centers) {
  const int64_t g = blockIdx.x;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColumnThreads + threadIdx.x;
  if (k >= p.d) return;
  const T* x = static_cast<const T*>(p.x);
  const int64_t begin = p.offsets[g], end = p.offsets[g + 1];
  float sum = 0.f;
  for (int64_t e = begin; e < end; ++e) {
    const int64_t i = p.members[e];
    const float value = load_float(x + i * p.d + k);
    sum = p.normalize ? fmaf(value, p.inv[i], sum) : sum + value;
  }
  // A group without members (possible only through the raw op) keeps a zero center.
  const int64_t count = end - begin;
  store_float(centers + g * p.d + k, count > 0 ? sum / static_cast<float>(count) : 0.f);
}

// grad_x[i] = (inv * v - radial * <xn_i, v> * xn_i) / count with v = grad_centers[group[i]] and
// xn_i = x_i * inv the normalized row (RowNorm in device.cuh); just v / count without normalize.
// One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    centers_backward_kernel(const CentersParams p, const float* __restrict__ grad_centers, T* __restrict__ grad_x) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (i >= p.n) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const T* x = static_cast<const T*>(p.x) + i * p.d;
  T* out = grad_x + i * p.d;
  const int64_t g = p.group[i];
  const int64_t count = (g >= 0 && g < p.num_groups) ? p.counts[g] : 0;
  if (count == 0) {  // a group id outside [0, num_groups) has no center, hence no gradient
    for (int64_t k = lane; k < p.d; k += kWarp) store_float(out + k, 0.f);
    return;
  }
  const float* v = grad_centers + g * p.d;
  const float share = 1.f / static_cast<float>(count);
  if (!p.normalize) {
    for (int64_t k = lane; k < p.d; k += kWarp) store_float(out + k, share * v[k]);
    return;
  }
  const RowNorm norm = warp_row_norm(x, p.d, norm_eps<float>());
  float dot = 0.f;
  for (int64_t k = lane; k < p.d; k += kWarp) dot = fmaf(load_float(x + k) * norm.inv, v[k], dot);
  const float along = share * norm.inv, shrink = share * norm.radial * warp_sum(dot);
  for (int64_t k = lane; k < p.d; k += kWarp) store_float(out + k, along * v[k] - shrink * load_float(x + k) * norm.inv);
}

template <typename T>
cudaError_t forward_typed(const CentersParams& p, void* centers, cudaStream_t stream) {
  if (p.normalize) launch_row_norms<T>(p.x, p.n, p.d, norm_eps<float>(), p.inv, nullptr, stream);
  const dim3 grid(static_cast<unsigned>(p.num_groups), blocks_for(p.d, kColumnThreads));
  REID_EXT_LAUNCH(centers_forward_kernel<T>, grid, kColumnThreads, 0, stream, p, static_cast<T*>(centers));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const CentersParams& p, const float* grad_centers, void* grad_x, cudaStream_t stream) {
  REID_EXT_LAUNCH(centers_backward_kernel<T>, blocks_for(p.n, kWarpsPerRowBlock), kRowThreads, 0, stream, p, grad_centers, static_cast<T*>(grad_x));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_centers_forward(const CentersParams& p, void* centers, cudaStream_t stream) {
  if (p.num_groups == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return forward_typed<decltype(tag)>(p, centers, stream); });
}

cudaError_t launch_centers_backward(const CentersParams& p, const float* grad_centers, void* grad_x,
                                    cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return backward_typed<decltype(tag)>(p, grad_centers, grad_x, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
