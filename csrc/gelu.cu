// GELU forward and its gradient as elementwise kernels, the half of Linear+GELU that the GEMM
// epilogue cannot do exactly: cuBLASLt's GELU epilogue is the tanh approximation only, so the
// erf form (BERT) runs GEMM + bias and then this kernel, and every backward uses gelu_backward.
//
//   erf:  gelu(x) = x * Phi(x),              gelu'(x) = Phi(x) + x * phi(x)
//   tanh: gelu(x) = x/2 * (1 + tanh(u)),     u = k * (x + c x^3), k = sqrt(2/pi), c = 0.044715
//         gelu'(x) = (1 + tanh(u))/2 + x/2 * (1 - tanh(u)^2) * k * (1 + 3 c x^2)
#include "common.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhC = 0.044715f;

__device__ __forceinline__ float gelu(float x, bool approximate_tanh) {
  if (approximate_tanh) return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + kTanhC * x * x * x)));
  return 0.5f * x * (1.f + erff(x * kSqrtHalf));
}

__device__ __forceinline__ float gelu_grad(float x, bool approximate_tanh) {
  if (approximate_tanh) {
    const float t = tanhf(kSqrt2OverPi * (x + kTanhC * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhC * x * x);
  }
  return 0.5f * (1.f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

template <typename T>
__global__ void gelu_forward_kernel(const T* __restrict__ pre, T* __restrict__ out, int64_t n, bool approximate_tanh) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<T>(gelu(to_float(pre[i]), approximate_tanh));
}

template <typename T>
__global__ void gelu_backward_kernel(const T* __restrict__ dout, const T* __restrict__ pre, T* __restrict__ dpre,
                                     int64_t n, bool approximate_tanh) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dpre[i] = from_float<T>(to_float(dout[i]) * gelu_grad(to_float(pre[i]), approximate_tanh));
}

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);  // grid-stride beyond this
}

}  // namespace

cudaError_t gelu_forward(DType dtype, const void* pre, void* out, int64_t n, bool approximate_tanh,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16:
      gelu_forward_kernel<__half><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const __half*>(pre), static_cast<__half*>(out), n, approximate_tanh);
      break;
    case DType::BF16:
      gelu_forward_kernel<__nv_bfloat16><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(pre), static_cast<__nv_bfloat16*>(out), n, approximate_tanh);
      break;
    case DType::F32:
      gelu_forward_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const float*>(pre), static_cast<float*>(out), n, approximate_tanh);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t gelu_backward(DType dtype, const void* dout, const void* pre, void* dpre, int64_t n,
                          bool approximate_tanh, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16:
      gelu_backward_kernel<__half><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const __half*>(dout), static_cast<const __half*>(pre), static_cast<__half*>(dpre), n, approximate_tanh);
      break;
    case DType::BF16:
      gelu_backward_kernel<__nv_bfloat16><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(dout), static_cast<const __nv_bfloat16*>(pre), static_cast<__nv_bfloat16*>(dpre), n, approximate_tanh);
      break;
    case DType::F32:
      gelu_backward_kernel<float><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const float*>(dout), static_cast<const float*>(pre), static_cast<float*>(dpre), n, approximate_tanh);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fuseformer
