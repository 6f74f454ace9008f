// The CUTLASS 3 (sm_90a) Linear+GELU kernels for float16, erf and tanh: a translation unit
// of their own so that a parallel build compiles them beside the other dtype's (each takes
// about a minute of nvcc). See linear_gelu_cutlass_sm90.cuh.
#include "linear_gelu_cutlass_sm90.cuh"

namespace fuseformer {
namespace cutlass_gelu {

cudaError_t run_sm90_f16(const LinearGeluCutlassParams& p, bool approximate_tanh, int device, int sm_count,
                         cudaStream_t stream) {
#if defined(FUSEFORMER_GEMM_SM90)
  return approximate_tanh ? sm90::run<cutlass::half_t, GeluTanh>(p, device, sm_count, stream)
                          : sm90::run<cutlass::half_t, GeluErf>(p, device, sm_count, stream);
#else
  (void)p, (void)approximate_tanh, (void)device, (void)sm_count, (void)stream;
  return cudaErrorInvalidDeviceFunction;
#endif
}

}  // namespace cutlass_gelu
}  // namespace fuseformer
