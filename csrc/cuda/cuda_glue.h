// Torch-side helpers shared by the *_cuda.cpp glue files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "common.h"
#include "cuda/launch.h"

namespace reid_ext {
namespace cuda {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
  }
}

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// How many blocks share one row block's column range: enough blocks to fill the
// GPU twice over, at most one per column tile and at most max_splits.
inline int column_splits(int64_t rows, int64_t cols, int device, int max_splits) {
  const int64_t row_blocks = std::max<int64_t>(1, (rows + kTile - 1) / kTile);
  const int64_t col_tiles = std::max<int64_t>(1, (cols + kTile - 1) / kTile);
  const int64_t wanted = (2 * multiprocessor_count(device) + row_blocks - 1) / row_blocks;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, col_tiles, max_splits})));
}

}  // namespace cuda
}  // namespace reid_ext
