// Device building blocks of the fused kernels: the launch helper, dtype
// conversion, a 64 x 64 tile of dot products with the squared norms of its rows,
// per-row norms, and fixed-order reductions across lanes, warps and blocks (the
// same inputs give bitwise the same result on every run).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"
#include "cuda/params.h"

// kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc; the emulated-GPU
// build (tools/cudasim) runs the same kernel on CPU threads and records its name.
#ifdef REID_EXT_CUDASIM
#define REID_EXT_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::cudasim::launch(#kernel, kernel, grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define REID_EXT_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#endif

namespace reid_ext {
namespace cuda {

constexpr int kTileK = 16;    // depth of one shared-memory stage
constexpr int kThreads = 256;  // 16 x 16 threads, each owning 4 rows x 4 columns of a tile
constexpr int kMicro = 4;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

inline int blocks_for(int64_t count, int per_block) { return static_cast<int>((count + per_block - 1) / per_block); }

template <typename T>
__device__ __forceinline__ float load_float(const T* p);
template <>
__device__ __forceinline__ float load_float<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ void store_float(T* p, float v);
template <>
__device__ __forceinline__ void store_float<float>(float* p, float v) { *p = v; }
template <>
__device__ __forceinline__ void store_float<__half>(__half* p, float v) { *p = __float2half(v); }
template <>
__device__ __forceinline__ void store_float<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

struct DotTile {
  float a[kTileK][kTile];
  float b[kTileK][kTile];
  float sq_a[kTile];  // squared norms of the tile's a rows
  float sq_b[kTile];  // and of its b rows
};

// acc[u][v] = <a_i, b_j> for i = a0 + 4*ty + u, j = b0 + 4*tx + v (FP32 accumulation), with
// tx = threadIdx.x % 16, ty = threadIdx.x / 16; rows past the end read as zero. With row scales
// (scale_a, scale_b not null) every row is multiplied by its scale as it is loaded: with the rows'
// inverse norms, acc holds the cosine similarities of the normalized rows, which cannot overflow
// whatever the features' magnitude. Also leaves the squared norms of the 64 a rows and 64 b rows
// as loaded in t.sq_a / t.sq_b (the euclidean distances use them).
// Every thread of the block must call it (it synchronises).
template <typename T>
__device__ __forceinline__ void tile_dots(const T* __restrict__ a, const float* __restrict__ scale_a, int64_t a_rows,
                                          int64_t a0, const T* __restrict__ b, const float* __restrict__ scale_b,
                                          int64_t b_rows, int64_t b0, int64_t d, DotTile& t,
                                          float acc[kMicro][kMicro]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int u = 0; u < kMicro; ++u)
#pragma unroll
    for (int v = 0; v < kMicro; ++v) acc[u][v] = 0.f;
  float sq = 0.f;  // threads 0..63 own a row's squared norm, threads 64..127 a b row's
  for (int64_t k0 = 0; k0 < d; k0 += kTileK) {
    for (int l = tid; l < kTile * kTileK; l += kThreads) {
      const int r = l / kTileK, k = l % kTileK;
      const int64_t kk = k0 + k, ra = a0 + r, rb = b0 + r;
      t.a[k][r] = (ra < a_rows && kk < d) ? load_float(a + ra * d + kk) * (scale_a ? scale_a[ra] : 1.f) : 0.f;
      t.b[k][r] = (rb < b_rows && kk < d) ? load_float(b + rb * d + kk) * (scale_b ? scale_b[rb] : 1.f) : 0.f;
    }
    __syncthreads();
    if (tid < kTile) {
#pragma unroll
      for (int k = 0; k < kTileK; ++k) sq = fmaf(t.a[k][tid], t.a[k][tid], sq);
    } else if (tid < 2 * kTile) {
#pragma unroll
      for (int k = 0; k < kTileK; ++k) sq = fmaf(t.b[k][tid - kTile], t.b[k][tid - kTile], sq);
    }
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float av[kMicro], bv[kMicro];
#pragma unroll
      for (int u = 0; u < kMicro; ++u) av[u] = t.a[k][ty * kMicro + u];
#pragma unroll
      for (int v = 0; v < kMicro; ++v) bv[v] = t.b[k][tx * kMicro + v];
#pragma unroll
      for (int u = 0; u < kMicro; ++u)
#pragma unroll
        for (int v = 0; v < kMicro; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
    __syncthreads();
  }
  if (tid < kTile) t.sq_a[tid] = sq;
  else if (tid < 2 * kTile) t.sq_b[tid - kTile] = sq;
  __syncthreads();
}

// out[u][v] += sum_c coef[4*ty + u][c] * b_chunk[c][4*tx + v] over a 64 x 64 tile in shared memory
// (tx = threadIdx.x % 16, ty = threadIdx.x / 16): the backward kernels' products of dL/dS with the
// other side's rows, 64 feature columns at a time.
__device__ __forceinline__ void accumulate_tile_product(const float (&coef)[kTile][kTile + 1],
                                                        const float (&b_chunk)[kTile][kTile], int tx, int ty,
                                                        float out[kMicro][kMicro]) {
  for (int c = 0; c < kTile; ++c) {
    float cv[kMicro], bv[kMicro];
#pragma unroll
    for (int u = 0; u < kMicro; ++u) cv[u] = coef[ty * kMicro + u][c];
#pragma unroll
    for (int v = 0; v < kMicro; ++v) bv[v] = b_chunk[c][tx * kMicro + v];
#pragma unroll
    for (int u = 0; u < kMicro; ++u)
#pragma unroll
      for (int v = 0; v < kMicro; ++v) out[u][v] = fmaf(cv[u], bv[v], out[u][v]);
  }
}

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // threads of the one-warp-per-row and one-block-per-row kernels
constexpr int kWarpsPerRowBlock = kRowThreads / kWarp;

// Sum over a warp in a fixed butterfly; every lane ends with the same total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Maximum over a warp; every lane ends with it.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(0xffffffffu, v); }

// The normalization of one row: inv = 1 / max(|v|, eps), and radial = inv where |v| > eps, else 0
// (the clamp leaves the normalization no radial part): d(v inv)/dv applied to g is
// inv * g - radial * vn (vn . g), with vn = v * inv the normalized row.
struct RowNorm {
  float inv, radial;
};

// The RowNorm of row v[0, d), computed by the calling warp (every lane gets it) without overflow:
// the sum of squares runs over the row scaled by row_scale (common.h). A NaN anywhere gives NaN.
template <typename T>
__device__ __forceinline__ RowNorm warp_row_norm(const T* __restrict__ v, int64_t d, float eps) {
  const int lane = threadIdx.x % kWarp;
  float max_abs = 0.f;
  bool nan = false;
  for (int64_t k = lane; k < d; k += kWarp) {
    const float value = load_float(v + k);
    max_abs = fmaxf(max_abs, fabsf(value));  // fmaxf drops a NaN: `nan` keeps it
    nan |= value != value;
  }
  max_abs = warp_max(max_abs);
  if (warp_any(nan)) return RowNorm{quiet_nan(), quiet_nan()};
  const float scale = row_scale(max_abs);
  float sq = 0.f;
  for (int64_t k = lane; k < d; k += kWarp) {
    const float value = load_float(v + k) * scale;
    sq = fmaf(value, value, sq);
  }
  const float scaled_norm = sqrtf(warp_sum(sq));  // |v| * scale
  if (!(scaled_norm > eps * scale)) return RowNorm{1.f / eps, 0.f};
  const float inv = scale / scaled_norm;
  return RowNorm{inv, inv};
}

// inv[r] and, unless radial is null, radial[r] of every row (RowNorm). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_norms_kernel(const T* __restrict__ v, int64_t rows, int64_t d, float eps, float* inv, float* radial) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (r >= rows) return;  // whole warps leave together
  const RowNorm norm = warp_row_norm(v + r * d, d, eps);
  if (threadIdx.x % kWarp == 0) {
    inv[r] = norm.inv;
    if (radial) radial[r] = norm.radial;
  }
}

template <typename T>
void launch_row_norms(const void* v, int64_t rows, int64_t d, float eps, float* inv, float* radial,
                      cudaStream_t stream) {
  if (rows == 0) return;
  REID_EXT_LAUNCH(row_norms_kernel<T>, blocks_for(rows, kWarpsPerRowBlock), kRowThreads, 0, stream,
                  static_cast<const T*>(v), rows, d, eps, inv, radial);
}

// launch(T{}) with T the element type of `kind`: the launchers' dtype dispatch.
template <typename Launch>
cudaError_t with_scalar_type(ScalarKind kind, const Launch& launch) {
  switch (kind) {
    case ScalarKind::kFloat16: return launch(__half());
    case ScalarKind::kBFloat16: return launch(__nv_bfloat16());
    default: return launch(float());
  }
}

// Sum over the 16 lanes (tx = 0..15) that share a tile row. All 32 lanes of the warp must call it.
__device__ __forceinline__ float row_lanes_sum(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ bool row_lanes_any(bool v) {
  int bits = v ? 1 : 0;
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, offset);
  return bits != 0;
}

// Merge of online log-sum-exps across the 16 lanes of a row; lane tx = 0 ends with the
// merge in lane order (so the result does not depend on scheduling).
__device__ __forceinline__ void row_lanes_merge(OnlineLSE<float>& s) {
#pragma unroll
  for (int offset = 1; offset < 16; offset <<= 1) {
    const float other_max = __shfl_down_sync(0xffffffffu, s.max, offset);
    const float other_sum = __shfl_down_sync(0xffffffffu, s.sum, offset);
    if ((threadIdx.x % 16) % (2 * offset) == 0) s.merge(other_max, other_sum);
  }
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
