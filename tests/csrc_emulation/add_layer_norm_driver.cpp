// Checks csrc/add_layer_norm.cu's public entry points, run on the CPU stand-in for CUDA
// (cuda_runtime.h here), against a float64 reference: each hidden size given on the command line,
// every dtype, aligned and unaligned configs, optional arguments present and absent. Prints
// "OK: ..." or "FAILED: ..." last; exit status 1 on a failure.
#include <type_traits>
#include <vector>

#include "driver_util.h"

using namespace fuseformer;

template <typename T>
void run_case(int64_t M, int N, bool aligned, bool all_args, int max_blocks) {
  const std::string ctx = std::string(sizeof(T) == 4 ? "f32" : (std::is_same_v<T, __half> ? "f16" : "bf16")) + " M=" +
                          std::to_string(M) + " N=" + std::to_string(N) + (aligned ? " aligned" : " unaligned") +
                          (all_args ? " all-args" : " no-optional") + " max_blocks=" + std::to_string(max_blocks);
  const size_t MN = size_t(M) * N;
  T* x = random_tensor<T>(MN, 1.f, 0.3f);
  T* res = all_args ? random_tensor<T>(MN, 1.f, 0.f) : nullptr;
  T* w = all_args ? random_tensor<T>(N, 0.5f, 1.f) : nullptr;
  T* b = all_args ? random_tensor<T>(N, 0.5f, 0.f) : nullptr;
  T* y = alloc<T>(MN);
  T* stream = alloc<T>(MN);
  float* mean = alloc<float>(M);
  float* rstd = alloc<float>(M);
  const float eps = 1e-5f;
  if (add_layer_norm_forward(dtype_of<T>(), x, res, w, b, y, stream, mean, rstd, M, N, eps, aligned, nullptr) != cudaSuccess)
    std::abort();
  // statistics skipped: y must be the same
  T* y2 = alloc<T>(MN);
  add_layer_norm_forward(dtype_of<T>(), x, res, w, b, y2, nullptr, nullptr, nullptr, M, N, eps, aligned, nullptr);
  if (std::memcmp(y, y2, MN * sizeof(T)) != 0) { std::printf("FAIL %s: y differs without stats\n", ctx.c_str()); ++failures; }

  std::vector<double> h(MN), xhat(MN), mu(M), rs(M);
  for (int64_t r = 0; r < M; ++r) {
    double s = 0;
    for (int c = 0; c < N; ++c) {
      const size_t i = r * N + c;
      h[i] = res ? tof<T>(fromf<T>(tof<T>(x[i]) + tof<T>(res[i]))) : tof<T>(x[i]);
      s += h[i];
    }
    mu[r] = s / N;
    double v = 0;
    for (int c = 0; c < N; ++c) v += (h[r * N + c] - mu[r]) * (h[r * N + c] - mu[r]);
    rs[r] = 1.0 / std::sqrt(v / N + eps);
    check("mean", ctx, mean[r], mu[r], 1e-5);
    check("rstd", ctx, rstd[r], rs[r], 1e-4);
    for (int c = 0; c < N; ++c) {
      const size_t i = r * N + c;
      xhat[i] = (h[i] - mu[r]) * rs[r];
      const double want = xhat[i] * (w ? tof<T>(w[c]) : 1.0) + (b ? tof<T>(b[c]) : 0.0);
      check("y", ctx, tof<T>(y[i]), want, tol<T>());
      check("stream", ctx, tof<T>(stream[i]), h[i], 0.0);
    }
  }

  T* dy = random_tensor<T>(MN, 1.f, 0.f);
  T* dstream = all_args ? random_tensor<T>(MN, 1.f, 0.f) : nullptr;
  T* dh = alloc<T>(MN);
  T* dh_copy = all_args ? alloc<T>(MN) : nullptr;
  const int64_t rows = add_layer_norm_partial_rows(dtype_of<T>(), M, N, aligned, max_blocks);
  float* dwp = w ? alloc<float>(rows * N + 1) : nullptr;
  float* dbp = alloc<float>(rows * N + 1);
  T* dweight = w ? alloc<T>(N) : nullptr;
  T* dbias = alloc<T>(N);
  add_layer_norm_backward(dtype_of<T>(), dy, dstream, stream, w, mean, rstd, dh, dh_copy, dwp, dbp, M, N, aligned,
                          max_blocks, nullptr);
  add_layer_norm_sum_partials(dtype_of<T>(), dwp, dbp, dweight, dbias, rows, N, nullptr);
  std::vector<double> dw_ref(N, 0.0), db_ref(N, 0.0);
  for (int64_t r = 0; r < M; ++r) {
    double mg = 0, mgx = 0;
    for (int c = 0; c < N; ++c) {
      const size_t i = r * N + c;
      const double g = tof<T>(dy[i]) * (w ? tof<T>(w[c]) : 1.0);
      mg += g;
      mgx += g * xhat[i];
      dw_ref[c] += tof<T>(dy[i]) * xhat[i];
      db_ref[c] += tof<T>(dy[i]);
    }
    mg /= N;
    mgx /= N;
    for (int c = 0; c < N; ++c) {
      const size_t i = r * N + c;
      const double g = tof<T>(dy[i]) * (w ? tof<T>(w[c]) : 1.0);
      const double want = rs[r] * (g - mg - xhat[i] * mgx) + (dstream ? tof<T>(dstream[i]) : 0.0);
      check("dh", ctx, tof<T>(dh[i]), want, tol<T>() * 2);
      if (dh_copy) check("dh_copy", ctx, tof<T>(dh_copy[i]), tof<T>(dh[i]), 0.0);
    }
  }
  for (int c = 0; c < N; ++c) {
    if (dweight) check("dweight", ctx, tof<T>(dweight[c]), dw_ref[c], tol<T>() * 2);
    check("dbias", ctx, tof<T>(dbias[c]), db_ref[c], tol<T>() * 2);
  }
  for (void* p : {(void*)x, (void*)res, (void*)w, (void*)b, (void*)y, (void*)y2, (void*)stream, (void*)mean, (void*)rstd,
                  (void*)dy, (void*)dstream, (void*)dh, (void*)dh_copy, (void*)dwp, (void*)dbp, (void*)dweight, (void*)dbias})
    std::free(p);
}

template <typename T>
void run_all(const std::vector<int>& Ns) {
  for (int N : Ns) {
    const bool alignable = (N * sizeof(T)) % 16 == 0;
    for (bool aligned : {true, false}) {
      if (aligned && !alignable) continue;
      run_case<T>(11, N, aligned, true, 2);
      if (aligned || N < 300) run_case<T>(5, N, aligned, false, 64);
    }
  }
}

int main(int argc, char** argv) {
  std::vector<int> Ns;
  for (int i = 1; i < argc; ++i) Ns.push_back(std::atoi(argv[i]));
  run_all<float>(Ns);
  run_all<__half>(Ns);
  run_all<__nv_bfloat16>(Ns);
  std::printf("%s: %d failures, %ld launches\n", failures ? "FAILED" : "OK", failures, emu::launches);
  return failures ? 1 : 0;
}
