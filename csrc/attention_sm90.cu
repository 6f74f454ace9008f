// The Hopper attention forward's entry point (FUSEFORMER_CUDA_ATTENTION=sm90): checks that the
// call fits the sm_90a kernels of attention_sm90.cuh and launches the instantiation for its
// dtype and head dim; any other call goes to the CuTe forward (head dims 64, 128) or the WMMA
// one, so choosing sm90 never refuses a call the cuda backend takes. The kernels write what
// the other forwards write (out, natural-log lse), so the backward is shared.
#include <climits>

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
  if (p.Lq <= 0 || p.Lk <= 0 || p.Lq % 8 != 0) return "the query length is not a positive multiple of 8";
  if (!p.aligned) return "rows that are not 16-byte aligned (TMA)";
  if (p.B > 65535 || p.Hq > 65535) return "more than 65535 batches or heads (grid limit)";
  if (!fits_int(p.q_strides) || !fits_int(p.k_strides) || !fits_int(p.v_strides) || !fits_int(p.out_strides) ||
      static_cast<int64_t>(p.Hq) * p.Lq > INT_MAX)
    return "strides beyond 32 bits";
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
  return forward(p, facts.index, facts.sm_count, stream);
#else
  return cudaErrorNotSupported;  // unreachable: the reason above says "not compiled for sm_90a"
#endif
}

}  // namespace fuseformer
