// One instantiation of the Hopper attention forward (attention_sm90.cuh): bf16, head dim 64.
// A file each so that the build compiles the four in parallel.
#include "attention_sm90.cuh"

#if defined(FUSEFORMER_SM90A)
FUSEFORMER_SM90_INSTANCE(cutlass::bfloat16_t, 64, forward_bf16_d64)
#endif
