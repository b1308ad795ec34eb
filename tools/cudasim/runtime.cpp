// The emulator's runtime: a pool of OS threads that runs a grid one block at a
// time, every CUDA thread of a block on its own OS thread, with CUDA's block
// barrier (threads that have exited leave it) and 32-lane warp exchanges.
//
// Compiled without sanitizers, and synchronising only through atomics and futexes
// (never a pthread mutex, which ThreadSanitizer would intercept): TSan then sees no
// ordering from the runtime except the happens-before edges that CUDA defines,
// which are annotated explicitly (a barrier, a warp exchange, a launch), so a
// missing __syncthreads() between two threads' accesses is a race it reports.
#include "cudasim/runtime.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

// ThreadSanitizer's annotations, present when libtsan is loaded (a TSan build of the tier).
extern "C" void __tsan_acquire(void* addr) __attribute__((weak));
extern "C" void __tsan_release(void* addr) __attribute__((weak));

namespace cudasim {
namespace {

void happens_before_release(void* address) {
  if (__tsan_release) __tsan_release(address);
}
void happens_before_acquire(void* address) {
  if (__tsan_acquire) __tsan_acquire(address);
}

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake(std::atomic<uint32_t>& word, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}
void wait_while_equal(std::atomic<uint32_t>& word, uint32_t value) {
  while (word.load(std::memory_order_acquire) == value) futex_wait(word, value);
}

// A mutex on a futex (0 free, 1 locked, 2 locked with waiters), invisible to TSan.
class Lock {
 public:
  void lock() {
    uint32_t state = 0;
    if (state_.compare_exchange_strong(state, 1, std::memory_order_acquire)) return;
    if (state != 2) state = state_.exchange(2, std::memory_order_acquire);
    while (state != 0) {
      futex_wait(state_, 2);
      state = state_.exchange(2, std::memory_order_acquire);
    }
  }
  void unlock() {
    if (state_.exchange(0, std::memory_order_release) == 2) futex_wake(state_, 1);
  }

 private:
  std::atomic<uint32_t> state_{0};
};

// Thrown out of a thread whose block has failed (deadlock, warp misuse), so that it ends.
struct Abort {};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShfl || op == WarpOp::kShflUp || op == WarpOp::kShflDown || op == WarpOp::kShflXor;
}

// The lane a shuffle reads, by CUDA's rules for sub-warps of `width` lanes.
unsigned source_lane(WarpOp op, unsigned lane, unsigned arg, unsigned width) {
  const unsigned base = lane & ~(width - 1), offset = lane & (width - 1);
  switch (op) {
    case WarpOp::kShfl: return base + (arg & (width - 1));
    case WarpOp::kShflUp: return offset >= arg ? lane - arg : lane;
    case WarpOp::kShflDown: return offset + arg < width ? lane + arg : lane;
    case WarpOp::kShflXor: {
      const unsigned source = lane ^ arg;
      return source < base + width ? source : lane;  // later sub-warps are out of reach: own value
    }
    default: return lane;
  }
}

std::string site_text(Site site) {
  const char* file = site.file;
  for (const char* p = site.file; *p; ++p)
    if (*p == '/') file = p + 1;
  return std::string(file) + ":" + std::to_string(site.line);
}

bool same_site(Site a, Site b) { return a.line == b.line && std::string(a.file) == b.file; }

std::string lanes_text(uint32_t lanes) {
  std::ostringstream out;
  bool first = true;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(lanes & (1u << lane))) continue;
    int last = lane;
    while (last + 1 < 32 && (lanes & (1u << (last + 1)))) ++last;
    out << (first ? "" : ",") << lane;
    if (last > lane) out << "-" << last;
    first = false;
    lane = last;
  }
  return out.str();
}

std::string hex(uint32_t v) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", v);
  return text;
}

enum class ThreadState : uint8_t { kRunning, kBarrier, kWarp, kExited };

struct Warp {
  uint32_t live = 0;     // lanes that exist and have not exited
  uint32_t arrived = 0;  // lanes waiting in the pending exchange
  WarpOp op = WarpOp::kSyncWarp;
  uint32_t mask = 0;
  int width = 32;
  Site site{"", 0};
  uint64_t input[32] = {};
  uint64_t result[32] = {};
  uint8_t source[32] = {};
  std::atomic<uint32_t> generation{0};
  char order[2] = {};  // TSan sync objects, by the parity of the generation
};

struct Block {
  const char* kernel = "";
  uint3 index{0, 0, 0};
  int threads = 0;
  Lock lock;
  int live = 0;
  int waiting = 0;  // threads in a barrier or an exchange that cannot complete yet
  int at_barrier = 0;
  Site barrier_site{"", 0};
  int barrier_first = -1;
  std::atomic<uint32_t> barrier_generation{0};
  char barrier_order[2] = {};
  std::atomic<bool> failed{false};
  std::string message;
  std::unique_ptr<Warp[]> warps;
  std::vector<ThreadState> state;
  std::vector<Site> state_site;
  std::unique_ptr<unsigned char[]> dynamic_shared;
};

struct ThreadContext {
  Block* block = nullptr;
  int thread = 0, warp = 0, lane = 0;
};
thread_local ThreadContext t_context;

std::string describe_waits(const Block& b) {
  std::ostringstream out;
  int at_barrier = 0;
  for (int t = 0; t < b.threads; ++t) at_barrier += b.state[t] == ThreadState::kBarrier;
  if (at_barrier) out << at_barrier << " thread(s) wait in __syncthreads() at " << site_text(b.barrier_site);
  const int warps = (b.threads + 31) / 32;
  for (int w = 0; w < warps; ++w) {
    const Warp& warp = b.warps[w];
    if (!warp.arrived) continue;
    out << (out.tellp() > 0 ? "; " : "") << "warp " << w << " lanes " << lanes_text(warp.arrived) << " wait in "
        << op_name(warp.op) << "(mask " << hex(warp.mask) << ") at " << site_text(warp.site) << " for lanes "
        << lanes_text(warp.mask & ~warp.arrived);
  }
  return out.str();
}

// Marks the block failed and wakes every waiting thread, which then ends (Abort).
void fail_locked(Block& b, const std::string& message) {
  if (b.failed.load(std::memory_order_relaxed)) return;
  b.message = message;
  b.failed.store(true, std::memory_order_release);
  b.barrier_generation.fetch_add(1, std::memory_order_release);
  futex_wake(b.barrier_generation, INT_MAX);
  for (int w = 0; w < (b.threads + 31) / 32; ++w) {
    b.warps[w].generation.fetch_add(1, std::memory_order_release);
    futex_wake(b.warps[w].generation, INT_MAX);
  }
}

[[noreturn]] void fail_and_abort(Block& b, const std::string& message) {
  fail_locked(b, message);
  b.lock.unlock();
  throw Abort{};
}

// Every live thread waits for another: nothing can ever complete.
void check_deadlock_locked(Block& b) {
  if (b.live > 0 && b.waiting == b.live)
    fail_locked(b, "deadlock: " + describe_waits(b) +
                       " (a __syncthreads() or full-mask warp intrinsic not reached by every thread it waits for)");
}

void release_barrier_locked(Block& b) {
  for (int t = 0; t < b.threads; ++t)
    if (b.state[t] == ThreadState::kBarrier) b.state[t] = ThreadState::kRunning;
  b.waiting -= b.at_barrier;
  b.at_barrier = 0;
  b.barrier_generation.fetch_add(1, std::memory_order_release);
}

void complete_exchange_locked(Block& b, int w) {
  Warp& warp = b.warps[w];
  uint32_t ballot = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((warp.mask & (1u << lane)) && warp.input[lane] != 0) ballot |= 1u << lane;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(warp.mask & (1u << lane))) continue;
    uint64_t value = 0;
    switch (warp.op) {
      case WarpOp::kBallot: value = ballot; break;
      case WarpOp::kAny: value = ballot != 0; break;
      case WarpOp::kAll: value = ballot == warp.mask; break;
      case WarpOp::kSyncWarp: value = 0; break;
      default: value = warp.input[warp.source[lane]];
    }
    warp.result[lane] = value;
    b.state[w * 32 + lane] = ThreadState::kRunning;
  }
  b.waiting -= __builtin_popcount(warp.mask);
  warp.arrived = 0;
  warp.generation.fetch_add(1, std::memory_order_release);
}

Block& current_block(const char* what) {
  Block* b = t_context.block;
  if (b == nullptr) {
    std::fprintf(stderr, "cudasim: %s called outside a kernel\n", what);
    std::abort();
  }
  return *b;
}

// ---- the thread pool

struct Worker {
  std::atomic<uint32_t> go{0};
  uint32_t seen = 0;
  int index = 0;
};

struct Grid {
  const char* name;
  dim3 grid, block;
  void (*body)(void*);
  void* context;
  Block* current;
  int threads;
};

char host_to_kernel, kernel_to_host;  // TSan sync objects of launch order

class Pool {
 public:
  void run_block(Grid& grid) {
    ensure(grid.threads);
    current_ = &grid;
    done_.store(0, std::memory_order_relaxed);
    happens_before_release(&host_to_kernel);
    for (int i = 0; i < grid.threads; ++i) {
      workers_[i]->go.fetch_add(1, std::memory_order_release);
      futex_wake(workers_[i]->go, 1);
    }
    uint32_t done;
    while ((done = done_.load(std::memory_order_acquire)) != static_cast<uint32_t>(grid.threads)) futex_wait(done_, done);
    happens_before_acquire(&kernel_to_host);
  }

 private:
  void ensure(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* worker = workers_.back().get();
      worker->index = static_cast<int>(workers_.size()) - 1;
      pthread_attr_t attributes;
      pthread_attr_init(&attributes);
      pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
      pthread_attr_setstacksize(&attributes, 8u << 20);
      pthread_t thread;
      struct Start {
        Pool* pool;
        Worker* worker;
      };
      auto* start = new Start{this, worker};
      const int error = pthread_create(
          &thread, &attributes,
          [](void* arg) -> void* {
            std::unique_ptr<Start> s(static_cast<Start*>(arg));
            s->pool->loop(*s->worker);
            return nullptr;
          },
          start);
      pthread_attr_destroy(&attributes);
      if (error != 0) {
        std::fprintf(stderr, "cudasim: cannot start emulated GPU thread %d (error %d)\n", worker->index, error);
        std::abort();
      }
    }
  }

  void loop(Worker& worker) {
    for (;;) {
      wait_while_equal(worker.go, worker.seen);
      worker.seen = worker.go.load(std::memory_order_acquire);
      Grid& grid = *current_;
      happens_before_acquire(&host_to_kernel);
      run_thread(grid, worker.index);
      happens_before_release(&kernel_to_host);
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<uint32_t>(grid.threads))
        futex_wake(done_, 1);
    }
  }

  static void run_thread(Grid& grid, int thread) {
    Block& b = *grid.current;
    t_context = ThreadContext{&b, thread, thread / 32, thread % 32};
    const dim3 block = grid.block;
    threadIdx = uint3{thread % block.x, (thread / block.x) % block.y, thread / (block.x * block.y)};
    blockIdx = b.index;
    blockDim = block;
    gridDim = grid.grid;
    try {
      grid.body(grid.context);
    } catch (const Abort&) {
    } catch (const std::exception& error) {
      b.lock.lock();
      fail_locked(b, std::string("a thread threw ") + error.what());
      b.lock.unlock();
    }
    exit_thread(b, thread);
    t_context = ThreadContext{};
  }

  // CUDA's rule: a thread that has exited no longer counts for the barrier; a lane
  // that a pending exchange waits for may not exit.
  static void exit_thread(Block& b, int thread) {
    const int w = thread / 32, lane = thread % 32;
    b.lock.lock();
    b.live -= 1;
    b.warps[w].live &= ~(1u << lane);
    b.state[thread] = ThreadState::kExited;
    bool wake_barrier = false;
    if (!b.failed.load(std::memory_order_relaxed)) {
      Warp& warp = b.warps[w];
      if (warp.arrived && (warp.mask & (1u << lane))) {
        fail_locked(b, "lane " + std::to_string(lane) + " of warp " + std::to_string(w) + " exited while lanes " +
                           lanes_text(warp.arrived) + " wait for it in " + op_name(warp.op) + "(mask " +
                           hex(warp.mask) + ") at " + site_text(warp.site));
      } else if (b.at_barrier > 0 && b.at_barrier == b.live) {
        release_barrier_locked(b);
        wake_barrier = true;
      } else {
        check_deadlock_locked(b);
      }
    }
    b.lock.unlock();
    if (wake_barrier) futex_wake(b.barrier_generation, INT_MAX);
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<uint32_t> done_{0};
  Grid* current_ = nullptr;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: its threads outlive static destruction
  return *instance;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, int64_t>& launches() {
  static std::map<std::string, int64_t> counts;
  return counts;
}
std::atomic<int> g_multiprocessors{4};

thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

cudaError_t report(cudaError_t error, const std::string& message) {
  t_last_error = error;
  t_last_message = message;
  return error;
}

std::string dims_text(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// The kernel's name without template arguments or namespaces, as a launch names it.
std::string base_name(const char* name) {
  std::string s(name);
  const size_t angle = s.find('<');
  if (angle != std::string::npos) s.resize(angle);
  const size_t colon = s.rfind(':');
  if (colon != std::string::npos) s = s.substr(colon + 1);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

}  // namespace

void syncthreads(Site site) {
  Block& b = current_block("__syncthreads");
  const int thread = t_context.thread;
  b.lock.lock();
  if (b.failed.load(std::memory_order_relaxed)) {
    b.lock.unlock();
    throw Abort{};
  }
  if (b.at_barrier == 0) {
    b.barrier_site = site;
    b.barrier_first = thread;
  } else if (!same_site(site, b.barrier_site)) {
    fail_and_abort(b, "divergent __syncthreads(): thread " + std::to_string(b.barrier_first) + " waits at " +
                          site_text(b.barrier_site) + ", thread " + std::to_string(thread) + " arrived at " +
                          site_text(site));
  }
  const uint32_t generation = b.barrier_generation.load(std::memory_order_relaxed);
  happens_before_release(&b.barrier_order[generation & 1]);
  b.state[thread] = ThreadState::kBarrier;
  b.state_site[thread] = site;
  b.waiting += 1;
  if (++b.at_barrier == b.live) {
    release_barrier_locked(b);
    b.lock.unlock();
    futex_wake(b.barrier_generation, INT_MAX);
  } else {
    check_deadlock_locked(b);
    b.lock.unlock();
    wait_while_equal(b.barrier_generation, generation);
  }
  if (b.failed.load(std::memory_order_acquire)) throw Abort{};
  happens_before_acquire(&b.barrier_order[generation & 1]);
}

uint64_t warp_op(Site site, WarpOp op, unsigned mask, uint64_t value, unsigned arg, int width) {
  Block& b = current_block(op_name(op));
  const int thread = t_context.thread, w = t_context.warp, lane = t_context.lane;
  const uint32_t bit = 1u << lane;
  Warp& warp = b.warps[w];
  b.lock.lock();
  if (b.failed.load(std::memory_order_relaxed)) {
    b.lock.unlock();
    throw Abort{};
  }
  const std::string call = std::string(op_name(op)) + "(mask " + hex(mask) + ") at " + site_text(site);
  const std::string who = "lane " + std::to_string(lane) + " of warp " + std::to_string(w);
  if (!(mask & bit)) fail_and_abort(b, who + " called " + call + " without its own lane in the mask");
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail_and_abort(b, who + " called " + call + " with width " + std::to_string(width) +
                          " (must be a power of 2 up to 32)");
  if (mask & ~warp.live)
    fail_and_abort(b, who + " called " + call + " naming lanes " + lanes_text(mask & ~warp.live) +
                          ", which have exited or do not exist");
  if (warp.arrived && (warp.op != op || warp.mask != mask || warp.width != width))
    fail_and_abort(b, "lanes of warp " + std::to_string(w) + " called different warp intrinsics at once: lanes " +
                          lanes_text(warp.arrived) + " " + op_name(warp.op) + "(mask " + hex(warp.mask) + ") at " +
                          site_text(warp.site) + ", " + who + " " + call);
  const unsigned source = source_lane(op, lane, arg, width);
  if (is_shuffle(op) && !(mask & (1u << source)))
    fail_and_abort(b, who + " called " + call + " reading lane " + std::to_string(source) + ", which is not in the mask");
  if (!warp.arrived) {
    warp.op = op;
    warp.mask = mask;
    warp.width = width;
    warp.site = site;
  }
  warp.input[lane] = value;
  warp.source[lane] = static_cast<uint8_t>(source);
  const uint32_t generation = warp.generation.load(std::memory_order_relaxed);
  happens_before_release(&warp.order[generation & 1]);
  warp.arrived |= bit;
  b.state[thread] = ThreadState::kWarp;
  b.state_site[thread] = site;
  b.waiting += 1;
  if (warp.arrived == mask) {
    complete_exchange_locked(b, w);
    b.lock.unlock();
    futex_wake(warp.generation, INT_MAX);
  } else {
    check_deadlock_locked(b);
    b.lock.unlock();
    wait_while_equal(warp.generation, generation);
  }
  if (b.failed.load(std::memory_order_acquire)) throw Abort{};
  happens_before_acquire(&warp.order[generation & 1]);
  return warp.result[lane];  // no later exchange of this lane's can overwrite it before this lane joins it
}

void* dynamic_shared() { return current_block("dynamic shared memory").dynamic_shared.get(); }

cudaError_t run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*),
                     void* context) {
  const std::string kernel = base_name(name);
  const std::string where = "launch of " + kernel + " with grid " + dims_text(grid) + " and block " + dims_text(block);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return report(cudaErrorInvalidConfiguration, where + ": a block has 1 to 1024 threads (z at most 64)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return report(cudaErrorInvalidConfiguration,
                  where + ": grid dimensions must be at least 1 (at most 2^31 - 1, 65535, 65535)");
  if (shared_bytes > 48 * 1024)
    return report(cudaErrorInvalidValue, where + ": " + std::to_string(shared_bytes) +
                                             " bytes of dynamic shared memory is more than the 48 KiB a launch gets "
                                             "without opting in");
  std::lock_guard<std::mutex> guard(launch_mutex());
  launches()[kernel] += 1;
  Grid g{name, grid, block, body, context, nullptr, static_cast<int>(threads)};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.kernel = name;
        b.index = uint3{x, y, z};
        b.threads = g.threads;
        b.live = g.threads;
        const int warps = (g.threads + 31) / 32;
        b.warps.reset(new Warp[warps]);
        for (int w = 0; w < warps; ++w) {
          const int lanes = std::min(32, g.threads - 32 * w);
          b.warps[w].live = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        }
        b.state.assign(g.threads, ThreadState::kRunning);
        b.state_site.assign(g.threads, Site{"", 0});
        if (shared_bytes) b.dynamic_shared.reset(new unsigned char[shared_bytes]);
        g.current = &b;
        pool().run_block(g);
        if (b.failed.load(std::memory_order_acquire))
          return report(cudaErrorLaunchFailure, kernel + ", block " + dims_text(dim3(x, y, z)) + ": " + b.message);
      }
  return cudaSuccess;
}

int multiprocessor_count() { return g_multiprocessors.load(); }

void set_multiprocessor_count(int count) {
  if (count < 1) throw std::invalid_argument("the multiprocessor count must be at least 1");
  g_multiprocessors.store(count);
}

std::map<std::string, int64_t> launch_counts() {
  std::lock_guard<std::mutex> guard(launch_mutex());
  return launches();
}

void reset_launch_counts() {
  std::lock_guard<std::mutex> guard(launch_mutex());
  launches().clear();
}

std::string last_error_message() { return t_last_message; }

cudaError_t get_last_error() {
  const cudaError_t error = t_last_error;
  t_last_error = cudaSuccess;
  return error;
}

cudaError_t peek_last_error() { return t_last_error; }

}  // namespace cudasim
