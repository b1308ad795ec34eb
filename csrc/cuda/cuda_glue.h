// Torch-side helpers shared by the *_cuda.cpp glue files, and the switch between
// the real CUDA build and the emulated-GPU build (REID_EXT_CUDASIM, tools/cudasim):
// what is truly device-specific (the dispatch key, device guard, current stream,
// error check, multiprocessor count) is defined here once; the glue and the
// kernels are the same files in both builds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdlib>
#include <string>

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
// The CPU has no half-precision product with a float32 result: the emulation multiplies in float32.
inline void products_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat).t());
}
inline void accumulate_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  acc.addmm_(a.to(at::kFloat), b.to(at::kFloat));
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
// out (float32 [a rows, b rows]) = a @ b^T through cuBLAS (ATen): float32 inputs follow torch's
// float32 matmul precision (TF32 under "high"), half-precision ones use tensor cores with float32
// accumulation and output.
inline void products_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(out, a, b.t());
  } else {
    at::mm_out(out, a, b.t(), at::kFloat);
  }
}
// acc (float32) += a @ b, likewise.
inline void accumulate_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else {
    at::addmm_out(acc, acc, a, b, at::kFloat);
  }
}
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

// The inverse norms 1 / max(|v_r|, eps) of v's rows (launch_row_norms: without overflow, NaN for a
// row with a NaN), float32 [rows].
inline at::Tensor inverse_norms(const at::Tensor& v, float eps, ScalarKind kind) {
  at::Tensor inv = at::empty({v.size(0)}, v.options().dtype(at::kFloat));
  check_launch(launch_row_norms(kind, v.data_ptr(), v.size(0), v.size(1), eps, inv.data_ptr<float>(), nullptr,
                                current_stream()));
  return inv;
}

// v's rows normalized (launch_normalized_rows), in v's dtype or float32, for cuBLAS products.
inline at::Tensor normalized_rows(const at::Tensor& v, float eps, ScalarKind kind, bool same_dtype) {
  const int64_t rows = v.size(0), d = v.size(1);
  at::Tensor out = at::empty({rows, d}, same_dtype ? v.options() : v.options().dtype(at::kFloat));
  at::Tensor inv = at::empty({rows}, v.options().dtype(at::kFloat));
  check_launch(launch_normalized_rows(kind, v.data_ptr(), rows, d, eps, inv.data_ptr<float>(), nullptr,
                                      out.data_ptr(), same_dtype, current_stream()));
  return out;
}

// ---- the path of an op: one place for its thresholds

// The SIMT tile kernels compute every dot product with FP32 multiply-adds; cuBLAS reaches several
// times their rate (TF32 and half-precision tensor cores) but costs a few launches per chunk of
// references. Crossover, from FLOP counts at H100 rates (tile kernels ~20 TFLOP/s effective, TF32
// GEMMs ~300, plus the N x chunk float32 matrix written and read once by the fused kernels): the
// products win beyond ~2^28 multiply-adds (N * M * D), a little earlier in half precision.
// REID_EXT_CUDA_PRODUCTS_FROM (multiply-adds) overrides it, for tuning on a real GPU and in tests.
inline int64_t env_integer(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(end != value && *end == '\0' && parsed >= 0, name, " must be a non-negative integer, got '",
                    value, "'");
  return parsed;
}

inline bool use_cublas_products(int64_t n, int64_t m, int64_t d, ScalarKind kind) {
  const int64_t from = env_integer("REID_EXT_CUDA_PRODUCTS_FROM", kind == ScalarKind::kFloat32 ? (1LL << 28) : (1LL << 27));
  return n * m * d >= from;
}

// References per chunk: the n x chunk float32 cosines and the chunk's normalized rows each fit in
// REID_EXT_CUDA_CHUNK_BYTES (default 64 MiB: large enough for cuBLAS to run near its peak, small
// beside a GPU's memory); a multiple of 64, at least 64.
inline int64_t chunk_references(int64_t n, int64_t m, int64_t d, int64_t element_bytes) {
  const int64_t budget = env_integer("REID_EXT_CUDA_CHUNK_BYTES", 64LL << 20);
  const int64_t by_cosines = budget / (4 * std::max<int64_t>(n, 1));
  const int64_t by_rows = budget / (element_bytes * std::max<int64_t>(d, 1));
  const int64_t cols = std::max<int64_t>(64, std::min(by_cosines, by_rows) / 64 * 64);
  return std::min(cols, std::max<int64_t>(m, 1));
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
