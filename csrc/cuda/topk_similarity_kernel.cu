// topk_similarity CUDA kernels: the fused path (k <= kTopKFusedMax; the glue chooses).
//
// A block owns 64 anchor rows and streams 64-column tiles of y past them (tile_dots: FP32 dot
// products of the rows normalized as they are loaded). Each tile's similarities, computed as
// cosine_similarity's kernel computes them, go to shared memory, where thread r < 64 folds row r's
// 64 values into that row's sorted list of its best k so far (in shared memory too: only thread r
// touches it) and into its far extreme. Columns arrive in increasing index, so an equal value never
// displaces an earlier entry. The N x M matrix is never stored.
//
// Large column ranges are split across blocks (grid.y); each split leaves its sorted list and far
// extreme in float32 scratch, and a merge kernel places every split's entry at its rank among the
// entries of all splits (its position in its own list plus a binary search in each other one),
// keeping those of rank < k. The top k of a set under topk_before, a strict total order, is one set
// in one order: the result does not depend on the splits, and needs no atomics.
#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

constexpr int kSimStride = kTile + 1;           // padding: thread r reads row r of the tile conflict-free
constexpr int kListStride = kTopKFusedMax + 1;  // and its list

// The fused kernel's shared memory (about 41 KiB, under the 48 KiB of static shared memory): a
// tile's dot products, then in the same place its similarities, and the rows' lists.
struct TopKShared {
  union {
    DotTile dots;
    float sim[kTile][kSimStride];
  } tile;
  float value[kTile][kListStride];
  int64_t index[kTile][kListStride];
};

// The running far extreme (the minimum with largest, the maximum without) and whether a NaN was seen.
struct FarExtreme {
  float value;
  bool nan;

  __device__ __forceinline__ explicit FarExtreme(bool largest)
      : value(largest ? -neg_infinity<float>() : neg_infinity<float>()), nan(false) {}

  __device__ __forceinline__ void offer(float s, bool largest) {
    nan |= s != s;
    value = (largest ? s < value : s > value) ? s : value;
  }

  __device__ __forceinline__ float result() const { return nan ? quiet_nan() : value; }
};

// The columns [begin, end) of split s: whole tiles, the same for both kernels.
__device__ __forceinline__ void split_columns(const TopKParams& p, int64_t s, int64_t& begin, int64_t& end) {
  const int64_t num_tiles = (p.m + kTile - 1) / kTile;
  const int64_t per_split = (num_tiles + p.splits - 1) / p.splits;
  begin = min(p.m, s * per_split * kTile);
  end = min(p.m, (s + 1) * per_split * kTile);
}

// Offers (s, j) to a sorted list of `count` entries holding a row's best k (at most), in which
// every entry has a lower index than j.
__device__ __forceinline__ void offer(float* value, int64_t* index, int& count, int64_t k, float s, int64_t j,
                                      bool largest) {
  int pos;
  if (count < k) {
    pos = count++;
  } else if (topk_before(s, j, value[k - 1], index[k - 1], largest)) {
    pos = static_cast<int>(k) - 1;  // the last entry drops out
  } else {
    return;  // the common case once the list is full
  }
  while (pos > 0 && topk_before(s, j, value[pos - 1], index[pos - 1], largest)) {
    value[pos] = value[pos - 1];
    index[pos] = index[pos - 1];
    --pos;
  }
  value[pos] = s;
  index[pos] = j;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_similarity_kernel(const TopKParams p) {
  __shared__ TopKShared sm;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  int64_t col_begin, col_end;
  split_columns(p, blockIdx.y, col_begin, col_end);
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  // Thread r < 64 keeps row i0 + r: its list's length and its far extreme.
  const bool keeper = tid < kTile && i0 + tid < p.n;
  float* value = sm.value[tid % kTile];
  int64_t* index = sm.index[tid % kTile];
  int count = 0;
  FarExtreme far(p.largest);
  for (int64_t j0 = col_begin; j0 < col_end; j0 += kTile) {
    float acc[kMicro][kMicro];
    tile_dots(x, p.inv_x, p.n, i0, y, p.inv_y, p.m, j0, p.d, sm.tile.dots, acc);  // ends synchronised
#pragma unroll
    for (int u = 0; u < kMicro; ++u)
#pragma unroll
      for (int v = 0; v < kMicro; ++v) sm.tile.sim[ty * kMicro + u][tx * kMicro + v] = acc[u][v];
    __syncthreads();
    if (keeper) {
      const float* row = sm.tile.sim[tid];
      const int cols = static_cast<int>(min(static_cast<int64_t>(kTile), col_end - j0));
      for (int c = 0; c < cols; ++c) {
        far.offer(row[c], p.largest);
        offer(value, index, count, p.k, row[c], j0 + c, p.largest);
      }
    }
    __syncthreads();  // the rows are folded: the next tile_dots overwrites the similarities
  }
  if (!keeper) return;
  const int64_t i = i0 + tid;
  if (p.splits == 1) {  // count = k, as k <= M
    for (int q = 0; q < count; ++q) {
      store_float(static_cast<T*>(p.values) + i * p.k + q, value[q]);
      p.indices[i * p.k + q] = index[q];
    }
    store_float(static_cast<T*>(p.far) + i, far.result());
    return;
  }
  const int64_t base = (static_cast<int64_t>(blockIdx.y) * p.n + i) * p.k;
  for (int q = 0; q < count; ++q) {
    p.partial_values[base + q] = value[q];
    p.partial_indices[base + q] = index[q];
  }
  p.partial_far[static_cast<int64_t>(blockIdx.y) * p.n + i] = far.result();
}

// One warp per row: every entry of every split's list is written at its rank among them all, if
// that is below k (the ranks of distinct entries are distinct: each output slot is written once).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) topk_similarity_merge_kernel(const TopKParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (i >= p.n) return;
  const int lane = threadIdx.x % kWarp;
  auto length = [&](int64_t s) {  // split s kept min(k, its columns) entries
    int64_t begin, end;
    split_columns(p, s, begin, end);
    return min(p.k, end - begin);
  };
  for (int64_t e = lane; e < p.splits * p.k; e += kWarp) {
    const int64_t s = e / p.k, q = e % p.k;
    if (q >= length(s)) continue;
    const int64_t at = (s * p.n + i) * p.k + q;
    const float v = p.partial_values[at];
    const int64_t j = p.partial_indices[at];
    int64_t rank = q;  // the entries before it in its own list
    for (int64_t o = 0; o < p.splits && rank < p.k; ++o) {
      if (o == s) continue;
      // the entries of split o that rank before (v, j): a prefix of its sorted list
      const float* other_values = p.partial_values + (o * p.n + i) * p.k;
      const int64_t* other_indices = p.partial_indices + (o * p.n + i) * p.k;
      int64_t lo = 0, hi = length(o);
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (topk_before(other_values[mid], other_indices[mid], v, j, p.largest)) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      rank += lo;
    }
    if (rank < p.k) {
      store_float(static_cast<T*>(p.values) + i * p.k + rank, v);
      p.indices[i * p.k + rank] = j;
    }
  }
  if (lane == 0) {
    FarExtreme far(p.largest);
    for (int64_t s = 0; s < p.splits; ++s) far.offer(p.partial_far[s * p.n + i], p.largest);
    store_float(static_cast<T*>(p.far) + i, far.result());
  }
}

template <typename T>
cudaError_t topk_typed(const TopKParams& p, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.n, kTile), p.splits);
  REID_EXT_LAUNCH(topk_similarity_kernel<T>, grid, kThreads, 0, stream, p);
  if (p.splits > 1) {
    REID_EXT_LAUNCH(topk_similarity_merge_kernel<T>, blocks_for(p.n, kWarpsPerRowBlock), kRowThreads, 0, stream, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_similarity(const TopKParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (p.k < 1 || p.k > kTopKFusedMax || p.k > p.m || p.splits < 1) return cudaErrorInvalidValue;
  return with_scalar_type(p.kind, [&](auto tag) { return topk_typed<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
