// Helpers of the CPU drivers of csrc/ kernels (add_layer_norm_driver.cpp, gelu_driver.cpp), run
// on the stand-in for CUDA (cuda_runtime.h here): conversions, tolerances per dtype, poisoned
// allocations, random tensors and a failure count.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include "kernels.h"

using fuseformer::DType;
inline std::mt19937 rng(1234);

template <typename T> float tof(T v);
template <> inline float tof<float>(float v) { return v; }
template <> inline float tof<__half>(__half v) { return __half2float(v); }
template <> inline float tof<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T fromf(float v);
template <> inline float fromf<float>(float v) { return v; }
template <> inline __half fromf<__half>(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> DType dtype_of();
template <> inline DType dtype_of<float>() { return DType::F32; }
template <> inline DType dtype_of<__half>() { return DType::F16; }
template <> inline DType dtype_of<__nv_bfloat16>() { return DType::BF16; }
template <typename T> double tol();
template <> inline double tol<float>() { return 2e-5; }
template <> inline double tol<__half>() { return 4e-3; }
template <> inline double tol<__nv_bfloat16>() { return 3e-2; }

template <typename T> T* alloc(size_t n) {  // 64-byte aligned, NaN-poisoned
  T* p = static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64 + 64));
  std::memset(p, 0xff, n * sizeof(T));
  return p;
}
template <typename T> T* random_tensor(size_t n, float scale, float shift) {
  T* p = alloc<T>(n);
  std::normal_distribution<float> d(0.f, 1.f);
  for (size_t i = 0; i < n; ++i) p[i] = fromf<T>(shift + scale * d(rng));
  return p;
}

inline int failures = 0;
inline void check(const char* what, const std::string& ctx, double got, double want, double t) {
  const double err = std::fabs(got - want);
  if (!(err <= t * (1.0 + std::fabs(want)))) {
    if (failures < 20) std::printf("FAIL %s %s: got %.6g want %.6g\n", ctx.c_str(), what, got, want);
    ++failures;
  }
}

