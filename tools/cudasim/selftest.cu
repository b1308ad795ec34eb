// Kernels that check the emulator's own CUDA semantics, called from
// tests/test_cudasim.py: shuffles and votes against CUDA's documented rules, the
// barrier that exited threads leave, dynamic shared memory, atomics, the errors a
// misuse gives, and (in a sanitizer build) defects each sanitizer must report.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <string>
#include <vector>

#include "selftest.h"

namespace cudasim_selftest {
namespace {

void check(cudaError_t error) {
  cudaGetLastError();  // errors are reported here, not left for the next caller
  if (error != cudaSuccess) throw std::runtime_error(std::string(cudaGetErrorString(error)) + ": " + cudasim::last_error_message());
}

#define SELFTEST_LAUNCH(kernel, grid, block, shared_bytes, ...) \
  check(::cudasim::launch(#kernel, kernel, grid, block, shared_bytes, nullptr, __VA_ARGS__))

enum Shuffle : int { kIndexed = 0, kUp = 1, kDown = 2, kXor = 3 };

__global__ void shuffle_kernel(int op, int arg, int width, int* out) {
  const int value = 1000 + static_cast<int>(threadIdx.x);
  int result = 0;
  switch (op) {
    case kIndexed: result = __shfl_sync(0xffffffffu, value, arg, width); break;
    case kUp: result = __shfl_up_sync(0xffffffffu, value, arg, width); break;
    case kDown: result = __shfl_down_sync(0xffffffffu, value, arg, width); break;
    default: result = __shfl_xor_sync(0xffffffffu, value, arg, width);
  }
  out[threadIdx.x] = result;
}

// 64 threads (two warps): each gets 1000 + the index of the thread whose value it received.
std::vector<int> shuffle(int op, int arg, int width) {
  std::vector<int> out(64);
  SELFTEST_LAUNCH(shuffle_kernel, 1, 64, 0, op, arg, width, out.data());
  return out;
}

__global__ void vote_kernel(const int* predicate, unsigned mask, unsigned* ballot, int* any, int* all) {
  const unsigned t = threadIdx.x;
  if (!(mask & (1u << (t % 32)))) return;  // lanes outside the mask take no part
  ballot[t] = __ballot_sync(mask, predicate[t]);
  any[t] = __any_sync(mask, predicate[t]);
  all[t] = __all_sync(mask, predicate[t]);
}

std::tuple<std::vector<unsigned>, std::vector<int>, std::vector<int>> vote(std::vector<int> predicate, unsigned mask) {
  if (predicate.size() != 32) throw std::invalid_argument("vote takes 32 predicates");
  std::vector<unsigned> ballot(32, 0);
  std::vector<int> any(32, -1), all(32, -1);
  SELFTEST_LAUNCH(vote_kernel, 1, 32, 0, predicate.data(), mask, ballot.data(), any.data(), all.data());
  return {ballot, any, all};
}

__global__ void barrier_exit_kernel(int active, int* out) {
  __shared__ int values[256];
  const int t = threadIdx.x;
  if (t >= active) return;  // exited threads leave the barrier: the others do not wait for them
  values[t] = t + 1;
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < active; ++i) sum += values[i];
  __syncthreads();
  values[t] = 0;
  out[t] = sum;
}

// Each of the first `active` of 256 threads: the sum 1 + ... + active, read from shared memory.
std::vector<int> barrier_exit(int active) {
  std::vector<int> out(256, 0);
  SELFTEST_LAUNCH(barrier_exit_kernel, 2, 256, 0, active, out.data());
  return out;
}

__global__ void divergent_barrier_kernel(int split) {
  if (static_cast<int>(threadIdx.x) < split) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void deadlock_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) __syncthreads();
  v = __shfl_xor_sync(0xffffffffu, v, 16);  // lanes 16-31 wait for lanes 0-15, which wait at the barrier
  out[threadIdx.x] = v;
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// The error message of a misuse that must fail the launch (it throws, with the message).
void misuse(const std::string& what) {
  std::vector<int> out(1024, 0);
  if (what == "divergent_barrier") {
    SELFTEST_LAUNCH(divergent_barrier_kernel, 1, 128, 0, 64);
  } else if (what == "deadlock") {
    SELFTEST_LAUNCH(deadlock_kernel, 1, 64, 0, out.data());
  } else if (what == "exited_lane") {
    SELFTEST_LAUNCH(exited_lane_kernel, 1, 32, 0, out.data());
  } else if (what == "too_many_threads") {
    SELFTEST_LAUNCH(exited_lane_kernel, 1, 2048, 0, out.data());
  } else if (what == "empty_grid") {
    SELFTEST_LAUNCH(exited_lane_kernel, 0, 32, 0, out.data());
  } else {
    throw std::invalid_argument("unknown misuse " + what);
  }
}

__global__ void dynamic_shared_kernel(const float* in, float* out, int n) {
  extern __shared__ float buffer[];
  const int t = threadIdx.x;
  buffer[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buffer[n - 1 - t];
}

// Each block of n threads reverses its n values through dynamic shared memory.
std::vector<float> reverse_blocks(std::vector<float> values, int n) {
  if (n <= 0 || values.size() % n != 0) throw std::invalid_argument("values must be whole blocks of n");
  std::vector<float> out(values.size());
  SELFTEST_LAUNCH(dynamic_shared_kernel, static_cast<unsigned>(values.size() / n), n, n * sizeof(float),
                  values.data(), out.data(), n);
  return out;
}

__global__ void atomics_kernel(float* fsum, int* isum, int* imax, unsigned long long* count) {
  atomicAdd(fsum, 0.5f);
  atomicAdd(isum, static_cast<int>(threadIdx.x));
  atomicMax(imax, static_cast<int>(blockIdx.x * 1000 + threadIdx.x));
  atomicAdd(count, 1ull);
}

// (sum of 0.5 per thread, sum of thread indices, max of block * 1000 + thread, thread count).
std::tuple<float, int, int, unsigned long long> atomics(int blocks, int threads) {
  float fsum = 0.f;
  int isum = 0, imax = INT_MIN;
  unsigned long long count = 0;
  SELFTEST_LAUNCH(atomics_kernel, blocks, threads, 0, &fsum, &isum, &imax, &count);
  return {fsum, isum, imax, count};
}

// float -> __half and __nv_bfloat16 bits, and back.
std::tuple<std::vector<int>, std::vector<int>, std::vector<float>, std::vector<float>> conversions(
    std::vector<float> values) {
  std::vector<int> half_bits, bf16_bits;
  std::vector<float> from_half, from_bf16;
  for (const float v : values) {
    const __half h = __float2half(v);
    const __nv_bfloat16 b = __float2bfloat16(v);
    half_bits.push_back(__half_as_ushort(h));
    bf16_bits.push_back(b.__x);
    from_half.push_back(__half2float(h));
    from_bf16.push_back(__bfloat162float(b));
  }
  return {half_bits, bf16_bits, from_half, from_bf16};
}

// ---- defects for the sanitizer builds: each must be reported by its sanitizer.

__global__ void shared_exchange_kernel(bool with_barrier, int* out) {
  __shared__ int values[64];
  values[threadIdx.x] = threadIdx.x;
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = values[(threadIdx.x + 1) % 64];  // without the barrier: a race with thread + 1's write
}

__global__ void off_by_one_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

__global__ void signed_overflow_kernel(int base, int* out) { out[threadIdx.x] = base + static_cast<int>(threadIdx.x); }

void defect(const std::string& what) {
  std::vector<int> out(64, 0);
  if (what == "race" || what == "no_race") {
    SELFTEST_LAUNCH(shared_exchange_kernel, 1, 64, 0, what == "no_race", out.data());
  } else if (what == "out_of_bounds") {
    std::unique_ptr<float[]> in(new float[32]());  // the last thread reads in[32]
    std::vector<float> result(32);
    SELFTEST_LAUNCH(off_by_one_kernel, 1, 32, 0, static_cast<const float*>(in.get()), result.data());
  } else if (what == "signed_overflow") {
    SELFTEST_LAUNCH(signed_overflow_kernel, 1, 64, 0, INT_MAX - 10, out.data());
  } else {
    throw std::invalid_argument("unknown defect " + what);
  }
}

}  // namespace

void define(pybind11::module_& m) {
  m.def("shuffle", &shuffle, pybind11::arg("op"), pybind11::arg("arg"), pybind11::arg("width"));
  m.def("vote", &vote, pybind11::arg("predicate"), pybind11::arg("mask"));
  m.def("barrier_exit", &barrier_exit, pybind11::arg("active"));
  m.def("misuse", &misuse, pybind11::arg("what"));
  m.def("reverse_blocks", &reverse_blocks, pybind11::arg("values"), pybind11::arg("n"));
  m.def("atomics", &atomics, pybind11::arg("blocks"), pybind11::arg("threads"));
  m.def("conversions", &conversions, pybind11::arg("values"));
  m.def("defect", &defect, pybind11::arg("what"));
}

}  // namespace cudasim_selftest
