// The Hopper attention's entry points. The forward (FUSEFORMER_CUDA_ATTENTION=sm90) checks that
// the call fits the sm_90a kernels of attention_sm90.cuh and launches the instantiation for its
// dtype and head dim; any other call goes to the CuTe forward (head dims 64, 128) or the WMMA
// one, so choosing sm90 never refuses a call the cuda backend takes. The kernels write what
// the other forwards write (out, natural-log lse), so every backward takes their output. The
// backward (FUSEFORMER_CUDA_ATTENTION_BACKWARD=sm90, attention_sm90_backward.cuh) does the same
// over the same scope, handing other calls to the CuTe backward.
#include <climits>
#include <cstdint>

#include "attention_sm90.cuh"

namespace fuseformer {
namespace {

// Per device, asked once: compute capability 9.0 (wgmma and TMA as sm_90a compiled them) and
// the SM count. Index 64 and up are asked every time.
struct DeviceFacts {
  bool known = false;
  bool hopper = false;
  int index = 0;
  int sm_count = 0;
};
DeviceFacts g_devices[64];

cudaError_t device_facts(DeviceFacts* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  DeviceFacts facts = device < 64 ? g_devices[device] : DeviceFacts{};
  if (!facts.known) {
    int major = 0, minor = 0;
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&facts.sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
      return err;
    facts.hopper = major == 9 && minor == 0;
    facts.index = device;
    facts.known = true;
    if (device < 64) g_devices[device] = facts;
  }
  *out = facts;
  return cudaSuccess;
}

bool fits_int(const int64_t strides[3]) {
  for (int d = 0; d < 3; ++d)
    if (strides[d] < 0 || strides[d] > INT_MAX) return false;
  return true;
}

// Why the sm_90a kernels cannot take this call (null when they can), with the current device's
// facts in *facts for the launch that follows.
const char* reason_on_device(DType dtype, const AttentionParams& p, DeviceFacts* facts) {
  if (!attention_forward_sm90_built()) return "the extension was not compiled for sm_90a";
  if (device_facts(facts) != cudaSuccess) return "the device could not be queried";
  if (!facts->hopper) return "the device is not compute capability 9.0";
  if (dtype != DType::F16 && dtype != DType::BF16) return "the dtype is not float16 or bfloat16";
  if (p.D != 64 && p.D != 128) return "the head dim is not 64 or 128";
  if (p.key_bias != nullptr || p.key_end != nullptr) return "a key-padding mask (no per-batch mask in the fusion hook)";
  if (p.Hq != p.Hkv) return "grouped-query attention";
  if (p.B <= 0 || p.Hq <= 0) return "no batch or no head (an empty grid)";
  if (p.Lq <= 0 || p.Lk <= 0 || p.Lq % 8 != 0) return "the query length is not a positive multiple of 8";
  if (!p.aligned) return "rows that are not 16-byte aligned (TMA)";
  if (p.B > 65535 || p.Hq > 65535) return "more than 65535 batches or heads (grid limit)";
  if (!fits_int(p.q_strides) || !fits_int(p.k_strides) || !fits_int(p.v_strides) || !fits_int(p.out_strides) ||
      static_cast<int64_t>(p.Hq) * p.Lq > INT_MAX)
    return "strides beyond 32 bits";
  return nullptr;
}

// The backward's scope is the forward's; on top of that, dout's strides and the contiguous
// gradients' and workspace's (elements per batch and head) must fit the collective's ints.
const char* backward_reason_on_device(DType dtype, const AttentionBackwardParams& bp, DeviceFacts* facts) {
  const char* reason = reason_on_device(dtype, bp.fwd, facts);
  if (reason != nullptr) return reason;
  const AttentionParams& p = bp.fwd;
  if (!fits_int(bp.dout_strides) || int64_t(p.Hq) * p.Lq * p.D > INT_MAX || int64_t(p.Hkv) * p.Lk * p.D > INT_MAX)
    return "strides beyond 32 bits";
  // TMA reads lse (and delta, which the caller allocates) as 16-byte aligned rows of fp32;
  // Lq % 8 == 0 keeps every row so once the start is.
  if (reinterpret_cast<uintptr_t>(p.lse) % 16 != 0) return "lse is not 16-byte aligned (TMA)";
  return nullptr;
}

}  // namespace

bool attention_forward_sm90_built() {
#if defined(FUSEFORMER_SM90A)
  return true;
#else
  return false;
#endif
}

const char* attention_forward_sm90_reason(DType dtype, const AttentionParams& p) {
  DeviceFacts facts;
  return reason_on_device(dtype, p, &facts);
}

cudaError_t attention_forward_sm90(DType dtype, const AttentionParams& p, cudaStream_t stream) {
  DeviceFacts facts;
  if (reason_on_device(dtype, p, &facts) != nullptr) {
    return attention_forward_cute_supports_head_dim(p.D) ? attention_forward_cute(dtype, p, stream)
                                                          : attention_forward(dtype, p, stream);
  }
#if defined(FUSEFORMER_SM90A)
  const bool half = dtype == DType::F16;
  auto forward = p.D == 64 ? (half ? sm90::forward_f16_d64 : sm90::forward_bf16_d64)
                           : (half ? sm90::forward_f16_d128 : sm90::forward_bf16_d128);
  const cudaError_t err = forward(p, facts.index, facts.sm_count, stream);
  // NotSupported: the collectives' own can_implement refused the call before launching anything
  // (the reason above should have caught it); the CuTe forward still answers it.
  return err == cudaErrorNotSupported ? attention_forward_cute(dtype, p, stream) : err;
#else
  return cudaErrorNotSupported;  // unreachable: the reason above says "not compiled for sm_90a"
#endif
}

const char* attention_backward_sm90_reason(DType dtype, const AttentionBackwardParams& bp) {
  DeviceFacts facts;
  return backward_reason_on_device(dtype, bp, &facts);
}

// delta and the zeroed fp32 dq buffer (attention_backward_rows.cu's preprocess, as the CuTe
// backward), the sm_90a kernel, then dq in the input dtype (its convert, with a scale of 1: the
// collective's dS already holds the softmax scale).
cudaError_t attention_backward_sm90(DType dtype, const AttentionBackwardParams& bp, cudaStream_t stream) {
  DeviceFacts facts;
  if (backward_reason_on_device(dtype, bp, &facts) != nullptr) return attention_backward_cute(dtype, bp, stream);
#if defined(FUSEFORMER_SM90A)
  cudaError_t err = attention_backward_preprocess(dtype, bp, stream);
  if (err != cudaSuccess) return err;
  const AttentionParams& p = bp.fwd;
  const bool half = dtype == DType::F16;
  auto backward = p.D == 64 ? (half ? sm90::backward_f16_d64 : sm90::backward_bf16_d64)
                            : (half ? sm90::backward_f16_d128 : sm90::backward_bf16_d128);
  err = backward(bp, facts.index, facts.sm_count, stream);
  // As the forward: refused before any launch, so the CuTe backward starts over (its preprocess
  // writes delta and zeroes the dq buffer again).
  if (err == cudaErrorNotSupported) return attention_backward_cute(dtype, bp, stream);
  if (err != cudaSuccess) return err;
  return attention_backward_convert_dq(dtype, bp, 1.0f, stream);
#else
  return cudaErrorNotSupported;  // unreachable: the reason above says "not compiled for sm_90a"
#endif
}

}  // namespace fuseformer
