// cuBLASLt GEMM + bias + GELU epilogue (see cublaslt_gelu.h).
//
// cuBLASLt is column-major. Row-major x (M, K) is column-major x^T (K, M), and row-major
// weight (N, K) is column-major weight^T (K, N), so the row-major out (M, N) = x weight^T is
// the column-major out^T (N, M) = op_T(weight^T) * x^T: A = weight with TRANSA = T, B = x with
// TRANSB = N, C = D = out with ld N. The epilogue's bias is per row of D, i.e. per output
// feature, as wanted.
#include "cublaslt_gelu.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <cstdint>

namespace fuseformer {
namespace {

constexpr size_t kWorkspaceBytes = size_t{4} << 20;

cudaDataType_t lt_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// Owns the descriptors so that every early return releases them.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace

#define FUSEFORMER_LT_TRY(expr) \
  do {                          \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return false; \
  } while (0)

bool cublaslt_linear_gelu_tanh(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::Tensor& out, at::Tensor* preact) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  // The aux (pre-activation) leading dimension must be a multiple of 8 and every pointer
  // 16-byte aligned; anything else goes the unfused way rather than risking a slow or
  // rejected algorithm.
  if (M == 0 || N == 0 || K == 0 || N % 8 != 0 || K % 8 != 0 || !aligned16(x.data_ptr()) || !aligned16(weight.data_ptr())) return false;
  if (bias.has_value() && !aligned16(bias->data_ptr())) return false;
  if (!aligned16(out.data_ptr()) || (preact != nullptr && !aligned16(preact->data_ptr()))) return false;
  const bool save_preact = preact != nullptr;
  const cudaDataType_t type = lt_type(x.scalar_type());

  LtDescriptors d;
  // fp32 accumulation for every dtype; for fp32 inputs this is true fp32 (no TF32), the same
  // arithmetic as torch's default fp32 matmul.
  FUSEFORMER_LT_TRY(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)));
  FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)));

  cublasLtEpilogue_t epilogue;
  if (bias.has_value()) {
    epilogue = save_preact ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS;
    const void* bias_ptr = bias->data_ptr();
    FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)));
  } else {
    epilogue = save_preact ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU;
  }
  FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (save_preact) {
    void* aux_ptr = preact->data_ptr();
    const int64_t aux_ld = N;
    FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux_ptr, sizeof(aux_ptr)));
    FUSEFORMER_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  }

  FUSEFORMER_LT_TRY(cublasLtMatrixLayoutCreate(&d.a, type, K, N, K));  // weight^T, column-major
  FUSEFORMER_LT_TRY(cublasLtMatrixLayoutCreate(&d.b, type, K, M, K));  // x^T
  FUSEFORMER_LT_TRY(cublasLtMatrixLayoutCreate(&d.c, type, N, M, N));  // out^T

  const uint64_t workspace_bytes = kWorkspaceBytes;
  FUSEFORMER_LT_TRY(cublasLtMatmulPreferenceCreate(&d.pref));
  FUSEFORMER_LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_bytes, sizeof(workspace_bytes)));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  FUSEFORMER_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found));
  if (found == 0) return false;

  // From torch's caching allocator, on the current stream, so it is reused across calls.
  at::Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.f, beta = 0.f;
  FUSEFORMER_LT_TRY(cublasLtMatmul(handle, d.op, &alpha, weight.data_ptr(), d.a, x.data_ptr(), d.b, &beta,
                                   out.data_ptr(), d.c, out.data_ptr(), d.c, &heuristic.algo, workspace.data_ptr(),
                                   kWorkspaceBytes, c10::cuda::getCurrentCUDAStream()));
  return true;
}

#undef FUSEFORMER_LT_TRY

}  // namespace fuseformer
