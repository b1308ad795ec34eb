// The interface between the replacement CUDA headers (compiled into the kernels,
// possibly with a sanitizer) and the emulator's runtime (runtime.cpp, compiled
// without one: its own synchronisation must stay invisible to ThreadSanitizer,
// which sees only the happens-before edges CUDA defines, annotated there).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

// CUDA's built-in variables: set per emulated thread by the runtime.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cudasim {

// Where a barrier or warp intrinsic is called from, for error messages and for
// telling divergent __syncthreads() apart.
struct Site {
  const char* file;
  int line;
};

void syncthreads(Site site);

enum class WarpOp : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };

// One warp-wide exchange: every lane named in `mask` must call it with the same
// op, mask and width; returns this lane's result (a value's bits for shuffles, a
// lane bitmask for ballot, 0/1 for any/all).
uint64_t warp_op(Site site, WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width);

// The running block's dynamic shared memory (the launch's shared_bytes).
void* dynamic_shared();

// Runs body(ctx) as every thread of every block of the grid; blocks one at a time,
// each of its threads on its own OS thread. Synchronous: returns when the grid is done.
cudaError_t run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* ctx);

template <typename... Params, typename... Args>
cudaError_t launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t, Args&&... args) {
  // Each emulated thread gets its own copy of the parameters, as on a GPU.
  struct Context {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Context context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return run_grid(
      name, grid, block, shared_bytes,
      [](void* c) {
        auto* context = static_cast<Context*>(c);
        std::apply(context->kernel, context->params);
      },
      &context);
}

template <typename T>
T shuffle(Site site, WarpOp op, unsigned mask, T value, unsigned arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_op(site, op, mask, bits, arg, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// The emulated device's multiprocessor count (what cudaDevAttrMultiProcessorCount
// reports), settable so that tests reach the launchers' split paths at small sizes.
int multiprocessor_count();
void set_multiprocessor_count(int count);

// How often each kernel was launched (by the name the launch gave), since the last reset.
std::map<std::string, int64_t> launch_counts();
void reset_launch_counts();

// The message of the error cudaGetLastError() last reported (or will report) on this thread.
std::string last_error_message();
cudaError_t get_last_error();
cudaError_t peek_last_error();

}  // namespace cudasim
