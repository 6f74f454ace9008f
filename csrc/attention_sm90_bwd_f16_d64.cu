// One instantiation of the Hopper attention backward (attention_sm90_backward.cuh): fp16, head
// dim 64. A file each so that the build compiles the four in parallel.
#include "attention_sm90_backward.cuh"

#if defined(FUSEFORMER_SM90A)
FUSEFORMER_SM90_BACKWARD_INSTANCE(cutlass::half_t, 64, backward_f16_d64)
#endif
