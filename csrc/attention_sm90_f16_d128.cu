// One instantiation of the Hopper attention forward (attention_sm90.cuh): f16, head dim 128.
// A file each so that the build compiles the four in parallel.
#include "attention_sm90.cuh"

#if defined(FUSEFORMER_SM90A)
FUSEFORMER_SM90_INSTANCE(cutlass::half_t, 128, forward_f16_d128)
#endif
