// The CUTLASS 3 (sm_90a) Linear+GELU kernels for bfloat16, erf and tanh: a translation unit
// of their own so that a parallel build compiles them beside the other dtype's (each takes
// about a minute of nvcc). See linear_gelu_cutlass_sm90.cuh.
#include "linear_gelu_cutlass_sm90.cuh"

FUSEFORMER_GELU_SM90_ENTRY(run_sm90_bf16, cutlass::bfloat16_t)
