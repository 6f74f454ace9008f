// Device helpers shared by the pure-CUDA kernels (no torch headers: nvcc alone compiles them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include <type_traits>

namespace fuseformer {

// fp16/bf16/fp32 <-> fp32. Every kernel does its arithmetic in fp32 and rounds once on store.
template <typename T> struct Convert;
template <> struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float to_float(T v) { return Convert<T>::to_float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return Convert<T>::from_float(v); }

// A run of VW elements moved as one access: 16 bytes when VW * sizeof(T) == 16, so a warp
// issues full 512-byte transactions; VW == 1 is the path for sizes or pointers that are not
// 16-byte aligned (hidden 1023, a sliced view), where a wide access would fault.
template <typename T, int VW> struct alignas(sizeof(T) * VW) Vec {
  T v[VW];
};

// A Vec of VW elements at src / dst, as one access (src, dst aligned to the Vec).
template <int VW, typename T>
__device__ __forceinline__ Vec<T, VW> load_vec(const T* __restrict__ src) {
  return *reinterpret_cast<const Vec<T, VW>*>(src);
}

template <typename T, int VW>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, const Vec<T, VW>& src) {
  *reinterpret_cast<Vec<T, VW>*>(dst) = src;
}

// VW fp32 values rounded into a Vec of T, a pair (one 32-bit register) at a time for 16-bit
// types: the two-wide conversion (F2FP.*.PACK_AB) fills both halves of a register in one
// instruction, where rounding element by element then merges the halves (PRMT).
template <typename T, int VW>
__device__ __forceinline__ void round_into(Vec<T, VW>& dst, const float (&src)[VW]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && VW % 2 == 0) {
    auto* pairs = reinterpret_cast<__nv_bfloat162*>(dst.v);
#pragma unroll
    for (int j = 0; j < VW; j += 2) pairs[j / 2] = __floats2bfloat162_rn(src[j], src[j + 1]);
  } else if constexpr (std::is_same_v<T, __half> && VW % 2 == 0) {
    auto* pairs = reinterpret_cast<__half2*>(dst.v);
#pragma unroll
    for (int j = 0; j < VW; j += 2) pairs[j / 2] = __floats2half2_rn(src[j], src[j + 1]);
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) dst.v[j] = from_float<T>(src[j]);
  }
}

template <int WIDTH = 32>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Host side: whether `ptr` is aligned to `bytes` (a power of two), i.e. may take the Vec path.
inline bool aligned_to(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Host side: blocks of `threads` for n elements moved `vw` at a time by a grid-stride kernel (at
// least one; beyond 65536 blocks the stride loop takes the rest).
inline unsigned grid_stride_blocks(int64_t n, int vw, int threads) {
  const int64_t work = n / vw > 0 ? n / vw : n;
  const int64_t blocks = (work + threads - 1) / threads;
  return unsigned(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace fuseformer
