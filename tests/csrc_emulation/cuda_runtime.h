// A CPU stand-in for the few CUDA features csrc/add_layer_norm.cu and csrc/gelu.cu use, so that
// their kernels and host dispatch run, slowly, on a machine without a GPU
// (tests/test_csrc_emulated.py): one std::thread per CUDA thread, a std::barrier per block
// (__syncthreads) and per warp (shuffles through a shared buffer), blocks one after another. The test rewrites `__shared__` to a
// function-level `static` (shared by the block's threads) and `k<<<grid, block, smem, stream>>>(...)`
// to `emu::launch(k, grid, block, smem, stream, ...)`. fp16 through the compiler's _Float16,
// bf16 rounded to nearest even by hand. Not modelled: memory alignment faults, races between
// warps without a barrier, occupancy. A kernel that returns early in some threads before a
// barrier deadlocks here (on a GPU it is undefined behaviour as well).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
struct dim3 { unsigned x = 1, y = 1, z = 1; };
namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shfl_buf[1024];
}
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int t = threadIdx.x;
  emu::shfl_buf[t] = v;
  emu::warp_barriers[t / 32]->arrive_and_wait();
  const float r = emu::shfl_buf[(t & ~31) | ((t % 32) ^ offset)];
  emu::warp_barriers[t / 32]->arrive_and_wait();
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
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, int block, int, cudaStream_t, A&&... args) {
  ++launches;
  block_dim = {unsigned(block)};
  grid_dim = {grid};
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    block_barrier = &bar;
    warp_barriers.clear();
    for (int w = 0; w < (block + 31) / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t)
      threads.emplace_back([&, t] { thread_idx = {unsigned(t)}; block_idx = {b}; kernel(P(args)...); });
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu
