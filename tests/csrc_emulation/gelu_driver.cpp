// Checks csrc/gelu.cu's public entry points (gelu_forward, gelu_backward), run on the CPU stand-in
// for CUDA (cuda_runtime.h here), against a float64 reference: every dtype, erf and tanh forms,
// lengths around the 16-byte vector width, pointers 16-byte aligned (vector kernels) and one
// element off (element kernels), and nothing written past the end. Prints "OK: ..." or
// "FAILED: ..." last; exit status 1 on a failure.
#include <type_traits>

#include "driver_util.h"

using namespace fuseformer;

static double gelu_ref(double x, bool tanh_form) {
  if (tanh_form) return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
  return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
}

static double gelu_grad_ref(double x, bool tanh_form) {
  if (tanh_form) {
    const double k = std::sqrt(2.0 / M_PI), t = std::tanh(k * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
  }
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

template <typename T>
void run_case(int64_t n, int offset, bool tanh_form) {
  const std::string ctx = std::string(sizeof(T) == 4 ? "f32" : (std::is_same_v<T, __half> ? "f16" : "bf16")) +
                          " n=" + std::to_string(n) + " offset=" + std::to_string(offset) + (tanh_form ? " tanh" : " erf");
  const size_t total = size_t(n + offset + 16);  // room for the offset and a poisoned tail
  T* pre = random_tensor<T>(total, 1.5f, 0.f) + offset;
  T* dout = random_tensor<T>(total, 1.f, 0.f) + offset;
  T* out = alloc<T>(total) + offset;
  T* dpre = alloc<T>(total) + offset;
  const T sentinel = fromf<T>(12345.f);
  for (int i = 0; i < 16; ++i) out[n + i] = dpre[n + i] = sentinel;
  if (gelu_forward(dtype_of<T>(), pre, out, n, tanh_form, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: gelu_forward refused\n", ctx.c_str());
    ++failures;
  }
  if (gelu_backward(dtype_of<T>(), dout, pre, dpre, n, tanh_form, nullptr) != cudaSuccess) {
    std::printf("FAIL %s: gelu_backward refused\n", ctx.c_str());
    ++failures;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double x = tof<T>(pre[i]);
    check("out", ctx + " i=" + std::to_string(i), tof<T>(out[i]), gelu_ref(x, tanh_form), tol<T>());
    check("dpre", ctx + " i=" + std::to_string(i), tof<T>(dpre[i]), tof<T>(dout[i]) * gelu_grad_ref(x, tanh_form),
          tol<T>());
  }
  for (int i = 0; i < 16; ++i) {
    check("out past the end", ctx, tof<T>(out[n + i]), tof<T>(sentinel), 0.0);
    check("dpre past the end", ctx, tof<T>(dpre[n + i]), tof<T>(sentinel), 0.0);
  }
  std::free(pre - offset);
  std::free(dout - offset);
  std::free(out - offset);
  std::free(dpre - offset);
}

template <typename T>
void run_all() {
  for (int64_t n : {1, 7, 8, 9, 31, 64, 1000, 2051})
    for (int offset : {0, 1})
      for (bool tanh_form : {false, true}) run_case<T>(n, offset, tanh_form);
}

int main() {
  run_all<float>();
  run_all<__half>();
  run_all<__nv_bfloat16>();
  std::printf("%s: %d failures, %ld launches\n", failures ? "FAILED" : "OK", failures, emu::launches);
  return failures ? 1 : 0;
}
