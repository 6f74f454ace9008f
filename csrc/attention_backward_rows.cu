// The two row-wise kernels around the CuTe and Hopper attention backwards
// (attention_cute_backward.cu, attention_sm90_backward.cuh): before them, delta = rowsum(dO * O)
// in fp32 and a zeroed fp32 dq accumulator; after them, dq = scale * accumulator in the input
// dtype. Plain CUDA, no CuTe, so tests/test_csrc_emulated.py runs them on the CPU.
//
// Both move 16 bytes an access where the rows allow it. The preprocess was a warp per row at one
// element a lane: at head dim 64 a 2-byte load per lane and tensor, four such warp loads a row, so
// few bytes in flight for a pass that reads O and dO whole (d64 L2048 B8 H16: 67 MB, plus 67 MB
// of zeros written) ahead of every backward.
#include "common.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

constexpr int kThreads = 256;

// G threads a row (a power of two, at most 32, so a row never straddles two warps), VW elements
// an access. At head dims 64 and 128 in 16-bit types that is 8 or 16 threads holding one 16-byte
// vector each, 4 or 2 rows a warp. Every lane reaches the shuffles: a row past the end only
// skips its loads and stores (an early return would leave its group's shuffle short of lanes).
template <typename T, int VW, int G>
__global__ void __launch_bounds__(kThreads) attention_backward_preprocess_kernel(const AttentionBackwardParams bp) {
  const AttentionParams& p = bp.fwd;
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  const int lane = threadIdx.x % G;
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;
  const bool valid = row < rows;
  float sum = 0.f;
  if (valid) {
    const int64_t i = row % p.Lq, h = row / p.Lq % p.Hq, b = row / p.Lq / p.Hq;
    const T* o = static_cast<const T*>(p.out) + b * p.out_strides[0] + h * p.out_strides[1] + i * p.out_strides[2];
    const T* d = static_cast<const T*>(bp.dout) + b * bp.dout_strides[0] + h * bp.dout_strides[1] +
                 i * bp.dout_strides[2];
    for (int c = lane * VW; c < p.D; c += G * VW) {
      const Vec<T, VW> ov = load_vec<VW>(o + c), dv = load_vec<VW>(d + c);
#pragma unroll
      for (int j = 0; j < VW; ++j) sum += to_float(ov.v[j]) * to_float(dv.v[j]);
    }
  }
  sum = warp_sum<G>(sum);
  if (!valid) return;
  if (lane == 0) bp.delta[row] = sum;
  if (bp.dq_accum == nullptr) return;
  float* acc = bp.dq_accum + row * p.D;
  if constexpr (VW > 1) {  // the vector path also has D % 4 == 0 and a 16-byte aligned buffer
    const Vec<float, 4> zeros{};
    for (int c = lane * 4; c < p.D; c += G * 4) store_vec(acc + c, zeros);
  } else {
    for (int c = lane; c < p.D; c += G) acc[c] = 0.f;
  }
}

// dq = scale * accumulator, VW elements a thread and step (grid-stride), the last n % VW alone.
template <typename T, int VW>
__global__ void __launch_bounds__(kThreads) attention_backward_convert_dq_kernel(const float* __restrict__ acc,
                                                                                 T* __restrict__ dq, int64_t n,
                                                                                 float scale) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t vectors = n / VW;
  for (int64_t v = first; v < vectors; v += stride) {
    const Vec<float, VW> a = load_vec<VW>(acc + v * VW);
    float x[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) x[j] = a.v[j] * scale;
    Vec<T, VW> out;
    round_into<T, VW>(out, x);
    store_vec(dq + v * VW, out);
  }
  for (int64_t i = vectors * VW + first; i < n; i += stride) dq[i] = from_float<T>(acc[i] * scale);
}

// Rows of (B, H, L, D) at `ptr` with these strides all start 16-byte aligned (and D fills whole
// vectors of VW elements).
bool rows_vectorizable(const void* ptr, const int64_t strides[3], int D, int vw) {
  return aligned_to(ptr, 16) && D % vw == 0 && strides[0] % vw == 0 && strides[1] % vw == 0 && strides[2] % vw == 0;
}

template <typename T, int VW, int G>
void launch_preprocess_with(const AttentionBackwardParams& bp, int64_t rows, cudaStream_t stream) {
  const int64_t blocks = (rows * G + kThreads - 1) / kThreads;
  attention_backward_preprocess_kernel<T, VW, G><<<unsigned(blocks), kThreads, 0, stream>>>(bp);
}

template <typename T>
cudaError_t launch_preprocess(const AttentionBackwardParams& bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  if (rows == 0) return cudaSuccess;
  constexpr int kVW = 16 / sizeof(T);
  const bool vector = rows_vectorizable(p.out, p.out_strides, p.D, kVW) &&
                      rows_vectorizable(bp.dout, bp.dout_strides, p.D, kVW) &&
                      (bp.dq_accum == nullptr || (aligned_to(bp.dq_accum, 16) && p.D % 4 == 0));
  const int vectors = p.D / kVW;  // per row, when `vector`
  if (!vector || vectors > 32) launch_preprocess_with<T, 1, 32>(bp, rows, stream);
  else if (vectors > 16) launch_preprocess_with<T, kVW, 32>(bp, rows, stream);
  else if (vectors > 8) launch_preprocess_with<T, kVW, 16>(bp, rows, stream);
  else if (vectors > 4) launch_preprocess_with<T, kVW, 8>(bp, rows, stream);
  else launch_preprocess_with<T, kVW, 4>(bp, rows, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_convert_dq(const AttentionBackwardParams& bp, float scale, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const int64_t n = int64_t(p.B) * p.Hq * p.Lq * p.D;
  if (n == 0) return cudaSuccess;
  constexpr int kVW = 16 / sizeof(T);  // one 16-byte store of dq, two of the fp32 buffer's loads
  const bool vector = aligned_to(bp.dq_accum, 16 * (sizeof(float) / sizeof(T))) && aligned_to(bp.dq, 16);
  const unsigned grid = grid_stride_blocks(n, vector ? kVW : 1, kThreads);
  const float* acc = bp.dq_accum;
  T* dq = static_cast<T*>(bp.dq);
  if (vector) attention_backward_convert_dq_kernel<T, kVW><<<grid, kThreads, 0, stream>>>(acc, dq, n, scale);
  else attention_backward_convert_dq_kernel<T, 1><<<grid, kThreads, 0, stream>>>(acc, dq, n, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward_preprocess(DType dtype, const AttentionBackwardParams& bp, cudaStream_t stream) {
  switch (dtype) {
    case DType::F16: return launch_preprocess<__half>(bp, stream);
    case DType::BF16: return launch_preprocess<__nv_bfloat16>(bp, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_backward_convert_dq(DType dtype, const AttentionBackwardParams& bp, float scale,
                                          cudaStream_t stream) {
  switch (dtype) {
    case DType::F16: return launch_convert_dq<__half>(bp, scale, stream);
    case DType::BF16: return launch_convert_dq<__nv_bfloat16>(bp, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fuseformer
