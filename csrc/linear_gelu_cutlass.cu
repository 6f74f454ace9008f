// Linear + bias + GELU on CUTLASS: y = gelu(x W^T + b), the bias add and the GELU (erf or
// tanh) applied to the fp32 accumulators in the GEMM's epilogue, with the pre-activation
// x W^T + b stored from the same registers when autograd needs it. Two kernels, picked at run
// time by the device's compute capability:
//
//   sm80  CUTLASS 2.x GemmUniversalWithBroadcast: mma.sync tensor cores, cp.async multistage
//         mainloop, EpilogueWithBroadcast (per-column bias vector; Z = gelu(T) always stored,
//         T = the pre-activation stored only by the StoreT instantiation). Ampere and newer.
//   sm90  CUTLASS 3.x from the collective builders: TMA loads, a warp-specialized cooperative
//         persistent kernel (a producer warp feeds two wgmma warpgroups), and an epilogue
//         visitor tree LinCombPerColBiasEltActAux: acc + bias (a row broadcast), an aux TMA
//         store of that sum, then the GELU. The aux store is a no-op on a null pointer, so one
//         instantiation covers training and inference. Compute capability 9.0 only.
//
// Operand layouts: x (M, K) row-major is A, K-major; W (N, K) row-major is B (K x N) column-major,
// also K-major (the "TN" GEMM both tensor-core generations like best); out (M, N) row-major.
//
// Files: this one holds the sm80 kernels and the dispatch; the sm90 kernels are in
// linear_gelu_cutlass_sm90_{bf16,f16}.cu (one translation unit per dtype, compiled in parallel),
// on linear_gelu_cutlass_sm90.cuh; the GELU functors in linear_gelu_cutlass.cuh.
//
// Build: the sm90 kernels need an sm_90a gencode (wgmma and setmaxnreg are arch-conditional).
// Compiled for sm_80 (or plain sm_90) their device bodies are CUTLASS's stub, so every file still
// compiles for every architecture; the host code dispatches on the capability and on whether the
// loaded image is sm_90a's, and never launches the stub. -DFUSEFORMER_GEMM_NO_SM90 (given to
// every file) drops the sm90 instantiations altogether (faster builds for Ampere-only targets).
#include "linear_gelu_cutlass.cuh"

#include <cutlass/epilogue/thread/linear_combination_bias_elementwise.h>
#include <cutlass/gemm/device/gemm_universal_with_broadcast.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/kernel_hardware_info.h>

#include <climits>
#include <cstdint>

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED) && !defined(FUSEFORMER_GEMM_NO_SM90)
#define FUSEFORMER_GEMM_SM90 1
#endif

namespace fuseformer {
namespace cutlass_gelu {

// ---------------------------------------------------------------------------------- sm80 (2.x)

namespace sm80 {

// 128 x 128 x 32 threadblock tile, four 64 x 64 warps, 4 stages: 64 KB of shared memory, so it
// launches on every sm_8x (sm_86/89 allow 99 KB per block) and fits two blocks per SM on A100 and
// H100 (228-236 registers per thread). Not tuned on a GPU. Also spill-free here (nvcc 13.0, sm_80
// and sm_90a), to try on one: 128 x 128 x 64 with 3 stages (96 KB, 250-254 registers) and
// CUTLASS's own sm80 default, 128 x 256 x 64 with eight warps and 3 stages (144 KB: not on sm_86/89).
using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 4;

// Z (the output) = Act(T), T = acc + bias; T is written to ptr_Tensor only when StoreT.
template <class Element, template <class> class Act, bool StoreT>
using EpilogueOp = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    Element,                // C (never read: beta = 0)
    float,                  // accumulator
    float,                  // compute
    Element,                // Z, the activated output
    Element,                // T, the pre-activation
    kAlignment,
    Act<float>,
    cutlass::plus<float>,   // T = acc + bias
    StoreT,
    Element>;               // the bias vector

template <class Element, template <class> class Act, bool StoreT>
using Gemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
    Element, cutlass::layout::RowMajor,     // x
    Element, cutlass::layout::ColumnMajor,  // W^T (W row-major)
    Element, cutlass::layout::RowMajor,     // out
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    ThreadblockShape, WarpShape, InstructionShape,
    EpilogueOp<Element, Act, StoreT>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>,
    kStages, kAlignment, kAlignment>;

template <class Element, template <class> class Act, bool StoreT>
cudaError_t run(const LinearGeluCutlassParams& p, cudaStream_t stream) {
  using G = Gemm<Element, Act, StoreT>;
  const int M = int(p.M), N = int(p.N), K = int(p.K);
  typename G::Arguments args(
      cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, /*batch_count=*/1,
      typename G::EpilogueOutputOp::Params(1.f, 0.f),
      p.x, p.weight,
      /*ptr_C=*/nullptr, p.out,
      const_cast<void*>(p.bias),  // the broadcast vector; null reads as zeros
      p.preact,                   // T
      /*batch strides A, B, C, D, Vector, Tensor=*/0, 0, 0, 0, 0, 0,
      /*lda=*/K, /*ldb=*/K, /*ldc=*/N, /*ldd=*/N, /*ldr (vector)=*/0, /*ldt=*/N);
  return run_gemm<G>(args, stream);
}

template <class Element, template <class> class Act>
cudaError_t dispatch_store(const LinearGeluCutlassParams& p, cudaStream_t stream) {
  return p.preact != nullptr ? run<Element, Act, true>(p, stream) : run<Element, Act, false>(p, stream);
}

}  // namespace sm80

}  // namespace cutlass_gelu

namespace {

using namespace cutlass_gelu;

int multiprocessors(int device) {
  // Cached per device: the persistent scheduler sizes its grid by it on every call.
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cached[device] == 0) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

int capability(int device) {
  // major * 10 + minor, cached per device (0: not yet asked; -1: the query failed).
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] != 0) return cached[device];
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // clear it, so that the next launch does not report it
    return -1;
  }
  const int cc = major * 10 + minor;
  if (device >= 0 && device < 64) cached[device] = cc;
  return cc;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

#if defined(FUSEFORMER_GEMM_SM90)
// 1 in an image compiled for sm_90a, 0 in any other. Compiled for plain sm_90 (a build that
// forgot the "a"), the sm90 kernels are CUTLASS's stub, which prints an error and returns
// without writing the output: this flag keeps such a build on the sm80 path instead.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ int g_sm90a_image = 1;
#else
__device__ int g_sm90a_image = 0;
#endif

bool sm90a_image(int device) {
  // Read once per device, at the first call (the Python loader makes that call when it loads
  // the module, never inside a CUDA graph capture): a 4-byte synchronous copy. A failed read
  // is not cached.
  static int cached[64] = {};  // 0: not yet read, 1: yes, 2: no
  if (device >= 0 && device < 64 && cached[device] != 0) return cached[device] == 1;
  int flag = 0;
  if (cudaMemcpyFromSymbol(&flag, g_sm90a_image, sizeof(flag)) != cudaSuccess) {
    cudaGetLastError();  // clear it, so that the next launch does not report it
    return false;
  }
  if (device >= 0 && device < 64) cached[device] = flag == 1 ? 1 : 2;
  return flag == 1;
}
#endif  // FUSEFORMER_GEMM_SM90

template <template <class> class Act>
cudaError_t run_sm80(DType dtype, const LinearGeluCutlassParams& p, cudaStream_t stream) {
  if (dtype == DType::BF16) return sm80::dispatch_store<cutlass::bfloat16_t, Act>(p, stream);
  if (dtype == DType::F16) return sm80::dispatch_store<cutlass::half_t, Act>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

const char* linear_gelu_cutlass_unsupported(DType dtype, const LinearGeluCutlassParams& p) {
  if (dtype != DType::F16 && dtype != DType::BF16) return "the CUTLASS Linear+GELU takes float16 and bfloat16 only";
  if (p.M < 0 || p.N <= 0 || p.K <= 0) return "the CUTLASS Linear+GELU needs N > 0, K > 0 and M >= 0";
  if (p.K % kAlignment != 0 || p.N % kAlignment != 0)
    return "the CUTLASS Linear+GELU needs in_features (K) and out_features (N) to be multiples of 8 (16-byte rows)";
  if (p.M > INT_MAX || p.N > INT_MAX || p.K > INT_MAX) return "the CUTLASS Linear+GELU takes sizes below 2^31";
  if (!aligned16(p.x) || !aligned16(p.weight) || !aligned16(p.bias) || !aligned16(p.out) || !aligned16(p.preact))
    return "the CUTLASS Linear+GELU needs every pointer 16-byte aligned";
  // torch hands out null data pointers for empty tensors: x and out may be null when M == 0.
  if (p.weight == nullptr || (p.M > 0 && (p.x == nullptr || p.out == nullptr))) return "x, weight and out must not be null";
  return nullptr;
}

GemmPath linear_gelu_cutlass_auto_path(int device) {
  const int cc = capability(device);
  if (cc < 80) return GemmPath::kAuto;
#if defined(FUSEFORMER_GEMM_SM90)
  if (cc == 90 && sm90a_image(device)) return GemmPath::kSm90;
#endif
  return GemmPath::kSm80;
}

bool linear_gelu_cutlass_has_sm90() {
#if defined(FUSEFORMER_GEMM_SM90)
  return true;
#else
  return false;
#endif
}

cudaError_t linear_gelu_cutlass(DType dtype, const LinearGeluCutlassParams& p, GemmPath path, cudaStream_t stream) {
  // Every check that needs no device comes first: bad arguments never reach the runtime.
  if (linear_gelu_cutlass_unsupported(dtype, p) != nullptr) return cudaErrorInvalidValue;
  if (path != GemmPath::kAuto && path != GemmPath::kSm80 && path != GemmPath::kSm90) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int cc = capability(device);
  if (cc < 0) return cudaErrorNoDevice;
  if (cc < 80) return cudaErrorInvalidDeviceFunction;  // cp.async and bf16 mma need sm_80
  if (path == GemmPath::kAuto) path = linear_gelu_cutlass_auto_path(device);
  // sm_90a code runs on 9.0 only, and only when this build has it.
  if (path == GemmPath::kSm90 && linear_gelu_cutlass_auto_path(device) != GemmPath::kSm90) return cudaErrorInvalidDeviceFunction;
  if (path == GemmPath::kSm90) {
    const int sms = multiprocessors(device);
    return dtype == DType::BF16 ? run_sm90_bf16(p, p.approximate_tanh, device, sms, stream)
                                : run_sm90_f16(p, p.approximate_tanh, device, sms, stream);
  }
  return p.approximate_tanh ? run_sm80<GeluTanh>(dtype, p, stream) : run_sm80<GeluErf>(dtype, p, stream);
}

}  // namespace fuseformer
