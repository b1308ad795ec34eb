// batch_hard_triplet_loss CUDA kernels.
//
// Forward: a block owns 64 anchors and streams 64-reference tiles of the batch
// past them (tile_dots: FP32 dot products and squared norms in shared memory);
// each thread turns its 4 x 4 pairs into distances and keeps, per anchor row,
// its hardest positive and negative. The 16 lanes of a row are then merged, and
// (for large batches split across grid.y) the splits by a merge kernel. The
// candidates are ranked by a total order (Hardest in common.h), so every merge
// order gives the sequential answer: NaN first, then the harder distance, then
// the lower index. Nothing of size N x N is stored.
// Backward: two distances per anchor, so O(N * D): one block per row k gathers
// its own two pairs and the pairs that selected it (a CSR list from the glue),
// in a fixed order: deterministic, no atomics.
#include "cuda/device.cuh"

namespace reid_ext {
namespace cuda {
namespace {

constexpr int kBackwardThreads = 128;

// An anchor's outputs; a NaN in its row or in a selected pair's distance gives a NaN loss even
// without a positive or a negative (which would otherwise give 0): a NaN never vanishes.
template <typename T>
__device__ __forceinline__ void write_anchor(const BatchHardForwardParams& p, int64_t i, const Hardest<float>& pos,
                                             const Hardest<float>& neg) {
  const bool valid = pos.index >= 0 && neg.index >= 0;
  // An anchor without a positive (negative) has no such distance; 0 keeps the outputs finite.
  const float d_ap = pos.index >= 0 ? pos.dist : 0.f;
  const float d_an = neg.index >= 0 ? neg.dist : 0.f;
  p.valid[i] = valid;
  p.pos_idx[i] = pos.index;
  p.neg_idx[i] = neg.index;
  p.dist_ap[i] = d_ap;
  p.dist_an[i] = d_an;
  store_float(static_cast<T*>(p.loss) + i,
              batch_hard_anchor_loss(d_ap, d_an, p.margin, p.soft_margin, valid, p.inv[i]));
}

// Merge over the 16 lanes (tx) that share a tile row; all 32 lanes of the warp must call it.
__device__ __forceinline__ void row_lanes_hardest(Hardest<float>& h, bool largest) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) {
    const float other_dist = __shfl_xor_sync(0xffffffffu, h.dist, offset);
    const long long other_index = __shfl_xor_sync(0xffffffffu, static_cast<long long>(h.index), offset);
    h.offer(other_dist, static_cast<int64_t>(other_index), largest);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) batch_hard_forward_kernel(const BatchHardForwardParams p) {
  __shared__ DotTile tile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t num_tiles = (p.n + kTile - 1) / kTile;
  const int64_t per_split = (num_tiles + p.splits - 1) / p.splits;
  const int64_t tile_begin = blockIdx.y * per_split;
  const int64_t tile_end = min(num_tiles, tile_begin + per_split);
  const T* x = static_cast<const T*>(p.x);
  // The cosine distance is 1 - the dot product of the normalized rows (as loaded); the euclidean
  // ones need the raw rows and their squared norms.
  const bool cosine = p.metric == kMetricCosine;
  const float* scale = cosine ? p.inv : nullptr;

  int64_t label[kMicro];
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty * kMicro + u;
    label[u] = i < p.n ? p.labels[i] : 0;
  }
  Hardest<float> pos[kMicro], neg[kMicro];
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t j0 = t * kTile;
    float acc[kMicro][kMicro];
    tile_dots(x, scale, p.n, i0, x, scale, p.n, j0, p.d, tile, acc);
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      const int r = ty * kMicro + u;
      const int64_t i = i0 + r;
      if (i >= p.n) continue;
      const float sq_i = tile.sq_a[r];
      // This thread's columns increase with v and with t, as offer_in_order requires.
#pragma unroll
      for (int v = 0; v < kMicro; ++v) {
        const int c = tx * kMicro + v;
        const int64_t j = j0 + c;
        if (j >= p.n || j == i) continue;
        const float sq_j = tile.sq_b[c];
        const float dist = pair_distance<float>(p.metric, acc[u][v], sq_i, sq_j, 1.f, 1.f);
        if (p.labels[j] == label[u]) {
          pos[u].offer_in_order(dist, j, true);
        } else {
          neg[u].offer_in_order(dist, j, false);
        }
      }
    }
    // tile_dots synchronises before it overwrites the tile, so no barrier is needed here.
  }

#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    row_lanes_hardest(pos[u], true);
    row_lanes_hardest(neg[u], false);
  }
  if (tx != 0) return;
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty * kMicro + u;
    if (i >= p.n) continue;
    if (p.splits == 1) {
      write_anchor<T>(p, i, pos[u], neg[u]);
    } else {
      const int64_t base = static_cast<int64_t>(blockIdx.y) * 2 * p.n;
      p.partial_dist[base + i] = pos[u].dist;
      p.partial_idx[base + i] = pos[u].index;
      p.partial_dist[base + p.n + i] = neg[u].dist;
      p.partial_idx[base + p.n + i] = neg[u].index;
    }
  }
}

template <typename T>
__global__ void batch_hard_merge_kernel(const BatchHardForwardParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  Hardest<float> pos, neg;
  for (int s = 0; s < p.splits; ++s) {
    const int64_t base = static_cast<int64_t>(s) * 2 * p.n;
    pos.offer(p.partial_dist[base + i], p.partial_idx[base + i], true);
    neg.offer(p.partial_dist[base + p.n + i], p.partial_idx[base + p.n + i], false);
  }
  write_anchor<T>(p, i, pos, neg);
}

// Per row: its RowNorm (the cosine metric's normalization) and the anchor's dL/d(d_ap). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) batch_hard_row_stats_kernel(const BatchHardBackwardParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerRowBlock + threadIdx.x / kWarp;
  if (r >= p.n) return;  // whole warps leave together
  const RowNorm norm = warp_row_norm(static_cast<const T*>(p.x) + r * p.d, p.d, norm_eps<float>());
  if (threadIdx.x % kWarp == 0) {
    p.inv[r] = norm.inv;
    p.radial[r] = norm.radial;
    const bool valid = p.pos_idx[r] >= 0 && p.neg_idx[r] >= 0;
    p.weight[r] = batch_hard_anchor_weight(p.grad_loss[r], p.dist_ap[r], p.dist_an[r], p.margin, p.soft_margin, valid);
  }
}

// grad_x[k] = sum over the pairs (k, other) that contain row k of coef * d dist / d x_k, with
// coef = +w for a hardest positive pair and -w for a hardest negative pair of its anchor. For the
// cosine metric the derivative is taken in terms of the normalized rows (distance_grad with the
// other row's inverse norm 1 and radial = inv): no product of a raw row with inv^2 can underflow.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads) batch_hard_backward_kernel(const BatchHardBackwardParams p) {
  const int64_t k = blockIdx.x;
  const T* x = static_cast<const T*>(p.x);
  T* grad = static_cast<T*>(p.grad_x);
  const int64_t begin = p.incoming_offsets[k], end = p.incoming_offsets[k + 1];
  const bool cosine = p.metric == kMetricCosine;
  const float inv_k = p.inv[k], radial_k = p.radial[k];
  auto row_value = [&](int64_t row, int64_t c) { return load_float(x + row * p.d + c) * (cosine ? p.inv[row] : 1.f); };
  for (int64_t c = threadIdx.x; c < p.d; c += blockDim.x) {
    float self = 0.f, acc = 0.f;
    auto add_pair = [&](int64_t other, float coef, float dist) {
      if (coef == 0.f) return;
      const PairGrad<float> g = distance_grad<float>(p.metric, dist, inv_k, 1.f, radial_k);
      self += coef * g.self;
      acc = fmaf(coef * g.other, row_value(other, c), acc);
    };
    // The indices come from the forward; the bounds keep a hand-made call from reading outside x.
    if (p.pos_idx[k] >= 0 && p.pos_idx[k] < p.n) add_pair(p.pos_idx[k], p.weight[k], p.dist_ap[k]);
    if (p.neg_idx[k] >= 0 && p.neg_idx[k] < p.n) add_pair(p.neg_idx[k], -p.weight[k], p.dist_an[k]);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t pair = p.incoming_pairs[e];
      if (pair < p.n) {
        add_pair(pair, p.weight[pair], p.dist_ap[pair]);
      } else {
        add_pair(pair - p.n, -p.weight[pair - p.n], p.dist_an[pair - p.n]);
      }
    }
    store_float(grad + k * p.d + c, fmaf(self, row_value(k, c), acc));
  }
}

// One chunk of a large batch (the glue runs the products through cuBLAS): one block per anchor
// finds the hardest pairs of its row of the chunk and offers them to the anchor's running hardest
// pairs (p.partial_dist / partial_idx, [2, n]: positives then negatives), chunk after chunk. The
// total order of Hardest makes the result the sequential one: ties to the lowest index.
__global__ void __launch_bounds__(kRowThreads)
    batch_hard_chunk_kernel(const BatchHardForwardParams p, const BatchHardChunk chunk, const float* __restrict__ sq) {
  __shared__ float dist_scratch[2][kWarpsPerRowBlock];
  __shared__ int64_t index_scratch[2][kWarpsPerRowBlock];
  const int64_t i = blockIdx.x, n = p.n;
  const int64_t label = p.labels[i];
  const bool cosine = p.metric == kMetricCosine;
  const float* row = chunk.dots + i * chunk.cols;
  Hardest<float> pos, neg;
  for (int64_t c = threadIdx.x; c < chunk.cols; c += kRowThreads) {
    const int64_t j = chunk.j0 + c;
    if (j == i) continue;
    const float dist = pair_distance<float>(p.metric, row[c], cosine ? 1.f : sq[i], cosine ? 1.f : sq[j], 1.f, 1.f);
    if (p.labels[j] == label) {
      pos.offer_in_order(dist, j, true);
    } else {
      neg.offer_in_order(dist, j, false);
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    for (int side = 0; side < 2; ++side) {
      Hardest<float>& h = side == 0 ? pos : neg;
      const float other_dist = __shfl_xor_sync(0xffffffffu, h.dist, offset);
      const long long other_index = __shfl_xor_sync(0xffffffffu, static_cast<long long>(h.index), offset);
      h.offer(other_dist, static_cast<int64_t>(other_index), side == 0);
    }
  }
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    dist_scratch[0][warp] = pos.dist, index_scratch[0][warp] = pos.index;
    dist_scratch[1][warp] = neg.dist, index_scratch[1][warp] = neg.index;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int side = 0; side < 2; ++side) {
    Hardest<float> best;
    if (!chunk.first) best.offer(p.partial_dist[side * n + i], p.partial_idx[side * n + i], side == 0);
    for (int w = 0; w < kWarpsPerRowBlock; ++w) best.offer(dist_scratch[side][w], index_scratch[side][w], side == 0);
    p.partial_dist[side * n + i] = best.dist;
    p.partial_idx[side * n + i] = best.index;
  }
}

template <typename T>
cudaError_t forward_typed(const BatchHardForwardParams& p, cudaStream_t stream) {
  launch_row_norms<T>(p.x, p.n, p.d, norm_eps<float>(), p.inv, nullptr, stream);
  const dim3 grid(blocks_for(p.n, kTile), p.splits);
  REID_EXT_LAUNCH(batch_hard_forward_kernel<T>, grid, kThreads, 0, stream, p);
  if (p.splits > 1) REID_EXT_LAUNCH(batch_hard_merge_kernel<T>, blocks_for(p.n, 256), 256, 0, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const BatchHardBackwardParams& p, cudaStream_t stream) {
  REID_EXT_LAUNCH(batch_hard_row_stats_kernel<T>, blocks_for(p.n, kWarpsPerRowBlock), kRowThreads, 0, stream, p);
  REID_EXT_LAUNCH(batch_hard_backward_kernel<T>, static_cast<unsigned>(p.n), kBackwardThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_batch_hard_forward(const BatchHardForwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return forward_typed<decltype(tag)>(p, stream); });
}

cudaError_t launch_batch_hard_chunk(const BatchHardForwardParams& p, const BatchHardChunk& chunk, const float* sq,
                                    cudaStream_t stream) {
  if (p.n == 0 || chunk.cols == 0) return cudaSuccess;
  REID_EXT_LAUNCH(batch_hard_chunk_kernel, static_cast<unsigned>(p.n), kRowThreads, 0, stream, p, chunk, sq);
  return cudaGetLastError();
}

cudaError_t launch_batch_hard_chunk_finish(const BatchHardForwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) {
    REID_EXT_LAUNCH(batch_hard_merge_kernel<decltype(tag)>, blocks_for(p.n, 256), 256, 0, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t launch_batch_hard_backward(const BatchHardBackwardParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return with_scalar_type(p.kind, [&](auto tag) { return backward_typed<decltype(tag)>(p, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
