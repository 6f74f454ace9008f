// Pieces shared by the attention forward and backward kernels (pure CUDA, no torch).
#pragma once

#include <mma.h>

#include "common.cuh"

namespace fuseformer {
namespace attn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies rows [start, start + rows) of a (L, D) matrix with row stride `stride` into shared
// memory (leading dimension ld), zero-filling rows at or past L so that out-of-range rows
// contribute exact zeros to every product (never stale NaNs).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t stride,
                                          int start, int rows, int L, bool aligned) {
  if (aligned) {
    constexpr int kChunks = D * sizeof(T) / 16;  // 16-byte pieces per row
    for (int idx = threadIdx.x; idx < rows * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * (16 / sizeof(T));
      uint4 value = make_uint4(0, 0, 0, 0);
      if (start + r < L) value = *reinterpret_cast<const uint4*>(src + (int64_t)(start + r) * stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      dst[r * ld + c] = start + r < L ? src[(int64_t)(start + r) * stride + c] : from_float<T>(0.f);
    }
  }
}

// The head dims every attention kernel is instantiated for: multiples of 16 (WMMA tiles).
#define FUSEFORMER_ATTENTION_HEAD_DIMS(CASE) CASE(16) CASE(32) CASE(64) CASE(80) CASE(96) CASE(128)

}  // namespace attn
}  // namespace fuseformer
