// Host entry points of the pure-CUDA kernels. Plain C++ over void pointers and a dtype tag, so
// the torch-side bindings include this without the CUDA half/bfloat16 headers and the .cu
// files compile with nvcc alone. Every function validates nothing: bindings.cpp checks the
// arguments first. Each returns the launch's cudaError_t (cudaSuccess when all went well).
#pragma once

#include <cuda_runtime_api.h>

#include <stdint.h>

namespace fuseformer {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

// ---- add + LayerNorm (csrc/add_layer_norm.cu) ----------------------------------------------
// The widest hidden size the register-resident row kernels take.
constexpr int kLayerNormMaxHidden = 8192;

// stream = x + residual; y = (stream - mean) * rstd * weight + bias, row by row over (M, N).
// residual, weight, bias, stream_out may be null. mean/rstd are fp32 (M), both null when no
// backward needs them. `aligned` says that every pointer is 16-byte aligned and
// N * sizeof(dtype) is a multiple of 16.
cudaError_t add_layer_norm_forward(DType dtype, const void* x, const void* residual, const void* weight,
                                   const void* bias, void* y, void* stream_out, float* mean, float* rstd,
                                   int64_t M, int N, float eps, bool aligned, cudaStream_t stream);

// Gradient of the LayerNorm input h (the saved stream, `stream_in`) given dy, plus dstream
// (the gradient reaching the returned stream under prenorm; may be null). dh is written in
// the input dtype, and again to dh_copy when that is not null (dx and dresidual must not
// alias). Per-block partial sums of dy * xhat and dy go to dweight_partial /
// dbias_partial (fp32, (add_layer_norm_partial_rows(...), N), 16-byte aligned when `aligned`),
// or are skipped when those are null; the caller sums them over rows.
cudaError_t add_layer_norm_backward(DType dtype, const void* dy, const void* dstream, const void* stream_in,
                                    const void* weight, const float* mean, const float* rstd, void* dh,
                                    void* dh_copy, float* dweight_partial, float* dbias_partial, int64_t M, int N,
                                    bool aligned, int max_blocks, cudaStream_t stream);

// Blocks of add_layer_norm_backward's kernel for these arguments that fit on one SM at once (by
// the CUDA occupancy calculator, at most 8, at least 1): max_blocks is that times the SMs.
int add_layer_norm_backward_blocks_per_sm(DType dtype, int N, bool aligned);

// Rows of the partial-sum buffers add_layer_norm_backward writes for these arguments (0 when M is 0).
int64_t add_layer_norm_partial_rows(DType dtype, int64_t M, int N, bool aligned, int max_blocks);

// dweight / dbias (dtype, (N,)) = column sums of the (rows, N) fp32 partial buffers that
// add_layer_norm_backward wrote (zeros when rows is 0); a null output is skipped.
cudaError_t add_layer_norm_sum_partials(DType dtype, const float* dweight_partial, const float* dbias_partial,
                                        void* dweight, void* dbias, int64_t rows, int N, cudaStream_t stream);

// ---- GELU elementwise (csrc/gelu.cu) ---------------------------------------------------------
// out = gelu(pre); approximate_tanh picks GPT-2's tanh form over the erf form.
cudaError_t gelu_forward(DType dtype, const void* pre, void* out, int64_t n, bool approximate_tanh,
                         cudaStream_t stream);
// dpre = dout * gelu'(pre).
cudaError_t gelu_backward(DType dtype, const void* dout, const void* pre, void* dpre, int64_t n,
                          bool approximate_tanh, cudaStream_t stream);

// ---- attention forward (csrc/attention_forward.cu) -------------------------------------------
struct AttentionParams {
  const void* q;  // (B, Hq, Lq, D), last dim contiguous
  const void* k;  // (B, Hkv, Lk, D)
  const void* v;
  void* out;      // (B, Hq, Lq, D), last dim contiguous
  float* lse;     // (B, Hq, Lq) natural-log logsumexp of the scaled scores; +inf on a fully masked row
  // Additive fp32 bias per (batch, key), the key-padding fast path (0 attend, -inf masked), or null.
  const float* key_bias;
  int64_t key_bias_batch_stride;
  // Per batch, one past the last key that is not masked (int32, (B,)), or null. Key tiles at or
  // past it are skipped: with BERT-style right padding that work is never done.
  const int* key_end;
  int64_t q_strides[3];  // batch, head, row (elements)
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t out_strides[3];
  int B, Hq, Hkv, Lq, Lk, D;
  float scale;
  bool causal;   // key j attends query i only when j <= i (top-left aligned, as torch)
  bool aligned;  // all row starts 16-byte aligned: the tile loads use 16-byte vectors
};

bool attention_forward_supports_head_dim(int head_dim);
cudaError_t attention_forward(DType dtype, const AttentionParams& params, cudaStream_t stream);

// ---- attention forward on CuTe (csrc/attention_cute.cu; needs the CUTLASS headers) ---------
// The same contract as attention_forward, head dims 64 and 128 only; rows that are not 16-byte
// aligned (params.aligned false) are handed to attention_forward.
bool attention_forward_cute_supports_head_dim(int head_dim);
cudaError_t attention_forward_cute(DType dtype, const AttentionParams& params, cudaStream_t stream);

// ---- attention forward for Hopper (csrc/attention_sm90*.cu; CUTLASS's Hopper FMHA collectives) -
// The same contract again. Runs the sm_90a kernels when the extension was compiled for sm_90a
// (FUSEFORMER_SM90A), the device is compute capability 9.0 and the call fits them
// (attention_forward_sm90_reason returns null); otherwise hands the call to the CuTe forward
// (head dims 64, 128) or the WMMA one.
bool attention_forward_sm90_built();
const char* attention_forward_sm90_reason(DType dtype, const AttentionParams& params);
cudaError_t attention_forward_sm90(DType dtype, const AttentionParams& params, cudaStream_t stream);

// ---- attention backward (csrc/attention_backward.cu) -----------------------------------------
struct AttentionBackwardParams {
  // q, k, v, masks, sizes, scale and causal as in the forward; `lse` is the forward's output
  // (read here); `out` is read by attention_backward_cute only; `aligned` also covers dout.
  AttentionParams fwd;
  const void* dout;  // (B, Hq, Lq, D), last dim contiguous
  int64_t dout_strides[3];
  // (B, Hq, Lq) contiguous: rowsum(dout * out) in fp32. attention_backward reads it (the caller
  // computed it); attention_backward_cute computes it here from fwd.out and dout.
  float* delta;
  void* dq;            // (B, Hq, Lq, D) contiguous
  void* dk;            // (B, Hkv, Lk, D) contiguous; summed over the query heads of a group
  void* dv;
  // attention_backward_cute only: an fp32 (B, Hq, Lq, D) contiguous workspace, dq before the
  // softmax scale and the rounding (zeroed and filled by the kernels). Unused by attention_backward.
  float* dq_accum;
};

cudaError_t attention_backward(DType dtype, const AttentionBackwardParams& params, cudaStream_t stream);

// ---- attention backward on CuTe (csrc/attention_cute_backward.cu; needs the CUTLASS headers) -
// The same outputs as attention_backward, head dims 64 and 128 only. Reads fwd.out (the
// forward's output, strides fwd.out_strides) and writes delta and dq_accum, which the caller
// allocates. Rows that are not 16-byte aligned (fwd.aligned false) are handed to
// attention_backward after delta is computed.
bool attention_backward_cute_supports_head_dim(int head_dim);
cudaError_t attention_backward_cute(DType dtype, const AttentionBackwardParams& params, cudaStream_t stream);
// ---- the row-wise kernels around the CuTe and Hopper backwards (csrc/attention_backward_rows.cu) -
// fp16/bf16 only. Before them: delta = rowsum(dO * O) in fp32 into params.delta (fwd.out read
// through fwd.out_strides), with params.dq_accum ((B, Hq, Lq, D) contiguous fp32) zeroed when
// not null. After them: dq = scale * dq_accum in the input dtype.
cudaError_t attention_backward_preprocess(DType dtype, const AttentionBackwardParams& params, cudaStream_t stream);
cudaError_t attention_backward_convert_dq(DType dtype, const AttentionBackwardParams& params, float scale,
                                          cudaStream_t stream);

// ---- attention backward for Hopper (csrc/attention_sm90_backward.cuh, attention_sm90*.cu) ----
// The same contract as attention_backward_cute (reads fwd.out, writes delta and dq_accum).
// Runs the sm_90a kernels where the sm_90a forward would (attention_backward_sm90_reason
// returns null: the same scope, dout included in `aligned`); hands every other call to
// attention_backward_cute.
const char* attention_backward_sm90_reason(DType dtype, const AttentionBackwardParams& params);
cudaError_t attention_backward_sm90(DType dtype, const AttentionBackwardParams& params, cudaStream_t stream);

}  // namespace fuseformer
