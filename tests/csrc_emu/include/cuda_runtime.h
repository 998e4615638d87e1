// Host stand-in for the CUDA runtime subset that csrc/*.cu uses, for the emulation tests
// (tests/test_csrc_emulated.py). Kernel sources are first rewritten by ../cuda_to_host.py.
//
// Emulated
// - A launch runs its blocks one after another. The 256 threads of a block are real
//   std::threads (a persistent pool), so __syncthreads() is a real barrier over them and
//   __syncwarp() a barrier over the 32 threads of a warp. A block whose threads never all
//   reach the end (barrier divergence) aborts the process after kHangSeconds with a message.
// - __shared__ arrays are statics, filled with 0xff bytes (NaN for fp32, fp16 and bf16) at
//   the start of every block; dynamic shared memory is exactly the requested size, poisoned
//   the same way and followed by a canary checked after every block (writes past the end).
// - 16-byte vector accesses (uint4) must be 16-byte aligned, as on the GPU; launch
//   configurations and the dynamic shared-memory opt-in are checked like the runtime does.
//   Faults are returned by cudaGetLastError() (and by the C shim) instead of crashing.
// NOT emulated
// - Blocks running concurrently, the GPU memory model beyond barriers (a missing barrier is a
//   real host data race: caught by chance here, reliably only under -fsanitize=thread), warp
//   lockstep and divergence, register / occupancy limits, timing, streams (all synchronous),
//   reads past the end of global buffers (use poisoned padding or -fsanitize=address).
#pragma once
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// (__shared__ declarations and <<<...>>> launches are rewritten by cuda_to_host.py.)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };

using std::sqrt;
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
};
using cudaStream_t = void*;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
constexpr int kBlockThreads = 256;  // the only block size the pool runs (csrc's kThreads)
constexpr int kHangSeconds = 60;
constexpr size_t kDynSmemMax = 228 * 1024;
constexpr size_t kCanaryBytes = 4096;

// Device properties the launchers query (set from the tests through the C shim).
inline int sm_count = 132;
inline int smem_optin = 227 * 1024;

inline cudaError_t last_error = cudaSuccess;
inline std::atomic<int> fault_code{0};  // first fault since reset_faults()
inline char fault_msg[512];
inline long blocks_run = 0;

inline void reset_faults() {
  fault_code = 0;
  fault_msg[0] = '\0';
}
inline void fault(cudaError_t code, const char* what) {
  int none = 0;
  if (fault_code.compare_exchange_strong(none, static_cast<int>(code)))
    std::snprintf(fault_msg, sizeof fault_msg, "%s (block %u,%u,%u thread %u)", what, blockIdx.x,
                  blockIdx.y, blockIdx.z, threadIdx.x);
}

// Per-thread pointers to the running block's barriers.
inline thread_local std::barrier<>* block_bar = nullptr;
inline thread_local std::barrier<>* warp_bar = nullptr;

// Dynamic shared memory of the running block: [dyn_base, dyn_base + dyn_bytes) then a canary.
alignas(128) inline unsigned char dyn_buf[kDynSmemMax + kCanaryBytes + 128];
inline unsigned char* dyn_base = nullptr;
inline size_t dyn_bytes = 0;
inline unsigned char* dynamic_shared() { return dyn_base; }
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_bar->arrive_and_wait(); }

namespace emu {
// Static __shared__ array: thread 0 poisons it, then the whole block waits.
template <class A>
inline void poison_shared(A& arr) {
  if (threadIdx.x == 0) std::memset(static_cast<void*>(&arr), 0xff, sizeof(arr));
  __syncthreads();
}

// reinterpret_cast<uint4*>(p) of the kernels: 16-byte accesses fault unless aligned.
template <class V, class P>
inline V* vec16(P* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fault(cudaErrorMisalignedAddress, "16-byte vector access at a misaligned address");
    static thread_local uint4 dummy;  // keeps the host from faulting; the result is discarded
    return reinterpret_cast<V*>(&dummy);
  }
  return reinterpret_cast<V*>(const_cast<std::remove_const_t<P>*>(p));
}

// Persistent pool of kBlockThreads workers; run() executes one block and waits for it.
class Pool {
 public:
  Pool() {
    for (int t = 0; t < kBlockThreads; ++t) std::thread([this, t] { work(t); }).detach();
  }
  template <class F>
  void run(const F& body, dim3 block_idx) {
    std::barrier<> bar(kBlockThreads);
    std::barrier<> warps[kBlockThreads / 32] = {
        std::barrier<>(32), std::barrier<>(32), std::barrier<>(32), std::barrier<>(32),
        std::barrier<>(32), std::barrier<>(32), std::barrier<>(32), std::barrier<>(32)};
    static_assert(kBlockThreads / 32 == 8, "warp barrier list");
    body_ = [](const void* f) { (*static_cast<const F*>(f))(); };
    ctx_ = &body;
    bar_ = &bar;
    warps_ = warps;
    idx_ = block_idx;
    {
      std::lock_guard<std::mutex> lk(mu_);
      finished_ = 0;
    }
    go_.arrive_and_wait();
    std::unique_lock<std::mutex> lk(mu_);
    const auto all_done = [&] { return finished_ == kBlockThreads; };
    if (!cv_.wait_for(lk, std::chrono::seconds(kHangSeconds), all_done)) {
      std::fprintf(stderr,
                   "csrc emulation: block (%u,%u,%u) did not finish within %d s: its threads wait "
                   "at different __syncthreads()/__syncwarp() calls (barrier divergence)\n",
                   block_idx.x, block_idx.y, block_idx.z, kHangSeconds);
      std::fflush(stderr);
      std::abort();
    }
  }

 private:
  void work(int t) {
    for (;;) {
      go_.arrive_and_wait();
      threadIdx = dim3(static_cast<unsigned>(t));
      blockIdx = idx_;
      block_bar = bar_;
      warp_bar = &warps_[t / 32];
      body_(ctx_);
      std::lock_guard<std::mutex> lk(mu_);
      if (++finished_ == kBlockThreads) cv_.notify_one();
    }
  }
  std::barrier<> go_{kBlockThreads + 1};
  void (*body_)(const void*) = nullptr;
  const void* ctx_ = nullptr;
  std::barrier<>* bar_ = nullptr;
  std::barrier<>* warps_ = nullptr;
  dim3 idx_;
  std::mutex mu_;
  std::condition_variable cv_;
  int finished_ = 0;
};
inline Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: idle workers just end with the process
  return *p;
}

inline std::mutex attr_mu;
inline std::map<const void*, int> dyn_smem_attr;  // cudaFuncAttributeMaxDynamicSharedMemorySize

// kernel<<<grid, block, smem, stream>>>(args...) as rewritten by cuda_to_host.py.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
            const A&... args) {
  size_t smem_limit = 48 * 1024;
  {
    std::lock_guard<std::mutex> lk(attr_mu);
    auto it = dyn_smem_attr.find(reinterpret_cast<const void*>(kernel));
    if (it != dyn_smem_attr.end()) smem_limit = static_cast<size_t>(it->second);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
      block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024 || smem > smem_limit) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (block.x != kBlockThreads || block.y != 1 || block.z != 1) {
    std::fprintf(stderr, "csrc emulation: only 1-D blocks of %d threads are emulated\n",
                 kBlockThreads);
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  blockDim = block;
  gridDim = grid;
  unsigned char* end = dyn_buf + sizeof(dyn_buf) - kCanaryBytes;
  const uintptr_t base = (reinterpret_cast<uintptr_t>(end) - smem) & ~uintptr_t{127};
  dyn_base = reinterpret_cast<unsigned char*>(base);
  dyn_bytes = smem;
  unsigned char* canary = dyn_base + smem;
  const size_t canary_len = static_cast<size_t>(dyn_buf + sizeof(dyn_buf) - canary);
  auto body = [&] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(dyn_base, 0xff, smem);
        std::memset(canary, 0xa5, canary_len);
        pool().run(body, dim3(bx, by, bz));
        ++blocks_run;
        for (size_t i = 0; i < canary_len; ++i)
          if (canary[i] != 0xa5) {
            int none = 0;
            if (fault_code.compare_exchange_strong(none, cudaErrorIllegalAddress))
              std::snprintf(fault_msg, sizeof fault_msg,
                            "write past the end of dynamic shared memory (%zu bytes) at byte %zu "
                            "(block %u,%u,%u)", smem, smem + i, bx, by, bz);
            break;
          }
      }
  if (fault_code != 0) last_error = static_cast<cudaError_t>(fault_code.load());
}
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sm_count : emu::smem_optin;
  return cudaSuccess;
}
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute, int value) {
  if (value < 0 || value > emu::smem_optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(emu::attr_mu);
  emu::dyn_smem_attr[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
