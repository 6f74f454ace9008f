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
// (3.x's Sm90Compute). Both GELUs are kernels/linear_gelu_kernels.py's fast form,
//   gelu(x) = x sigmoid(2 z) = x / (1 + 2^(-2 log2(e) z)),  z = x P(x^2),
// on two special-function instructions (ex2.approx.ftz, rcp.approx.ftz: a few ulps), with its P:
// - tanh: the formula's own, z = sqrt(2/pi) (x + 0.044715 x^3), as x/2 (1 + tanh z) = x sigmoid(2 z).
//   CUTLASS's own GELU_taylor uses tanh.approx.f32 (relative error ~2^-11); this is exact to the
//   approximations' ulps.
// - erf (BERT's): P fitted so that z ~ atanh(erf(x / sqrt 2)) (_ERF_P there; the same
//   coefficients here). Without erff, whose ~34 instructions per element on sm_90 cost the
//   cooperative kernel's unoverlapped epilogue most of the time the tanh form saved (H100,
//   16384 x 768 x 3072: erf 0.185 ms against tanh 0.166). Within 3.2e-6 of the float64 value
//   over [-14, 14] (tests/test_csrc_compile.py runs it on the host, as tests/test_linear_gelu.py
//   the Triton form), the relative error growing only in the far negative tail
//   (|gelu| < 1.3e-4), where erff's 0.5 x (1 + erf) loses its digits too.
// For very negative x the power overflows to inf and the result is the right limit, -0.

constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhC = 0.044715f;
constexpr float kLog2e = 1.4426950408889634f;

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

// x sigmoid(2 z) from minus_2z_log2e = -2 log2(e) z.
CUTLASS_HOST_DEVICE float x_sigmoid_2z(float x, float minus_2z_log2e) {
  return x * approx<Approx::kRcp>(approx<Approx::kEx2>(minus_2z_log2e) + 1.f);
}

// P's coefficients are folded with -2 log2(e), the factor of z in the power, at compile time.
constexpr float kArg = -2.f * kLog2e;

CUTLASS_HOST_DEVICE float gelu_erf(float x) {
  const float w = x * x;
  float p = 1.1193979563716294e-06f * kArg;  // highest power first
  p = p * w + -3.0586269090783566e-05f * kArg;
  p = p * w + -1.2483601351717986e-04f * kArg;
  p = p * w + 0.03646875266574104f * kArg;
  p = p * w + 0.7978281453743756f * kArg;
  return x_sigmoid_2z(x, x * p);
}

CUTLASS_HOST_DEVICE float gelu_tanh(float x) {
  const float p = (kSqrt2OverPi * kTanhC * kArg) * (x * x) + kSqrt2OverPi * kArg;
  return x_sigmoid_2z(x, x * p);
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
