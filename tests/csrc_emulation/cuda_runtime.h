// A CPU stand-in for the few CUDA features csrc/add_layer_norm.cu, csrc/gelu.cu and
// csrc/attention_backward_rows.cu use, so that their kernels and host dispatch run, slowly, on a
// machine without a GPU (tests/test_csrc_emulated.py). Each CUDA thread of a block is a fiber (a
// ucontext with its own stack) on the one OS thread; blocks run one after another. A fiber runs
// until it waits at a barrier (__syncthreads, or its warp's around each shuffle) or returns; a
// barrier opens when all its threads have arrived. Which fiber runs next is adversarial (see
// launch): a missing __syncthreads gives wrong results. Cooperative switching makes a barrier
// cost two context switches a thread, where one OS thread per CUDA thread (this file's first
// form) woke hundreds of threads through the kernel at every barrier and ran the drivers 6-13x
// slower.
// The test rewrites `__shared__` to a function-level `static` (shared by the block's threads) and
// `k<<<grid, block, smem, stream>>>(...)` to `emu::launch(k, grid, block, smem, stream, ...)`.
// fp16 through the compiler's _Float16, bf16 rounded to nearest even by hand. Not modelled: memory
// alignment faults, interleavings inside a stretch between two barriers (a fiber runs it without
// a switch, so two warps' accesses are never interleaved there), and occupancy. A kernel that
// returns early in some threads before a barrier the others reach aborts with a deadlock message
// (on a GPU it is undefined behaviour).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
struct dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
constexpr int kMaxThreads = 1024;
inline dim3 thread_idx[kMaxThreads];  // of each fiber of the running block
inline int current = 0;              // the running fiber
inline dim3 block_idx, block_dim, grid_dim;
inline float shfl_buf[kMaxThreads];
inline ucontext_t scheduler;
inline ucontext_t fibers[kMaxThreads];
// The fibers not waiting at a barrier, by warp (each warp's in no order).
inline std::vector<int> runnable[kMaxThreads / 32];
inline void yield() { swapcontext(&fibers[current], &scheduler); }
// A barrier for `expected` fibers; reusable, as CUDA's are, phase after phase. The last to
// arrive opens it: the others become runnable again, and it goes on.
struct Barrier {
  int expected = 0;
  std::vector<int> waiting;
  void arrive_and_wait() {
    if (int(waiting.size()) + 1 == expected) {
      for (int f : waiting) runnable[f / 32].push_back(f);
      waiting.clear();
      return;
    }
    waiting.push_back(current);
    yield();  // the scheduler resumes this fiber only once the barrier has opened
  }
};
inline Barrier block_barrier;
inline Barrier warp_barriers[kMaxThreads / 32];
}
#define threadIdx emu::thread_idx[emu::current]
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline void __syncthreads() { emu::block_barrier.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int t = threadIdx.x;
  emu::shfl_buf[t] = v;
  emu::warp_barriers[t / 32].arrive_and_wait();
  const float r = emu::shfl_buf[(t & ~31) | ((t % 32) ^ offset)];
  emu::warp_barriers[t / 32].arrive_and_wait();
  return r;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.bits, &f, 2); return h; }
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4); u += 0x7fffu + ((u >> 16) & 1u); return {uint16_t(u >> 16)};
}
// Two 16-bit values in one 32-bit register (the pair conversions round each half as one would).
struct alignas(4) __half2 { __half x, y; };
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
// The occupancy calculator: any positive count does here (the driver passes max_blocks itself).
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}
namespace emu {
inline long launches = 0;
inline std::function<void()> body;  // the launched kernel with its arguments bound
inline bool finished = false;       // set by a fiber whose kernel returned
inline void fiber_main() {
  body();
  finished = true;
}  // returning resumes the scheduler (uc_link)
inline unsigned long long schedule_state = 0x9E3779B97F4A7C15ull;  // fixed: a run is reproducible
inline unsigned next_random() {  // xorshift64*
  schedule_state ^= schedule_state >> 12, schedule_state ^= schedule_state << 25, schedule_state ^= schedule_state >> 27;
  return unsigned((schedule_state * 0x2545F4914F6CDD1Dull) >> 32);
}
// Stacks for as many fibers as the largest block so far, kept across launches of every kernel.
// Pages a kernel never touches are never mapped, so 256 KB a fiber costs little.
constexpr size_t kStack = 256 * 1024;
inline std::vector<std::unique_ptr<char[]>> stacks;
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, int block, int, cudaStream_t, A&&... args) {
  if (block < 1 || block > kMaxThreads) {
    std::fprintf(stderr, "emu::launch: block of %d threads (1..%d)\n", block, kMaxThreads);
    std::abort();
  }
  while (int(stacks.size()) < block) stacks.emplace_back(new char[kStack]);
  ++launches;
  block_dim = {unsigned(block)};
  grid_dim = {grid};
  body = [&] { kernel(P(args)...); };
  const int warps = (block + 31) / 32;
  block_barrier.expected = block;
  for (int w = 0; w < warps; ++w) warp_barriers[w].expected = block - 32 * w < 32 ? block - 32 * w : 32;
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = {b};
    for (int t = 0; t < block; ++t) {
      thread_idx[t] = {unsigned(t)};
      getcontext(&fibers[t]);
      fibers[t].uc_stack.ss_sp = stacks[t].get();
      fibers[t].uc_stack.ss_size = kStack;
      fibers[t].uc_link = &scheduler;
      makecontext(&fibers[t], fiber_main, 0);
      runnable[t / 32].push_back(t);
    }
    // The schedule is adversarial: the block's warps get a random order, and the first warp in
    // it that has a runnable fiber always runs next (which of its fibers, at random), each until
    // it waits or returns. So one warp runs as far ahead of the others as barriers let it: a
    // missing __syncthreads shows as wrong results, whether a warp then reads shared memory
    // before another has written it or overwrites it before another has read it. Each block
    // draws a new order.
    int order[kMaxThreads / 32];
    for (int w = 0; w < warps; ++w) order[w] = w;
    for (int w = warps - 1; w > 0; --w) std::swap(order[w], order[next_random() % (w + 1)]);
    for (int live = block; live > 0;) {
      std::vector<int>* ready = nullptr;
      for (int w = 0; w < warps && ready == nullptr; ++w)
        if (!runnable[order[w]].empty()) ready = &runnable[order[w]];
      if (ready == nullptr) {
        std::fprintf(stderr, "emu::launch: deadlock in block %u: %d threads wait at barriers the others never reach\n", b, live);
        std::abort();
      }
      const size_t pick = next_random() % ready->size();
      current = (*ready)[pick];
      (*ready)[pick] = ready->back();
      ready->pop_back();
      finished = false;
      swapcontext(&scheduler, &fibers[current]);
      live -= finished;
    }
    for (int w = 0; w < warps; ++w) warp_barriers[w].waiting.clear();
    block_barrier.waiting.clear();
  }
}
}  // namespace emu
