// The CUDA runtime as the emulated-GPU build sees it: CUDA's qualifiers, built-in
// variables, barriers, warp intrinsics, atomics and the host API the launchers
// use, on top of the emulator's runtime (cudasim/runtime.h). Only what reid-ext's
// kernels need, with CUDA's semantics; anything else fails to compile rather than
// behaving differently.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cudasim/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static object per declaration is the running block's shared memory.
// (`extern __shared__ T name[];`, dynamic shared memory, is rewritten by tools/cudasim.py into
// a pointer to the block's dynamic buffer.)
#define __shared__ static
#define __constant__ static

#define CUDASIM_SITE (::cudasim::Site{__FILE__, __LINE__})

#define __syncthreads() ::cudasim::syncthreads(CUDASIM_SITE)
#define __syncwarp(...) ::cudasim::syncwarp(CUDASIM_SITE, ##__VA_ARGS__)
#define __shfl_sync(...) ::cudasim::shfl(CUDASIM_SITE, ::cudasim::WarpOp::kShfl, __VA_ARGS__)
#define __shfl_up_sync(...) ::cudasim::shfl(CUDASIM_SITE, ::cudasim::WarpOp::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::cudasim::shfl(CUDASIM_SITE, ::cudasim::WarpOp::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cudasim::shfl(CUDASIM_SITE, ::cudasim::WarpOp::kShflXor, __VA_ARGS__)
#define __ballot_sync(mask, predicate) \
  static_cast<unsigned>(::cudasim::warp_op(CUDASIM_SITE, ::cudasim::WarpOp::kBallot, mask, (predicate) != 0, 0, 32))
#define __any_sync(mask, predicate) \
  static_cast<int>(::cudasim::warp_op(CUDASIM_SITE, ::cudasim::WarpOp::kAny, mask, (predicate) != 0, 0, 32))
#define __all_sync(mask, predicate) \
  static_cast<int>(::cudasim::warp_op(CUDASIM_SITE, ::cudasim::WarpOp::kAll, mask, (predicate) != 0, 0, 32))

namespace cudasim {

template <typename T>
T shfl(Site site, WarpOp op, unsigned mask, T value, int arg, int width = 32) {
  return shuffle(site, op, mask, value, static_cast<unsigned>(arg), width);
}

inline void syncwarp(Site site, unsigned mask = 0xffffffffu) { warp_op(site, WarpOp::kSyncWarp, mask, 0, 0, 32); }

template <typename T>
T bits_as(const void* p) {
  T out;
  std::memcpy(&out, p, sizeof(T));
  return out;
}

// Atomics through the compiler's builtins, so that ThreadSanitizer sees them as atomic.
template <typename T, typename F>
T atomic_update(T* address, F update) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte values");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    const T old = bits_as<T>(&expected);
    const T next = update(old);
    Bits desired;
    std::memcpy(&desired, &next, sizeof(T));
    if (__atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}

}  // namespace cudasim

template <typename T>
__forceinline__ T atomicAdd(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return static_cast<T>(old + value); });
}
template <typename T>
__forceinline__ T atomicSub(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return static_cast<T>(old - value); });
}
template <typename T>
__forceinline__ T atomicMax(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
__forceinline__ T atomicMin(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
__forceinline__ T atomicExch(T* address, T value) {
  return cudasim::atomic_update(address, [value](T) { return value; });
}
template <typename T>
__forceinline__ T atomicCAS(T* address, T compare, T value) {
  return cudasim::atomic_update(address, [compare, value](T old) { return old == compare ? value : old; });
}
template <typename T>
__forceinline__ T atomicOr(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return static_cast<T>(old | value); });
}
template <typename T>
__forceinline__ T atomicAnd(T* address, T value) {
  return cudasim::atomic_update(address, [value](T old) { return static_cast<T>(old & value); });
}
__forceinline__ void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
__forceinline__ void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Read-only cache load: an ordinary load on the CPU.
template <typename T>
__forceinline__ T __ldg(const T* p) {
  return *p;
}

__forceinline__ float __int_as_float(int v) { return cudasim::bits_as<float>(&v); }
__forceinline__ int __float_as_int(float v) { return cudasim::bits_as<int>(&v); }
__forceinline__ float __uint_as_float(unsigned v) { return cudasim::bits_as<float>(&v); }
__forceinline__ unsigned __float_as_uint(float v) { return cudasim::bits_as<unsigned>(&v); }
__forceinline__ double __longlong_as_double(long long v) { return cudasim::bits_as<double>(&v); }
__forceinline__ long long __double_as_longlong(double v) { return cudasim::bits_as<long long>(&v); }
__forceinline__ int __popc(unsigned v) { return __builtin_popcount(v); }
__forceinline__ int __ffs(int v) { return __builtin_ffs(v); }
// The fast intrinsics, at full precision (a GPU's are within a few ulp of these).
__forceinline__ float __expf(float v) { return expf(v); }
__forceinline__ float __logf(float v) { return logf(v); }
__forceinline__ float __fdividef(float a, float b) { return a / b; }
__forceinline__ float rsqrtf(float v) { return 1.0f / sqrtf(v); }

// CUDA's device min/max, for any mix of arithmetic types as its overload set allows.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
__forceinline__ constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
__forceinline__ constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? static_cast<std::common_type_t<A, B>>(b) : static_cast<std::common_type_t<A, B>>(a);
}

// ---- host API: launches complete synchronously, so streams and events are trivially ordered.

enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMultiProcessorCount = 16 };
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};

inline cudaError_t cudaGetLastError() { return cudasim::get_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return cudasim::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = cudasim::multiprocessor_count(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
