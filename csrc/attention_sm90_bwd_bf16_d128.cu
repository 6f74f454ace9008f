// One instantiation of the Hopper attention backward (attention_sm90_backward.cuh): bf16, head
// dim 128. A file each so that the build compiles the four in parallel.
#include "attention_sm90_backward.cuh"

#if defined(FUSEFORMER_SM90A)
FUSEFORMER_SM90_BACKWARD_INSTANCE(cutlass::bfloat16_t, 128, backward_bf16_d128)
#endif
