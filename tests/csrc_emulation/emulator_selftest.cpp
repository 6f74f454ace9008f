// Checks the CPU stand-in for CUDA itself (cuda_runtime.h here), so that the csrc/ drivers'
// verdicts can be trusted: a block-wide sum through warp shuffles and shared memory comes out
// right in every thread, for one to 32 whole warps; and the schedule is adversarial enough that
// the same sum with either of its two __syncthreads left out comes out wrong. `deadlock` as the
// argument runs a kernel in which one thread returns before a barrier the others wait at; the
// stand-in must abort with a message (exit status != 0) rather than hang.
// Prints "OK: ..." or "FAILED: ..." last; exit status 1 on a failure.
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda_runtime.h"

// The sum of v over the block into every thread's out; SYNC_BEFORE / SYNC_AFTER keep the barrier
// before reading the warps' partials and the one before the scratch is written again.
template <bool SYNC_BEFORE, bool SYNC_AFTER>
__global__ void block_sum_kernel(const float* v, float* out, int rounds) {
  static float scratch[32];  // __shared__, as tests/test_csrc_emulated.py rewrites it in csrc/
  const int t = threadIdx.x, warps = (blockDim.x + 31) / 32;
  float x = v[blockIdx.x * blockDim.x + t];
  for (int r = 0; r < rounds; ++r) {  // each round's scratch overwrites the last one's
    float s = x;
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (t % 32 == 0) scratch[t / 32] = s;
    if (SYNC_BEFORE) __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    if (SYNC_AFTER) __syncthreads();
    x = total / float(blockDim.x) + float(r);  // depends on the round, so stale partials show
  }
  out[blockIdx.x * blockDim.x + t] = x;
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Wrong outputs of block_sum_kernel<A, B> over `grid` blocks of `block` threads (whole warps);
// the expected values follow the rounds on the CPU in float64.
template <bool A, bool B>
int wrong_sums(unsigned grid, int block, int rounds) {
  std::vector<float> v(size_t(grid) * block), out(v.size(), -1.f);
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i % 7) - 3.f;
  emu::launch(block_sum_kernel<A, B>, grid, block, 0, nullptr, v.data(), out.data(), rounds);
  int wrong = 0;
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<double> x(v.begin() + b * block, v.begin() + (b + 1) * block);
    for (int r = 0; r < rounds; ++r) {
      double total = 0.0;
      for (double e : x) total += e;
      for (double& e : x) e = total / block + r;
    }
    for (int t = 0; t < block; ++t) wrong += std::fabs(out[b * block + t] - x[t]) > 1e-3 * (1.0 + std::fabs(x[t]));
  }
  return wrong;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "deadlock") == 0) {
    std::vector<int> out(64, 0);
    emu::launch(early_return_kernel, 1u, 64, 0, nullptr, out.data());
    std::printf("FAILED: the early return did not deadlock\n");
    return 1;
  }
  int failures = 0;
  for (int block : {32, 64, 256, 1024}) {
    const int wrong = wrong_sums<true, true>(8, block, 4);
    if (wrong) std::printf("FAIL block=%d: %d wrong sums with both barriers\n", block, wrong), ++failures;
    if (block == 32) continue;  // one warp: its shuffles' barriers order it without __syncthreads
    if (!wrong_sums<false, true>(8, block, 4))
      std::printf("FAIL block=%d: no wrong sum without the barrier before the reads\n", block), ++failures;
    if (!wrong_sums<true, false>(8, block, 4))
      std::printf("FAIL block=%d: no wrong sum without the barrier before the next writes\n", block), ++failures;
  }
  std::printf(failures ? "FAILED: %d failures, %ld launches\n" : "OK: %d failures, %ld launches\n", failures, emu::launches);
  return failures ? 1 : 0;
}
