// Checks csrc/attention_backward_rows.cu's entry points (attention_backward_preprocess,
// attention_backward_convert_dq), run on the CPU stand-in for CUDA (cuda_runtime.h here),
// against a float64 reference: fp16 and bf16; head dims that give every threads-a-row config of
// the 16-byte path (8 -> 4 threads, 40 and 64 -> 8, 128 -> 16, 256 -> 32) and the warp-a-row
// element path (36: not whole vectors; 264: more vectors than a warp's lanes); out as the
// forwards return it ((B, L, H, D) memory seen as (B, H, L, D)) or contiguous, or one element
// off 16-byte alignment; rows past the last block's end; the dq buffer zeroed or left alone
// (null); dq converted with a scale, vector and element kernels, a tail of n % 8, nothing
// written past the end. Prints "OK: ..." or "FAILED: ..." last; exit status 1 on a failure.
#include <type_traits>

#include "driver_util.h"

using namespace fuseformer;

template <typename T>
void run_preprocess(int B, int H, int L, int D, const char* layout, bool with_accum) {
  const std::string ctx = std::string(std::is_same_v<T, __half> ? "f16" : "bf16") + " B=" + std::to_string(B) +
                          " H=" + std::to_string(H) + " L=" + std::to_string(L) + " D=" + std::to_string(D) + " " +
                          layout + (with_accum ? " accum" : "");
  const int64_t rows = int64_t(B) * H * L, n = rows * D;
  const bool offset = std::string(layout) == "offset";
  T* out_base = random_tensor<T>(n + 8, 1.f, 0.f);
  T* dout_base = random_tensor<T>(n + 8, 1.f, 0.f);
  T* out = out_base + (offset ? 1 : 0);
  T* dout = dout_base + (offset ? 1 : 0);
  AttentionBackwardParams bp{};
  AttentionParams& p = bp.fwd;
  p.B = B, p.Hq = p.Hkv = H, p.Lq = p.Lk = L, p.D = D;
  p.out = out;
  bp.dout = dout;
  // dout contiguous (B, H, L, D); out either the same or (B, L, H, D) memory seen as (B, H, L, D).
  const int64_t contiguous[3] = {int64_t(H) * L * D, int64_t(L) * D, D};
  const int64_t heads_inner[3] = {int64_t(L) * H * D, D, int64_t(H) * D};
  const int64_t* out_strides = std::string(layout) == "bhld" ? contiguous : heads_inner;
  for (int d = 0; d < 3; ++d) p.out_strides[d] = out_strides[d], bp.dout_strides[d] = contiguous[d];
  bp.delta = alloc<float>(rows + 4);
  for (int i = 0; i < 4; ++i) bp.delta[rows + i] = 12345.f;
  bp.dq_accum = with_accum ? alloc<float>(n + 8) : nullptr;
  if (with_accum)
    for (int i = 0; i < 8; ++i) bp.dq_accum[n + i] = 12345.f;
  if (attention_backward_preprocess(dtype_of<T>(), bp, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: attention_backward_preprocess refused\n", ctx.c_str());
    ++failures;
  }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i) {
        const int64_t row = (int64_t(b) * H + h) * L + i;
        const T* o = out + b * out_strides[0] + h * out_strides[1] + i * out_strides[2];
        const T* g = dout + b * contiguous[0] + h * contiguous[1] + i * contiguous[2];
        double want = 0, scale = 0;
        for (int c = 0; c < D; ++c) {
          want += double(tof<T>(o[c])) * tof<T>(g[c]);
          scale += std::fabs(double(tof<T>(o[c])) * tof<T>(g[c]));
        }
        check("delta", ctx + " row=" + std::to_string(row), bp.delta[row], want, 1e-5 * (1.0 + scale));
      }
  for (int i = 0; i < 4; ++i) check("delta past the end", ctx, bp.delta[rows + i], 12345.0, 0.0);
  if (with_accum) {
    for (int64_t i = 0; i < n; ++i) check("dq_accum zeroed", ctx + " i=" + std::to_string(i), bp.dq_accum[i], 0.0, 0.0);
    for (int i = 0; i < 8; ++i) check("dq_accum past the end", ctx, bp.dq_accum[n + i], 12345.0, 0.0);
    std::free(bp.dq_accum);
  }
  std::free(bp.delta);
  std::free(out_base);
  std::free(dout_base);
}

template <typename T>
void run_convert(int rows, int D, int offset) {
  const std::string ctx = std::string(std::is_same_v<T, __half> ? "f16" : "bf16") + " convert rows=" +
                          std::to_string(rows) + " D=" + std::to_string(D) + " offset=" + std::to_string(offset);
  const int64_t n = int64_t(rows) * D;
  AttentionBackwardParams bp{};
  bp.fwd.B = 1, bp.fwd.Hq = bp.fwd.Hkv = 1, bp.fwd.Lq = bp.fwd.Lk = rows, bp.fwd.D = D;
  float* acc = random_tensor<float>(n + 8, 3.f, 0.f);
  T* dq_base = alloc<T>(n + 24);
  T* dq = dq_base + offset;
  const T sentinel = fromf<T>(12345.f);
  for (int i = 0; i < 16; ++i) dq[n + i] = sentinel;
  bp.dq_accum = acc;
  bp.dq = dq;
  const float scale = 0.37f;
  if (attention_backward_convert_dq(dtype_of<T>(), bp, scale, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: attention_backward_convert_dq refused\n", ctx.c_str());
    ++failures;
  }
  for (int64_t i = 0; i < n; ++i)
    check("dq", ctx + " i=" + std::to_string(i), tof<T>(dq[i]), double(acc[i]) * scale, tol<T>());
  for (int i = 0; i < 16; ++i) check("dq past the end", ctx, tof<T>(dq[n + i]), tof<T>(sentinel), 0.0);
  std::free(acc);
  std::free(dq_base);
}

template <typename T>
void run_all() {
  for (int D : {8, 40, 64, 128, 256, 36, 264})
    for (const char* layout : {"bhld", "blhd", "offset"})
      for (bool with_accum : {true, false}) run_preprocess<T>(2, 3, 37, D, layout, with_accum);
  run_preprocess<T>(1, 1, 1, 64, "bhld", true);  // one row: a block of mostly idle lanes
  for (int rows : {1, 7, 300})
    for (int D : {64, 36})
      for (int offset : {0, 1}) run_convert<T>(rows, D, offset);
}

int main() {
  run_all<__half>();
  run_all<__nv_bfloat16>();
  std::printf("%s: %d failures, %ld launches\n", failures ? "FAILED" : "OK", failures, emu::launches);
  return failures ? 1 : 0;
}
