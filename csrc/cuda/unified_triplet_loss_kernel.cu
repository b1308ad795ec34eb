// unified_triplet_loss CUDA kernels.
//
// Forward: the rows' norms first (one warp per row, without overflow); then a
// block owns 64 anchors and streams 64-reference tiles past them: dot products of
// the rows normalized as they are loaded, in shared memory with FP32
// accumulation, then each thread folds its 4 x 4 pairs into per-anchor online
// log-sum-exps. Large reference sets are
// split across blocks (grid.y), whose partial statistics a merge kernel combines
// in a fixed order. Backward: the same tiles are recomputed, turned into
// dL/dS with the saved statistics, and multiplied back by the other side's
// features; per-split partial gradients are summed in a fixed order with the
// normalization Jacobian applied. Nothing of size N x M is ever stored.
#include "cuda/unified.cuh"

namespace reid_ext {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    unified_forward_kernel(const UnifiedProblem pb, const UnifiedForwardParams out) {
  __shared__ DotTile tile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t num_tiles = (pb.m + kTile - 1) / kTile;
  const int64_t per_split = (num_tiles + out.splits - 1) / out.splits;
  const int64_t tile_begin = blockIdx.y * per_split;
  const int64_t tile_end = min(num_tiles, tile_begin + per_split);
  const PairRuleDevice rule = rule_of(pb);
  const T* x = static_cast<const T*>(pb.x);
  const T* ref = static_cast<const T*>(pb.ref);

  OnlineLSE<float> neg[kMicro], pos[kMicro];
  bool has_neg[kMicro] = {}, has_pos[kMicro] = {};
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t j0 = t * kTile;
    float acc[kMicro][kMicro];
    tile_dots(x, pb.inv_x, pb.n, i0, ref, pb.inv_ref, pb.m, j0, pb.d, tile, acc);
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      const int64_t i = i0 + ty * kMicro + u;
      if (i >= pb.n) continue;
#pragma unroll
      for (int v = 0; v < kMicro; ++v) {
        const int64_t j = j0 + tx * kMicro + v;
        if (j >= pb.m) continue;
        const int kind = rule.kind(i, j);
        if (kind == 0) continue;
        const float s = acc[u][v];
        if (kind < 0) {
          neg[u].push(pb.gamma * (s + pb.margin));
          has_neg[u] = true;
        } else {
          pos[u].push(-pb.gamma * s);
          has_pos[u] = true;
        }
      }
    }
    // tile_dots synchronises before it overwrites the tile, so no barrier is needed here.
  }

#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    row_lanes_merge(neg[u]);
    row_lanes_merge(pos[u]);
    has_neg[u] = row_lanes_any(has_neg[u]);
    has_pos[u] = row_lanes_any(has_pos[u]);
  }
  if (tx != 0) return;
#pragma unroll
  for (int u = 0; u < kMicro; ++u) {
    const int64_t i = i0 + ty * kMicro + u;
    if (i >= pb.n) continue;
    if (out.splits == 1) {
      write_anchor<T>(pb, out, i, neg[u], pos[u], has_neg[u], has_pos[u]);
    } else {
      float* part = out.partial + static_cast<int64_t>(blockIdx.y) * kPartialFields * pb.n;
      part[0 * pb.n + i] = neg[u].max;
      part[1 * pb.n + i] = neg[u].sum;
      part[2 * pb.n + i] = pos[u].max;
      part[3 * pb.n + i] = pos[u].sum;
      part[4 * pb.n + i] = static_cast<float>((has_neg[u] ? 1 : 0) | (has_pos[u] ? 2 : 0));
    }
  }
}

// Combines the per-split statistics of each anchor in split order.
template <typename T>
__global__ void unified_forward_merge_kernel(const UnifiedProblem pb, const UnifiedForwardParams out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pb.n) return;
  OnlineLSE<float> neg, pos;
  int flags = 0;
  for (int s = 0; s < out.splits; ++s) {
    const float* part = out.partial + static_cast<int64_t>(s) * kPartialFields * pb.n;
    neg.merge(part[0 * pb.n + i], part[1 * pb.n + i]);
    pos.merge(part[2 * pb.n + i], part[3 * pb.n + i]);
    flags |= static_cast<int>(part[4 * pb.n + i]);
  }
  write_anchor<T>(pb, out, i, neg, pos, (flags & 1) != 0, (flags & 2) != 0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    unified_backward_kernel(const UnifiedProblem pb, const UnifiedBackwardParams p) {
  __shared__ DotTile tile;
  __shared__ float coef[kTile][kTile + 1];  // dL/dS_ij of the current tile
  __shared__ float b_chunk[kTile][kTile];   // 64 normalized b rows x 64 feature columns
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool anchors = p.rows_are_anchors;
  const T* a = static_cast<const T*>(anchors ? pb.x : pb.ref);
  const T* b = static_cast<const T*>(anchors ? pb.ref : pb.x);
  const float* inv_a = anchors ? pb.inv_x : pb.inv_ref;
  const float* inv_b = anchors ? pb.inv_ref : pb.inv_x;
  const int64_t rows = anchors ? pb.n : pb.m, cols = anchors ? pb.m : pb.n, d = pb.d;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t num_tiles = (cols + kTile - 1) / kTile;
  const int64_t per_split = (num_tiles + p.splits - 1) / p.splits;
  const int64_t tile_begin = blockIdx.y * per_split;
  const int64_t tile_end = min(num_tiles, tile_begin + per_split);
  const PairRuleDevice rule = rule_of(pb);
  const AnchorStats stats{p.grad_loss, p.valid, p.lse_neg, p.lse_pos, pb.gamma, pb.margin};
  float* partial = p.partial_grad + static_cast<int64_t>(blockIdx.y) * rows * d;

  float radial[kMicro] = {};
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t j0 = t * kTile;
    float acc[kMicro][kMicro];
    tile_dots(a, inv_a, rows, i0, b, inv_b, cols, j0, d, tile, acc);
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      const int r = ty * kMicro + u;
      const int64_t i = i0 + r;
#pragma unroll
      for (int v = 0; v < kMicro; ++v) {
        const int c = tx * kMicro + v;
        const int64_t j = j0 + c;
        float value = 0.f;
        if (i < rows && j < cols) {
          const float s = acc[u][v];
          float g;
          if (!anchors) {
            g = stats.pair_grad(rule.kind(j, i), j, s);
          } else {
            g = stats.pair_grad(rule.kind(i, j), i, s);
            // The batch against itself: S is symmetric, so x_i also receives dL/dS_ji.
            if (pb.self_ref) g += stats.pair_grad(rule.kind(j, i), j, s);
          }
          value = g;
          radial[u] = fmaf(g, s, radial[u]);
        }
        coef[r][c] = value;
      }
    }
    for (int64_t d0 = 0; d0 < d; d0 += kTile) {
      for (int l = tid; l < kTile * kTile; l += kThreads) {
        const int c = l / kTile, k = l % kTile;
        const int64_t j = j0 + c, kk = d0 + k;
        b_chunk[c][k] = (j < cols && kk < d) ? load_float(b + j * d + kk) * inv_b[j] : 0.f;
      }
      __syncthreads();  // coef and b_chunk complete
      float out[kMicro][kMicro] = {};
      accumulate_tile_product(coef, b_chunk, tx, ty, out);
#pragma unroll
      for (int u = 0; u < kMicro; ++u) {
        const int64_t i = i0 + ty * kMicro + u;
        if (i >= rows) continue;
#pragma unroll
        for (int v = 0; v < kMicro; ++v) {
          const int64_t k = d0 + tx * kMicro + v;
          // This block is the only writer of rows [i0, i0 + 64) of its split.
          if (k < d) partial[i * d + k] += out[u][v];
        }
      }
      __syncthreads();  // b_chunk (and, after the last chunk, coef) may be overwritten
    }
  }
#pragma unroll
  for (int u = 0; u < kMicro; ++u) radial[u] = row_lanes_sum(radial[u]);
  if (tx == 0) {
#pragma unroll
    for (int u = 0; u < kMicro; ++u) {
      const int64_t i = i0 + ty * kMicro + u;
      if (i < rows) p.partial_radial[static_cast<int64_t>(blockIdx.y) * rows + i] = radial[u];
    }
  }
}

// grad[i] = inv_i * sum_s P[s, i] - radial_i * (sum_s R[s, i]) * an_i with an_i = a_i * inv_i (the
// normalization Jacobian, RowNorm in device.cuh), summed over the splits in a fixed order. One block per row.
template <typename T>
__global__ void unified_backward_finish_kernel(const UnifiedProblem pb, const UnifiedBackwardParams p) {
  const int64_t i = blockIdx.x;
  const bool anchors = p.rows_are_anchors;
  const T* a = static_cast<const T*>(anchors ? pb.x : pb.ref);
  const int64_t rows = anchors ? pb.n : pb.m, d = pb.d;
  const float inv = (anchors ? pb.inv_x : pb.inv_ref)[i];
  const float radial_scale = (anchors ? pb.radial_x : pb.radial_ref)[i];
  float radial = 0.f;
  for (int s = 0; s < p.splits; ++s) radial += p.partial_radial[static_cast<int64_t>(s) * rows + i];
  T* grad = static_cast<T*>(p.grad);
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s) sum += p.partial_grad[(static_cast<int64_t>(s) * rows + i) * d + k];
    store_float(grad + i * d + k, inv * sum - radial_scale * radial * load_float(a + i * d + k) * inv);
  }
}

// The RowNorms of x and ref, which every kernel below reads.
template <typename T>
void row_norms(const UnifiedProblem& pb, cudaStream_t stream) {
  launch_row_norms<T>(pb.x, pb.n, pb.d, norm_eps<float>(), pb.inv_x, pb.radial_x, stream);
  if (!pb.self_ref) launch_row_norms<T>(pb.ref, pb.m, pb.d, norm_eps<float>(), pb.inv_ref, pb.radial_ref, stream);
}

template <typename T>
cudaError_t forward_typed(const UnifiedProblem& pb, const UnifiedForwardParams& p, cudaStream_t stream) {
  row_norms<T>(pb, stream);
  const dim3 grid(blocks_for(pb.n, kTile), p.splits);
  REID_EXT_LAUNCH(unified_forward_kernel<T>, grid, kThreads, 0, stream, pb, p);
  if (p.splits > 1) REID_EXT_LAUNCH(unified_forward_merge_kernel<T>, blocks_for(pb.n, 256), 256, 0, stream, pb, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const UnifiedProblem& pb, const UnifiedBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.rows_are_anchors ? pb.n : pb.m;
  row_norms<T>(pb, stream);
  const dim3 grid(blocks_for(rows, kTile), p.splits);
  REID_EXT_LAUNCH(unified_backward_kernel<T>, grid, kThreads, 0, stream, pb, p);
  REID_EXT_LAUNCH(unified_backward_finish_kernel<T>, static_cast<unsigned>(rows), kThreads, 0, stream, pb, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_unified_forward(const UnifiedProblem& pb, const UnifiedForwardParams& p, cudaStream_t stream) {
  if (pb.n == 0) return cudaSuccess;
  return with_scalar_type(pb.kind, [&](auto tag) { return forward_typed<decltype(tag)>(pb, p, stream); });
}

cudaError_t launch_unified_backward(const UnifiedProblem& pb, const UnifiedBackwardParams& p, cudaStream_t stream) {
  if ((p.rows_are_anchors ? pb.n : pb.m) == 0) return cudaSuccess;
  return with_scalar_type(pb.kind, [&](auto tag) { return backward_typed<decltype(tag)>(pb, p, stream); });
}

}  // namespace cuda
}  // namespace reid_ext
