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

// Both kernels move VW elements per access: 16 bytes (VW = 16 / sizeof(T)) when every pointer is
// 16-byte aligned, one element otherwise; the last n % VW elements go one at a time. Why: at one
// element per access a 16-bit kernel issued 2-byte loads and stores (LDG.E.U16), eight times the
// memory instructions of a 16-byte access for the same bytes, with fewer bytes in flight per
// thread; the dGELU of every csrc/ Linear+GELU backward (16384 x 3072 bf16: ~300 MB) ran so.
template <typename T, int VW>
__global__ void gelu_forward_kernel(const T* __restrict__ pre, T* __restrict__ out, int64_t n, bool approximate_tanh) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t vectors = n / VW;
  for (int64_t v = first; v < vectors; v += stride) {
    const Vec<T, VW> p = load_vec<VW>(pre + v * VW);
    float y[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) y[j] = gelu(to_float(p.v[j]), approximate_tanh);
    Vec<T, VW> o;
    round_into<T, VW>(o, y);
    store_vec(out + v * VW, o);
  }
  for (int64_t i = vectors * VW + first; i < n; i += stride)
    out[i] = from_float<T>(gelu(to_float(pre[i]), approximate_tanh));
}

template <typename T, int VW>
__global__ void gelu_backward_kernel(const T* __restrict__ dout, const T* __restrict__ pre, T* __restrict__ dpre,
                                     int64_t n, bool approximate_tanh) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t first = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t vectors = n / VW;
  for (int64_t v = first; v < vectors; v += stride) {
    const Vec<T, VW> g = load_vec<VW>(dout + v * VW);
    const Vec<T, VW> p = load_vec<VW>(pre + v * VW);
    float d[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) d[j] = to_float(g.v[j]) * gelu_grad(to_float(p.v[j]), approximate_tanh);
    Vec<T, VW> o;
    round_into<T, VW>(o, d);
    store_vec(dpre + v * VW, o);
  }
  for (int64_t i = vectors * VW + first; i < n; i += stride)
    dpre[i] = from_float<T>(to_float(dout[i]) * gelu_grad(to_float(pre[i]), approximate_tanh));
}

constexpr int kThreads = 256;

template <typename T>
void launch_forward(const void* pre, void* out, int64_t n, bool approximate_tanh, cudaStream_t stream) {
  constexpr int kVW = 16 / sizeof(T);
  const T* p = static_cast<const T*>(pre);
  T* o = static_cast<T*>(out);
  if (aligned_to(pre, 16) && aligned_to(out, 16)) {
    gelu_forward_kernel<T, kVW><<<grid_stride_blocks(n, kVW, kThreads), kThreads, 0, stream>>>(p, o, n, approximate_tanh);
  } else {
    gelu_forward_kernel<T, 1><<<grid_stride_blocks(n, 1, kThreads), kThreads, 0, stream>>>(p, o, n, approximate_tanh);
  }
}

template <typename T>
void launch_backward(const void* dout, const void* pre, void* dpre, int64_t n, bool approximate_tanh,
                     cudaStream_t stream) {
  constexpr int kVW = 16 / sizeof(T);
  const T* g = static_cast<const T*>(dout);
  const T* p = static_cast<const T*>(pre);
  T* d = static_cast<T*>(dpre);
  if (aligned_to(dout, 16) && aligned_to(pre, 16) && aligned_to(dpre, 16)) {
    gelu_backward_kernel<T, kVW><<<grid_stride_blocks(n, kVW, kThreads), kThreads, 0, stream>>>(g, p, d, n, approximate_tanh);
  } else {
    gelu_backward_kernel<T, 1><<<grid_stride_blocks(n, 1, kThreads), kThreads, 0, stream>>>(g, p, d, n, approximate_tanh);
  }
}

}  // namespace

cudaError_t gelu_forward(DType dtype, const void* pre, void* out, int64_t n, bool approximate_tanh,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: launch_forward<__half>(pre, out, n, approximate_tanh, stream); break;
    case DType::BF16: launch_forward<__nv_bfloat16>(pre, out, n, approximate_tanh, stream); break;
    case DType::F32: launch_forward<float>(pre, out, n, approximate_tanh, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t gelu_backward(DType dtype, const void* dout, const void* pre, void* dpre, int64_t n,
                          bool approximate_tanh, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: launch_backward<__half>(dout, pre, dpre, n, approximate_tanh, stream); break;
    case DType::BF16: launch_backward<__nv_bfloat16>(dout, pre, dpre, n, approximate_tanh, stream); break;
    case DType::F32: launch_backward<float>(dout, pre, dpre, n, approximate_tanh, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fuseformer
