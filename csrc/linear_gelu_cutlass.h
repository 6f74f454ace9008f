// Linear + bias + GELU as one CUTLASS GEMM with the bias and the GELU fused into its epilogue
// (csrc/linear_gelu_cutlass.cu, built as its own extension, fuseformer_cuda_gemm). Plain C++
// over void pointers, like kernels.h: no torch and no CUTLASS header, so the binding compiles
// without either.
#pragma once

#include <cuda_runtime_api.h>

#include <stdint.h>

#include "kernels.h"

namespace fuseformer {

// Which kernel runs the GEMM. kAuto: kSm90 on compute capability 9.0 (H100/H200), kSm80
// elsewhere. kSm80 (CUTLASS 2.x, mma.sync + cp.async) runs on sm_80 and newer, Hopper included;
// kSm90 (CUTLASS 3.x: TMA, warp-specialized wgmma) needs 9.0 and a build for sm_90a.
enum class GemmPath : int { kAuto = 0, kSm80 = 1, kSm90 = 2 };

struct LinearGeluCutlassParams {
  const void* x;       // (M, K) row-major, 16-byte aligned
  const void* weight;  // (N, K) row-major (nn.Linear's layout), 16-byte aligned
  const void* bias;    // (N) or null (then no bias); 16-byte aligned
  void* out;           // (M, N) row-major: gelu(x weight^T + bias)
  void* preact;        // (M, N) row-major x weight^T + bias before the GELU, or null (inference)
  int64_t M, N, K;
  bool approximate_tanh;  // GPT-2's tanh form; false: the erf form (BERT)
};

// Why these arguments cannot run (a static string), or null when they can: fp16/bf16 only,
// K and N positive multiples of 8 (16-byte rows, as TMA and the 128-bit loads need), M >= 0,
// every pointer 16-byte aligned, sizes within int range.
const char* linear_gelu_cutlass_unsupported(DType dtype, const LinearGeluCutlassParams& params);

// out = gelu(x weight^T + bias) in the input dtype, fp32 accumulation, and preact when it is
// not null. Returns cudaErrorInvalidValue, having launched nothing, when
// linear_gelu_cutlass_unsupported refuses the arguments or CUTLASS's can_implement does;
// cudaErrorInvalidDeviceFunction when kSm90 is asked for on a device that is not 9.0 or the
// module was built without sm_90a; otherwise the launch's status.
cudaError_t linear_gelu_cutlass(DType dtype, const LinearGeluCutlassParams& params, GemmPath path,
                                cudaStream_t stream);

// The path kAuto takes on this device (kSm80 or kSm90), or kAuto when the device cannot run
// either (compute capability below 8.0, or a CUDA error).
GemmPath linear_gelu_cutlass_auto_path(int device);

// True when this build holds the sm_90 kernels (host code instantiated them; whether the
// device code is real depends on an sm_90a gencode, see the .cu).
bool linear_gelu_cutlass_has_sm90();

}  // namespace fuseformer
