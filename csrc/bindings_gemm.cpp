// The Python module of the CUTLASS GEMMs (fuseformer._C_gemm ahead of time, or JIT-built as
// fuseformer_cuda_gemm by kernels/cuda_backend.py only when FUSEFORMER_CUDA_LINEAR_GELU=cutlass
// selects it). A module of its own because the CUTLASS 3 sm_90a instantiations take minutes to
// compile: the main cuda backend (bindings.cpp) builds without them.
//
// Every argument is checked here with a one-line macro raising a Python exception (TypeError
// for dtypes, ValueError for shapes, alignment and paths, RuntimeError for a failed launch)
// before a pointer reaches linear_gelu_cutlass.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "linear_gelu_cutlass.h"

#define CHECK_ALIGNED16(x) FF_CHECK_VALUE(reinterpret_cast<std::uintptr_t>((x).data_ptr()) % 16 == 0, #x "'s data must start 16-byte aligned for the CUTLASS kernels (a sliced view? call .clone())")
#define CHECK_LAUNCH(expr) do { const cudaError_t err_ = (expr); FF_CHECK(err_ == cudaSuccess, "fuseformer CUTLASS GEMM failed: ", cudaGetErrorString(err_)); } while (0)

namespace fuseformer {
namespace {

bool g_poison = false;  // as in bindings.cpp: outputs start as NaN in the tests

at::Tensor new_output(at::Tensor t) {
  if (g_poison) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

const char* path_name(GemmPath path) {
  switch (path) {
    case GemmPath::kSm80: return "sm80";
    case GemmPath::kSm90: return "sm90";
    default: return "none";
  }
}

GemmPath parse_path(const std::string& path) {
  if (path == "auto") return GemmPath::kAuto;
  if (path == "sm80") return GemmPath::kSm80;
  if (path == "sm90") return GemmPath::kSm90;
  FF_CHECK_VALUE(false, "path must be 'auto', 'sm80' or 'sm90', got '", path, "'");
  return GemmPath::kAuto;
}

std::string capability_string(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "unknown";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

std::vector<std::string> device_paths(int device) {
  const GemmPath best = linear_gelu_cutlass_auto_path(device);
  if (best == GemmPath::kAuto) return {};
  if (best == GemmPath::kSm90) return {"sm80", "sm90"};
  return {"sm80"};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> py_linear_gelu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::string& approximate, bool save_preact, const std::string& path_arg) {
  FF_CHECK_VALUE(approximate == "none" || approximate == "tanh",
                 "approximate must be 'none' or 'tanh', got '", approximate, "'");
  const GemmPath path = parse_path(path_arg);
  CHECK_CUDA(x);
  CHECK_DIM(x, 2);
  CHECK_CONTIGUOUS(x);
  FF_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "x must be float16 or bfloat16 for the CUTLASS kernels, got ", x.scalar_type());
  CHECK_LIKE(weight, x);
  CHECK_DIM(weight, 2);
  CHECK_CONTIGUOUS(weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  FF_CHECK_VALUE(weight.size(1) == K, "weight must have shape (out_features, ", K, "), got ", weight.sizes());
  FF_CHECK_VALUE(K > 0 && K % 8 == 0, "in_features (K) must be a positive multiple of 8 for the CUTLASS kernels, got ", K);
  FF_CHECK_VALUE(N > 0 && N % 8 == 0, "out_features (N) must be a positive multiple of 8 for the CUTLASS kernels, got ", N);
  FF_CHECK_VALUE(M <= std::numeric_limits<int>::max(), "too many rows for the CUTLASS kernels: ", M);
  CHECK_ALIGNED16(x);
  CHECK_ALIGNED16(weight);
  if (bias.has_value()) {
    CHECK_LIKE(*bias, x);
    CHECK_CONTIGUOUS(*bias);
    FF_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, "), got ", bias->sizes());
    CHECK_ALIGNED16(*bias);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  if (path != GemmPath::kAuto) {
    const std::vector<std::string> runnable = device_paths(x.get_device());
    bool found = false;
    for (const auto& p : runnable) found = found || p == path_arg;
    FF_CHECK_VALUE(found, "path '", path_arg, "' cannot run on this device (compute capability ",
                   capability_string(x.get_device()), "; 'sm80' needs 8.0 or newer, 'sm90' exactly 9.0",
                   linear_gelu_cutlass_has_sm90() ? "" : " and a build with the sm_90 kernels", ")");
  }

  at::Tensor out = new_output(at::empty({M, N}, x.options()));
  std::optional<at::Tensor> preact;
  if (save_preact) preact = new_output(at::empty({M, N}, x.options()));
  LinearGeluCutlassParams params{};
  params.x = x.data_ptr();
  params.weight = weight.data_ptr();
  params.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.preact = preact.has_value() ? preact->data_ptr() : nullptr;
  params.M = M;
  params.N = N;
  params.K = K;
  params.approximate_tanh = approximate == "tanh";
  const DType dtype = x.scalar_type() == at::kHalf ? DType::F16 : DType::BF16;
  // The checks above cover every refusal; this one is a backstop with the kernel's own words.
  const char* refused = linear_gelu_cutlass_unsupported(dtype, params);
  FF_CHECK_VALUE(refused == nullptr, refused == nullptr ? "" : refused);
  CHECK_LAUNCH(linear_gelu_cutlass(dtype, params, path, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, preact};
}

}  // namespace
}  // namespace fuseformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fuseformer's CUTLASS GEMMs with fused epilogues (csrc/linear_gelu_cutlass.cu)";
  m.def("linear_gelu_forward", &fuseformer::py_linear_gelu_forward,
        "out, preact of gelu(x @ weight^T + bias) in one CUTLASS GEMM (preact only when save_preact)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("approximate"),
        pybind11::arg("save_preact"), pybind11::arg("path") = "auto");
  // Both read the device's capability and, on 9.0, whether the module holds sm_90a code, and
  // cache the answers: kernels/cuda_backend.py calls paths() when it loads the module, so that
  // no forward (or CUDA graph capture) is the first to ask.
  m.def("paths", [](int device) {
          const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
          return fuseformer::device_paths(device);
        },
        "the CUTLASS paths this device can run ('sm80', and 'sm90' on compute capability 9.0)", pybind11::arg("device"));
  m.def("auto_path", [](int device) {
          const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
          return std::string(fuseformer::path_name(fuseformer::linear_gelu_cutlass_auto_path(device)));
        },
        "the path 'auto' takes on this device", pybind11::arg("device"));
  m.def("has_sm90", &fuseformer::linear_gelu_cutlass_has_sm90, "whether this build holds the sm_90 kernels");
  m.def("set_poison", [](bool on) { fuseformer::g_poison = on; }, "fill outputs with NaN before each launch (tests)");
}
