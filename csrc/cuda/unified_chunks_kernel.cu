// unified_triplet_loss kernels around the cuBLAS products of bank- and global-batch-sized
// problems (the glue, unified_triplet_loss_cuda.cpp, runs the products a chunk of references at
// a time into a bounded buffer). Forward: one block per anchor folds its row of the chunk's
// cosines into online log-sum-exps and merges them into the anchor's running statistics, chunk
// after chunk (a fixed order: deterministic); a finish kernel turns them into the outputs.
// Backward: one block per anchor turns its row of the chunk into dL/dS, the operand of the
// products that give the gradients, and sums the radial terms of the normalization Jacobian;
// for the bank's gradient one thread per reference sums its column. Nothing of size N x M exists.
#include "cuda/unified.cuh"

namespace reid_ext {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kRowThreads)
    unified_chunk_forward_kernel(const UnifiedProblem pb, const UnifiedChunk chunk, float* __restrict__ stats) {
  __shared__ float scratch_max[kWarpsPerRowBlock], scratch_sum[kWarpsPerRowBlock], scratch[kWarpsPerRowBlock];
  const int64_t i = blockIdx.x, n = pb.n;
  const PairRuleDevice rule = rule_of(pb);
  const float* row = chunk.sim + i * chunk.cols;
  OnlineLSE<float> neg, pos;
  float has_neg = 0.f, has_pos = 0.f;
  for (int64_t c = threadIdx.x; c < chunk.cols; c += kRowThreads) {
    const int kind = rule.kind(i, chunk.j0 + c);
    if (kind == 0) continue;
    const float s = row[c];
    if (kind < 0) {
      neg.push(pb.gamma * (s + pb.margin));
      has_neg = 1.f;
    } else {
      pos.push(-pb.gamma * s);
      has_pos = 1.f;
    }
  }
  neg = block_lse(neg, scratch_max, scratch_sum);
  pos = block_lse(pos, scratch_max, scratch_sum);
  const int flags = (block_sum(has_neg, scratch) > 0.f ? 1 : 0) | (block_sum(has_pos, scratch) > 0.f ? 2 : 0);
  if (threadIdx.x != 0) return;
  OnlineLSE<float> run_neg, run_pos;
  int run_flags = 0;
  if (!chunk.first) {
    run_neg.max = stats[0 * n + i], run_neg.sum = stats[1 * n + i];
    run_pos.max = stats[2 * n + i], run_pos.sum = stats[3 * n + i];
    run_flags = static_cast<int>(stats[4 * n + i]);
  }
  run_neg.merge(neg.max, neg.sum);
  run_pos.merge(pos.max, pos.sum);
  stats[0 * n + i] = run_neg.max, stats[1 * n + i] = run_neg.sum;
  stats[2 * n + i] = run_pos.max, stats[3 * n + i] = run_pos.sum;
  stats[4 * n + i] = static_cast<float>(run_flags | flags);
}

template <typename T>
__global__ void unified_chunk_finish_kernel(const UnifiedProblem pb, const float* __restrict__ stats,
                                            const UnifiedForwardParams out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, n = pb.n;
  if (i >= n) return;
  OnlineLSE<float> neg, pos;
  neg.merge(stats[0 * n + i], stats[1 * n + i]);
  pos.merge(stats[2 * n + i], stats[3 * n + i]);
  const int flags = static_cast<int>(stats[4 * n + i]);
  write_anchor<T>(pb, out, i, neg, pos, (flags & 1) != 0, (flags & 2) != 0);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    unified_chunk_backward_kernel(const UnifiedProblem pb, const UnifiedBackwardParams p, const UnifiedChunk chunk,
                                  T* __restrict__ coef, float* __restrict__ row_radial) {
  __shared__ float scratch[kWarpsPerRowBlock];
  const int64_t i = blockIdx.x;
  const PairRuleDevice rule = rule_of(pb);
  const AnchorStats stats{p.grad_loss, p.valid, p.lse_neg, p.lse_pos, pb.gamma, pb.margin};
  const float* row = chunk.sim + i * chunk.cols;
  T* out = coef + i * chunk.cols;
  float radial = 0.f;
  for (int64_t c = threadIdx.x; c < chunk.cols; c += kRowThreads) {
    const int64_t j = chunk.j0 + c;
    const float s = row[c];
    float g = stats.pair_grad(rule.kind(i, j), i, s);
    // The batch against itself: S is symmetric, so x_i also receives dL/dS_ji.
    if (pb.self_ref) g += stats.pair_grad(rule.kind(j, i), j, s);
    store_float(out + c, g);
    radial = fmaf(g, s, radial);
  }
  radial = block_sum(radial, scratch);
  if (threadIdx.x == 0) row_radial[i] += radial;  // chunk after chunk, from zero
}

// col_radial[c] = sum_i dL/dS_ic S_ic over the anchors in order: the bank side's radial terms.
__global__ void __launch_bounds__(kRowThreads)
    unified_chunk_column_kernel(const UnifiedProblem pb, const UnifiedBackwardParams p, const UnifiedChunk chunk,
                                float* __restrict__ col_radial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (c >= chunk.cols) return;
  const PairRuleDevice rule = rule_of(pb);
  const AnchorStats stats{p.grad_loss, p.valid, p.lse_neg, p.lse_pos, pb.gamma, pb.margin};
  float radial = 0.f;
  for (int64_t i = 0; i < pb.n; ++i) {
    const float s = chunk.sim[i * chunk.cols + c];
    radial = fmaf(stats.pair_grad(rule.kind(i, chunk.j0 + c), i, s), s, radial);
  }
  col_radial[c] = radial;
}

}  // namespace

cudaError_t launch_unified_chunk_forward(const UnifiedProblem& pb, const UnifiedChunk& chunk, float* stats,
                                         cudaStream_t stream) {
  if (pb.n == 0 || chunk.cols == 0) return cudaSuccess;
  REID_EXT_LAUNCH(unified_chunk_forward_kernel, static_cast<unsigned>(pb.n), kRowThreads, 0, stream, pb, chunk,
                  stats);
  return cudaGetLastError();
}

cudaError_t launch_unified_chunk_finish(const UnifiedProblem& pb, const float* stats, const UnifiedForwardParams& out,
                                        cudaStream_t stream) {
  if (pb.n == 0) return cudaSuccess;
  return with_scalar_type(pb.kind, [&](auto tag) {
    REID_EXT_LAUNCH(unified_chunk_finish_kernel<decltype(tag)>, blocks_for(pb.n, kRowThreads), kRowThreads, 0, stream,
                    pb, stats, out);
    return cudaGetLastError();
  });
}

cudaError_t launch_unified_chunk_backward(const UnifiedProblem& pb, const UnifiedBackwardParams& p,
                                          const UnifiedChunk& chunk, void* coef, float* row_radial,
                                          float* col_radial, cudaStream_t stream) {
  if (pb.n == 0 || chunk.cols == 0) return cudaSuccess;
  return with_scalar_type(pb.kind, [&](auto tag) {
    using T = decltype(tag);
    REID_EXT_LAUNCH(unified_chunk_backward_kernel<T>, static_cast<unsigned>(pb.n), kRowThreads, 0, stream, pb, p,
                    chunk, static_cast<T*>(coef), row_radial);
    if (col_radial) {
      REID_EXT_LAUNCH(unified_chunk_column_kernel, blocks_for(chunk.cols, kRowThreads), kRowThreads, 0, stream, pb, p,
                      chunk, col_radial);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace reid_ext
