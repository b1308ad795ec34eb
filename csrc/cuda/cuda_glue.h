// Torch-side helpers shared by the *_cuda.cpp glue files, and the switch between
// the real CUDA build and the emulated-GPU build (REID_EXT_CUDASIM, tools/cudasim):
// what is truly device-specific (the dispatch key, device guard, current stream,
// error check, multiprocessor count) is defined here once; the glue and the
// kernels are the same files in both builds.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include "checks.h"
#include "common.h"
#include "cuda/params.h"

#ifdef REID_EXT_CUDASIM
#include <c10/util/Exception.h>

#include "cudasim/runtime.h"

// The emulated build registers the same schemas in their own namespace, on CPU tensors.
#define REID_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(reid_ext_cudasim, CPU, m)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define REID_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(reid_ext, CUDA, m)
#endif

namespace reid_ext {
namespace cuda {

#ifdef REID_EXT_CUDASIM
// The emulated GPU's memory is host memory; its launches run synchronously on the calling thread.
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kDeviceName = "a CPU tensor (the emulated GPU's memory)";
inline int multiprocessor_count(int /*device*/) { return cudasim::multiprocessor_count(); }
inline void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "CUDA error (emulated GPU): ", cudaGetErrorString(error), ": ",
              cudasim::last_error_message());
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kDeviceName = "a CUDA tensor";
inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}
inline void check_launch(cudaError_t error) { C10_CUDA_CHECK(error); }
#endif

// The glue's check that the features live where its kernels run.
inline void check_on_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(on_device(t), name, " must be ", kDeviceName, ", got a tensor on ", t.device());
}

inline ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 on CUDA, got ", t.scalar_type());
  }
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
