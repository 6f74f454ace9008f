// Linear + bias + tanh-GELU as one cuBLASLt GEMM with its GELU epilogue (torch side: it takes
// torch's cuBLASLt handle, so it needs torch's CUDA headers and cublasLt.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fuseformer {

// Writes out = gelu_tanh(x @ weight^T + bias), and preact = x @ weight^T + bias when preact is
// not null (the epilogue's aux output, which the backward needs). x (M, K), weight (N, K),
// bias (N), out and preact (M, N), all contiguous, one dtype. Returns false, having written
// nothing, when the case is not one cuBLASLt takes (alignment, sizes, no algorithm found): the
// caller then runs the unfused path. cuBLASLt's epilogue is the tanh approximation, never
// the erf form.
bool cublaslt_linear_gelu_tanh(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::Tensor& out, at::Tensor* preact);

}  // namespace fuseformer
