// Internals shared by the CUTLASS Linear+GELU translation units: the GELU functors both
// epilogues apply, and the per-dtype entry points of the sm90 kernels. The sm90 kernels live in
// one translation unit per dtype (linear_gelu_cutlass_sm90_{bf16,f16}.cu) so that a parallel
// build (ninja in the JIT build, one job per file) compiles the slow CUTLASS 3 instantiations at
// once; linear_gelu_cutlass.cu holds the sm80 kernels and the dispatch.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/array.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/numeric_types.h>

#include "linear_gelu_cutlass.h"

namespace fuseformer {
namespace cutlass_gelu {

// ---------------------------------------------------------------------------------- GELU
// Applied to fp32 values. Both CUTLASS epilogues call the scalar form (2.x) or the Array form
// (3.x's Sm90Compute). CUTLASS's own GELU_taylor uses tanh.approx.f32 (relative error ~2^-11);
// ours writes tanh through one exp, exact to ~1e-6 absolute where it matters:
//   gelu_tanh(x) = x/2 (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)),
//   u = sqrt(2/pi) (x + 0.044715 x^3).
// For very negative u, exp(-2u) overflows to inf and the quotient is the right limit, -0.

//
// erf GELU (BERT's) without erff, whose ~34 instructions per element on sm_90 cost the
// cooperative kernel's unoverlapped epilogue most of the time its tanh form saves (H100, 16384 x
// 768 x 3072: erf 0.185 ms against tanh 0.166). The formula of kernels/linear_gelu_kernels.py's
// fast GELU, Numerical Recipes' erfc (fractional error < 1.2e-7 for every argument) on two
// special-function instructions:
//   gelu_erf(x) = max(x, 0) - |x| h,  h = erfc(|x| / sqrt 2) / 2 = t 2^(P(t) - x^2 log2(e) / 2),
//   t = 1 / (1 + |x| / (2 sqrt 2)),   P = log2(e) * (Numerical Recipes' polynomial) - 1.
// Within 2.4e-7 of the float64 value over [-14, 14] (tests/test_linear_gelu.py holds the same
// formula to that), and, unlike 0.5 x (1 + erff(x / sqrt 2)), accurate in the negative tail.

constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhC = 0.044715f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kTSlope = 0.35355339059327376f;  // 1 / (2 sqrt 2)

// 1 / x (kRcp) or 2^x as one special-function instruction, rcp.approx.ftz / ex2.approx.ftz (a few
// ulps); the exact operations on the host.
enum class Approx { kRcp, kEx2 };

template <Approx op>
CUTLASS_HOST_DEVICE float approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  if constexpr (op == Approx::kRcp) {
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  } else {
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  }
  return y;
#else
  return op == Approx::kRcp ? 1.f / x : exp2f(x);
#endif
}

CUTLASS_HOST_DEVICE float gelu_erf(float x) {
  const float a = fabsf(x);
  const float t = approx<Approx::kRcp>(1.f + kTSlope * a);
  // Numerical Recipes' erfcc coefficients times log2(e); the constant term also takes the 1/2.
  float p = 0.17087277f * kLog2e;
  p = p * t - 0.82215223f * kLog2e;
  p = p * t + 1.48851587f * kLog2e;
  p = p * t - 1.13520398f * kLog2e;
  p = p * t + 0.27886807f * kLog2e;
  p = p * t - 0.18628806f * kLog2e;
  p = p * t + 0.09678418f * kLog2e;
  p = p * t + 0.37409196f * kLog2e;
  p = p * t + 1.00002368f * kLog2e;
  p = p * t + (-1.26551223f * kLog2e - 1.f);
  const float h = t * approx<Approx::kEx2>(p - 0.5f * kLog2e * x * x);
  return fmaxf(x, 0.f) - a * h;
}

CUTLASS_HOST_DEVICE float gelu_tanh(float x) {
  const float minus_2u = -2.f * kSqrt2OverPi * (x + kTanhC * x * x * x);
#if defined(__CUDA_ARCH__)
  return __fdividef(x, 1.f + __expf(minus_2u));
#else
  return x / (1.f + expf(minus_2u));
#endif
}

template <class T>
struct GeluErf {
  static const bool kIsHeavy = true;  // CUTLASS 2.x then keeps its epilogue loop rolled
  CUTLASS_HOST_DEVICE T operator()(T const& x) const { return T(gelu_erf(float(x))); }
};

template <class T, int N>
struct GeluErf<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = T(gelu_erf(float(x[i])));
    return y;
  }
};

template <class T>
struct GeluTanh {
  static const bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& x) const { return T(gelu_tanh(float(x))); }
};

template <class T, int N>
struct GeluTanh<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = T(gelu_tanh(float(x[i])));
    return y;
  }
};

// 128-bit accesses: 8 half-precision elements.
constexpr int kAlignment = 8;

// ---------------------------------------------------------------------------------- sm90 entry points
// out/preact for one dtype on the CUTLASS 3 kernel (tanh or erf GELU); cudaErrorInvalidDeviceFunction
// in a build without the sm90 kernels (-DFUSEFORMER_GEMM_NO_SM90). sm_count: the device's SMs,
// which the persistent scheduler sizes its grid by.
cudaError_t run_sm90_bf16(const LinearGeluCutlassParams& p, bool approximate_tanh, int device, int sm_count,
                          cudaStream_t stream);
cudaError_t run_sm90_f16(const LinearGeluCutlassParams& p, bool approximate_tanh, int device, int sm_count,
                         cudaStream_t stream);

// One GEMM through a CUTLASS device adapter (2.x GemmUniversalWithBroadcast or 3.x
// GemmUniversalAdapter): refusals and launch failures come back as cudaError_t. Neither kernel
// needs a workspace (one batch, no split-K semaphores; the persistent scheduler and this
// epilogue keep none): one that asked for it is refused rather than handed a null pointer.
template <class Gemm, class Arguments>
cudaError_t run_gemm(const Arguments& args, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (Gemm::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  const cutlass::Status status = gemm.run(stream);
  const cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess) return launch;
  return status == cutlass::Status::kSuccess ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace cutlass_gelu
}  // namespace fuseformer
