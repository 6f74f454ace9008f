// Fused residual add + LayerNorm, forward and backward, for (M, N) row-major fp16/bf16/fp32.
//
// Forward, per row:  h = round_T(x + residual);  mean = sum(h) / N;
//                    rstd = 1 / sqrt(sum((h - mean)^2) / N + eps);  y = (h - mean) * rstd * w + b
// h is rounded to the input dtype before the statistics because that is what the reference
// (and the prenorm stream it returns) holds.
//
// Backward, with xhat = (h - mean) * rstd and g = dy * w:
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dstream
//   dw = sum_rows(dy * xhat),  db = sum_rows(dy)
// dx and dresidual are both dh (no dropout here: dropout is left to the other backends); the
// kernel writes the second copy itself because outputs of a torch custom op may not alias.
//
// A row lives in registers between the two reductions, so it is read from memory once. A
// "row group" of THREADS_PER_ROW threads owns a row: a warp (reductions by shuffles only) or the
// whole block; each thread holds one 16-byte vector of the row (pick_config). Every global access
// of x, residual, weight, bias, dy, the stream and the outputs is 16 bytes wide when the pointers
// and N allow it (`aligned`), one element wide otherwise. The forward writes the stream and
// mean/rstd only when given somewhere to put them. The backward writes one row of dw/db partial
// sums per block; a second, small kernel adds those rows up.
#include "common.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

constexpr int kWarpBlock = 128;  // four rows per block when a warp owns a row

// Sum over the THREADS_PER_ROW threads of a row group; every thread gets the total.
template <int THREADS_PER_ROW>
__device__ __forceinline__ float group_sum(float v, float* scratch) {
  if constexpr (THREADS_PER_ROW <= 32) {
    return warp_sum<THREADS_PER_ROW>(v);
  } else {
    constexpr int kWarps = THREADS_PER_ROW / 32;
    v = warp_sum<32>(v);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch[w];
    __syncthreads();  // scratch is reused by the next reduction
    return total;
  }
}

// A row's vectors as stored (T), for the columns this thread owns; zero outside the row.
template <typename T, int VW, int THREADS_PER_ROW, int VECS>
__device__ __forceinline__ void load_packed(const T* __restrict__ src, int64_t row, int N, int lane,
                                           Vec<T, VW> (&dst)[VECS]) {
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int col = (i * THREADS_PER_ROW + lane) * VW;
    if (col < N) {
      dst[i] = load_vec<VW>(src + row * N + col);
    } else {
#pragma unroll
      for (int j = 0; j < VW; ++j) dst[i].v[j] = from_float<T>(0.f);
    }
  }
}

// Loads h = round_T(x + residual) for the columns this thread owns; zero outside the row. h is
// held in T, as the rounding leaves it: exact, and half the registers of fp32 for 16-bit types
// (the forward's configs need that to fit 40 registers a thread, kFwdMinBlocks).
template <typename T, int VW, int THREADS_PER_ROW, int VECS>
__device__ __forceinline__ void load_stream(const T* __restrict__ x, const T* __restrict__ residual, int64_t row,
                                            int N, int lane, Vec<T, VW> (&h)[VECS]) {
  load_packed<T, VW, THREADS_PER_ROW, VECS>(x, row, N, lane, h);
  if (residual == nullptr) return;
  Vec<T, VW> r[VECS];
  load_packed<T, VW, THREADS_PER_ROW, VECS>(residual, row, N, lane, r);
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    float sum[VW];
#pragma unroll
    for (int j = 0; j < VW; ++j) sum[j] = to_float(h[i].v[j]) + to_float(r[i].v[j]);
    round_into<T, VW>(h[i], sum);
  }
}

// VW fp32 values to dst, as 16-byte stores where VW allows (dst is then 16-byte aligned: the
// partial buffers are fresh allocations and N * sizeof(T) is a multiple of 16).
template <int VW>
__device__ __forceinline__ void store_f32(float* __restrict__ dst, const float (&src)[VW]) {
  if constexpr (VW % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VW; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(src[j], src[j + 1], src[j + 2], src[j + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) dst[j] = src[j];
  }
}

// The launch bounds let ptxas budget registers for the real block size (a 512-thread block
// must fit in 128 registers per thread, or the launch fails). kFwdMinBlocks: the threads an SM
// should hold at once for the aligned forward configs, as ptxas budgets registers for them: 1536
// (at most 40 registers a thread) with one vector a thread, 1024 (64) with more (N > 4096 in 16
// bits: those spilled at 40). At 32 registers (all 2048) the bf16 configs spilled 30-48 bytes.
// Every other config is budgeted for its block size alone.
template <int VW, int THREADS_PER_ROW, int VECS>
constexpr int kFwdMinBlocks = VW > 1 ? (VECS == 1 ? 1536 : 1024) / (THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW) : 1;

template <typename T, int VW, int THREADS_PER_ROW, int VECS>
__global__ void __launch_bounds__(THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW,
                                  kFwdMinBlocks<VW, THREADS_PER_ROW, VECS>) add_layer_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                              const T* __restrict__ weight, const T* __restrict__ bias,
                                              T* __restrict__ y, T* __restrict__ stream_out, float* __restrict__ mean_out,
                                              float* __restrict__ rstd_out, int64_t M, int N, float eps) {
  constexpr int kRowsPerBlock = (THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW) / THREADS_PER_ROW;
  __shared__ float scratch[THREADS_PER_ROW > 32 ? THREADS_PER_ROW / 32 : 1];
  const int lane = threadIdx.x % THREADS_PER_ROW;
  const int group = threadIdx.x / THREADS_PER_ROW;

  // Every thread of a group runs the same rows, so the block-wide barriers inside group_sum
  // (block-per-row case) are reached by all threads together.
  for (int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + group; row < M; row += (int64_t)gridDim.x * kRowsPerBlock) {
    Vec<T, VW> h[VECS];
    load_stream<T, VW, THREADS_PER_ROW, VECS>(x, residual, row, N, lane, h);

    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VECS; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) sum += to_float(h[i].v[j]);
    const float mean = group_sum<THREADS_PER_ROW>(sum, scratch) / N;

    // Second pass over registers: exact centred variance, no E[x^2] - E[x]^2 cancellation.
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int col = (i * THREADS_PER_ROW + lane) * VW;
      if (col < N) {
#pragma unroll
        for (int j = 0; j < VW; ++j) {
          const float d = to_float(h[i].v[j]) - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(group_sum<THREADS_PER_ROW>(sq, scratch) / N + eps);

#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int col = (i * THREADS_PER_ROW + lane) * VW;
      if (col >= N) continue;
      if (stream_out != nullptr) store_vec(stream_out + row * N + col, h[i]);
      // weight, bias and y as T too, converted one element at a time (the budget of kFwdMinBlocks).
      Vec<T, VW> w, b, out;
      if (weight != nullptr) w = load_vec<VW>(weight + col);
      if (bias != nullptr) b = load_vec<VW>(bias + col);
      float v[VW];
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        v[j] = (to_float(h[i].v[j]) - mean) * rstd;
        if (weight != nullptr) v[j] *= to_float(w.v[j]);
        if (bias != nullptr) v[j] += to_float(b.v[j]);
      }
      round_into<T, VW>(out, v);
      store_vec(y + row * N + col, out);
    }
    if (lane == 0 && mean_out != nullptr) {  // null in inference: nothing reads them
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// dst[0:VW] += src, as 16-byte shared-memory accesses where VW allows.
template <int VW>
__device__ __forceinline__ void add_f32(float* dst, const float (&src)[VW]) {
  if constexpr (VW % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VW; j += 4) {
      float4 v = *reinterpret_cast<float4*>(dst + j);
      v.x += src[j], v.y += src[j + 1], v.z += src[j + 2], v.w += src[j + 3];
      *reinterpret_cast<float4*>(dst + j) = v;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VW; ++j) dst[j] += src[j];
  }
}

// Each group also sums dy * xhat and dy over the rows it visits, for dweight and dbias: in
// registers when a block owns a row (one row group per block: its threads keep their columns from
// row to row), in a shared-memory slice per warp when warps own rows (several rows a block). Each
// block writes one partial row of each. The one-vector configs (N > 1024 in 16 bits, and rows of
// at most 32 vectors) load the next row's stream and dy before this row's reductions: two rows of
// loads in flight a group. The H200 (bench/results/h200/, 2026-11-28) timed the earlier backward
// at 16384 x 768 and x 4096 bf16, forward+backward 0.0689 and 0.2919 ms, 62% and 78% of copy
// bandwidth by the bench's byte count; at 4096 it ran 512 threads of room for two vectors (96
// registers: one block, one row in flight an SM).
// kBwdMinBlocks: the aligned one-vector configs ask for 1024 threads an SM (at most 64 registers
// a thread: 48-64, no spills on sm_80 or sm_90; unasked, ptxas took up to 76), the warp configs of
// 4-8 vectors a lane for 4 blocks (128 registers, as before).
template <int VW, int THREADS_PER_ROW, int VECS>
constexpr int kBwdMinBlocks = VW == 1 ? 1
                              : VECS == 1 ? 1024 / (THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW)
                              : THREADS_PER_ROW <= 32 ? 4 : 1;

template <typename T, int VW, int THREADS_PER_ROW, int VECS>
__global__ void __launch_bounds__(THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW,
                                  kBwdMinBlocks<VW, THREADS_PER_ROW, VECS>) add_layer_norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ dstream, const T* __restrict__ stream_in,
    const T* __restrict__ weight, const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
    T* __restrict__ dh, T* __restrict__ dh_copy, float* __restrict__ dweight_partial,
    float* __restrict__ dbias_partial, int64_t M, int N) {
  constexpr int kRowsPerBlock = (THREADS_PER_ROW <= 32 ? kWarpBlock : THREADS_PER_ROW) / THREADS_PER_ROW;
  constexpr bool kSumsInSmem = kRowsPerBlock > 1;
  constexpr int kRowFloats = THREADS_PER_ROW * VECS * VW;  // the widest row this config takes
  __shared__ float scratch[THREADS_PER_ROW > 32 ? THREADS_PER_ROW / 32 : 1];
  // [dw of warp 0..3][db of warp 0..3], kRowFloats each
  __shared__ alignas(16) float smem_sums[kSumsInSmem ? 2 * kRowsPerBlock * kRowFloats : 1];
  const int lane = threadIdx.x % THREADS_PER_ROW;
  const int group = threadIdx.x / THREADS_PER_ROW;
  float* const sums_dw = smem_sums + group * kRowFloats;
  float* const sums_db = smem_sums + (kRowsPerBlock + group) * kRowFloats;

  float acc_dw[kSumsInSmem ? 1 : VECS][VW], acc_db[kSumsInSmem ? 1 : VECS][VW];
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int col = (i * THREADS_PER_ROW + lane) * VW;
#pragma unroll
    for (int j = 0; j < VW; ++j) {
      if constexpr (kSumsInSmem) {
        if (col < N) sums_dw[col + j] = sums_db[col + j] = 0.f;  // only this thread touches them until the end
      } else {
        acc_dw[i][j] = acc_db[i][j] = 0.f;
      }
    }
  }

  // The one-vector configs load the next row's stream and dy before this row's reductions. The
  // others (VW = 1, 8-32 elements a lane; 2-8 vectors a thread) load a row at a time: a second
  // row of registers took them from 96-212 registers a thread to 128-255, and spilled at 128.
  constexpr bool kPrefetch = VW > 1 && VECS == 1;
  const int64_t step = (int64_t)gridDim.x * kRowsPerBlock;
  int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + group;
  Vec<T, VW> s[VECS], d[VECS];  // this row's stream and dy, as loaded
  if (kPrefetch && row < M) {
    load_packed<T, VW, THREADS_PER_ROW, VECS>(stream_in, row, N, lane, s);
    load_packed<T, VW, THREADS_PER_ROW, VECS>(dy, row, N, lane, d);
  }
  for (; row < M; row += step) {
    if constexpr (!kPrefetch) {
      load_packed<T, VW, THREADS_PER_ROW, VECS>(stream_in, row, N, lane, s);
      load_packed<T, VW, THREADS_PER_ROW, VECS>(dy, row, N, lane, d);
    }
    Vec<T, VW> s_next[VECS], d_next[VECS];
    if (kPrefetch && row + step < M) {
      load_packed<T, VW, THREADS_PER_ROW, VECS>(stream_in, row + step, N, lane, s_next);
      load_packed<T, VW, THREADS_PER_ROW, VECS>(dy, row + step, N, lane, d_next);
    }
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];
    float h[VECS][VW], g[VECS][VW];
#pragma unroll
    for (int i = 0; i < VECS; ++i)
#pragma unroll
      for (int j = 0; j < VW; ++j) h[i][j] = to_float(s[i].v[j]), g[i][j] = to_float(d[i].v[j]);

    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int col = (i * THREADS_PER_ROW + lane) * VW;
      if (col >= N) continue;
      float dw[VW];
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        const float xhat = (h[i][j] - mean) * rstd;
        dw[j] = g[i][j] * xhat;
        if constexpr (!kSumsInSmem) {
          acc_dw[i][j] += dw[j];
          acc_db[i][j] += g[i][j];
        }
      }
      if constexpr (kSumsInSmem) {
        add_f32<VW>(sums_dw + col, dw);
        add_f32<VW>(sums_db + col, g[i]);
      }
      // The weight from memory each row (cached): held for the whole loop it cost the warp
      // configs' 4-8 vectors a lane more registers than they have.
      Vec<T, VW> w;
      if (weight != nullptr) w = load_vec<VW>(weight + col);
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        const float xhat = (h[i][j] - mean) * rstd;
        if (weight != nullptr) g[i][j] *= to_float(w.v[j]);
        h[i][j] = xhat;  // h is not needed any more; keep xhat in its registers
        sum_g += g[i][j];
        sum_gx += g[i][j] * xhat;
      }
    }
    const float mean_g = group_sum<THREADS_PER_ROW>(sum_g, scratch) / N;
    const float mean_gx = group_sum<THREADS_PER_ROW>(sum_gx, scratch) / N;

#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int col = (i * THREADS_PER_ROW + lane) * VW;
      if (col >= N) continue;
      Vec<T, VW> extra, out;
      if (dstream != nullptr) extra = load_vec<VW>(dstream + row * N + col);
      float v[VW];
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        v[j] = rstd * (g[i][j] - mean_g - h[i][j] * mean_gx);
        if (dstream != nullptr) v[j] += to_float(extra.v[j]);
      }
      round_into<T, VW>(out, v);
      store_vec(dh + row * N + col, out);
      if (dh_copy != nullptr) store_vec(dh_copy + row * N + col, out);
    }
    if constexpr (kPrefetch) {
#pragma unroll
      for (int i = 0; i < VECS; ++i) {
        s[i] = s_next[i];
        d[i] = d_next[i];
      }
    }
  }

  // Every block writes its partial row, zeros included, so the caller may sum an uninitialised
  // buffer.
  const int64_t partial_row = blockIdx.x;
  if constexpr (kSumsInSmem) {
    // The warps' slices added in a fixed order (deterministic, unlike atomics), 4 columns per
    // thread where rows are 16-byte aligned (then N is a multiple of 4).
    constexpr int kStep = VW % 4 == 0 ? 4 : 1;
    __syncthreads();
    for (int col = threadIdx.x * kStep; col < N; col += kWarpBlock * kStep) {
      float dw[kStep], db[kStep];
#pragma unroll
      for (int k = 0; k < kStep; ++k) dw[k] = db[k] = 0.f;
#pragma unroll
      for (int w = 0; w < kRowsPerBlock; ++w) {
#pragma unroll
        for (int k = 0; k < kStep; ++k) {
          dw[k] += smem_sums[w * kRowFloats + col + k];
          db[k] += smem_sums[(kRowsPerBlock + w) * kRowFloats + col + k];
        }
      }
      if (dweight_partial != nullptr) store_f32<kStep>(dweight_partial + partial_row * N + col, dw);
      if (dbias_partial != nullptr) store_f32<kStep>(dbias_partial + partial_row * N + col, db);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
      const int col = (i * THREADS_PER_ROW + lane) * VW;
      if (col >= N) continue;
      if (dweight_partial != nullptr) store_f32<VW>(dweight_partial + partial_row * N + col, acc_dw[i]);
      if (dbias_partial != nullptr) store_f32<VW>(dbias_partial + partial_row * N + col, acc_db[i]);
    }
  }
}

// The backward's second, small kernel: dweight and dbias as the column sums of the partial
// rows, rounded once to T, in one launch. A block owns kSumCols columns and splits the rows
// among kSumSlices threads per column (a warp reads 4 rows x 8 columns: full 32-byte sectors),
// then adds the slices up in a fixed order.
constexpr int kSumCols = 8;
constexpr int kSumSlices = 32;

template <typename T>
__global__ void __launch_bounds__(kSumCols * kSumSlices) add_layer_norm_sum_partials_kernel(
    const float* __restrict__ dweight_partial,  // (rows, N) fp32, or null
    const float* __restrict__ dbias_partial,    // (rows, N) fp32, or null
    T* __restrict__ dweight,                    // (N,), or null
    T* __restrict__ dbias,                      // (N,), or null
    int64_t rows, int N) {
  __shared__ float slices[2][kSumSlices][kSumCols + 1];
  const int c = threadIdx.x % kSumCols;
  const int slice = threadIdx.x / kSumCols;
  const int col = blockIdx.x * kSumCols + c;
  float dw = 0.f, db = 0.f;
  if (col < N) {
    for (int64_t r = slice; r < rows; r += kSumSlices) {
      if (dweight_partial != nullptr) dw += dweight_partial[r * N + col];
      if (dbias_partial != nullptr) db += dbias_partial[r * N + col];
    }
  }
  slices[0][slice][c] = dw;
  slices[1][slice][c] = db;
  __syncthreads();
  T* out = slice == 0 ? dweight : dbias;
  if (slice < 2 && col < N && out != nullptr) {
    float total = 0.f;
#pragma unroll
    for (int s = 0; s < kSumSlices; ++s) total += slices[slice][s][c];
    out[col] = from_float<T>(total);
  }
}

// The (threads per row, vectors per thread) a hidden size N runs with, forward and backward.
// Aligned rows: one 16-byte vector a thread and tensor, as many threads as the row has vectors (a
// power of two, 64 to 512: one row a block, as the Triton forward runs one row a program), or a
// warp per row (four rows a block) for rows of at most 32 vectors; rows of more than 512 vectors
// (N > 4096 in 16 bits, > 2048 in fp32) take 512 threads of up to kWideVecs. The backward keeps
// a warp per row up to N = 1024 (kWarpVecs vectors a lane, column sums in shared memory): the
// H200 timed that kernel at 30 us for 16384 x 768 bf16, where Triton's backward of one row a
// program took 41 (kernels/cuda_backend.py, _add_layer_norm_auto_unsupported). Unaligned rows
// (VW = 1): 8 or 32 elements per lane of a warp up to N = 1024, then 256 threads x 32.
//
// Why: the H200 (bench/results/h200/, 2026-11-28, 16384 rows, bf16, device time) timed the
// forward on the earlier configs (up to 4 vectors a lane of a warp per row up to N = 1024, then
// 256 or 512 threads with room for 2) at 70% of copy bandwidth at N = 768, 75% at 1024, 68% at
// 2048 and 83% at 4096, where the Triton forward of the same shapes reached 87-95%. Room for 2-4
// vectors a lane, mostly unused (N = 2048 filled one of the 256-thread config's two), cost the
// forward 58-72 registers a thread there (ptxas, sm_90) and the backward above N = 1024 93-96,
// so at most half (forward) or a quarter (backward) of an SM's 2048 threads were resident with
// their loads in flight; the Triton forward compiles to 29. With one vector a thread and rows
// held in T, the forward fits 40 registers and asks for 1536 threads an SM (kFwdMinBlocks); the
// backward above N = 1024 fits 64 (1024 threads an SM, kBwdMinBlocks) and is launched on as many
// blocks as fit (add_layer_norm_backward_blocks_per_sm). Untimed on a GPU.
struct RowConfig {
  int threads_per_row;
  int vecs;
};

template <typename T> constexpr int kVecWidth = 16 / sizeof(T);
template <typename T> constexpr int kWarpVecs = 1024 / (32 * kVecWidth<T>);                   // 4, or 8 for fp32
template <typename T> constexpr int kWideVecs = kLayerNormMaxHidden / (512 * kVecWidth<T>);  // 2, or 4 for fp32
static_assert(256 * 32 >= kLayerNormMaxHidden, "the unaligned block config must cover the widest row");

template <typename T>
RowConfig pick_config(int N, bool aligned, bool backward) {
  if (!aligned) {
    if (N <= 32 * 8) return {32, 8};
    if (N <= 1024) return {32, 32};
    return {256, 32};
  }
  constexpr int kVW = kVecWidth<T>;
  const int vectors = (N + kVW - 1) / kVW;
  if (vectors <= 32) return {32, 1};
  if (backward && N <= 1024) return {32, kWarpVecs<T>};
  int threads = 64;
  while (threads < vectors && threads < 512) threads *= 2;
  return {threads, vectors > 512 ? kWideVecs<T> : 1};
}

int rows_per_block(RowConfig c) { return (c.threads_per_row <= 32 ? kWarpBlock : c.threads_per_row) / c.threads_per_row; }
int block_threads(RowConfig c) { return c.threads_per_row <= 32 ? kWarpBlock : c.threads_per_row; }

int64_t blocks_for(int64_t M, RowConfig c, int64_t cap) {
  const int64_t needed = (M + rows_per_block(c) - 1) / rows_per_block(c);
  return needed < cap ? (needed > 0 ? needed : 1) : cap;
}

// Every (VW, threads, vecs) instance pick_config can return, in one place.
// WARP_VECS: kWarpVecs<T> for the backward, 1 for the forward (which has no such config).
#define FUSEFORMER_LN_DISPATCH(T, cfg, aligned, WARP_VECS, LAUNCH)                \
  do {                                                                            \
    constexpr int kVW = kVecWidth<T>;                                             \
    if (!aligned) {                                                               \
      if (cfg.threads_per_row == 32 && cfg.vecs == 8) LAUNCH(T, 1, 32, 8);        \
      else if (cfg.threads_per_row == 32) LAUNCH(T, 1, 32, 32);                   \
      else LAUNCH(T, 1, 256, 32);                                                 \
    } else if (cfg.threads_per_row == 32 && cfg.vecs == 1) LAUNCH(T, kVW, 32, 1); \
    else if (cfg.threads_per_row == 32) LAUNCH(T, kVW, 32, WARP_VECS);            \
    else if (cfg.threads_per_row == 64) LAUNCH(T, kVW, 64, 1);                    \
    else if (cfg.threads_per_row == 128) LAUNCH(T, kVW, 128, 1);                  \
    else if (cfg.threads_per_row == 256) LAUNCH(T, kVW, 256, 1);                  \
    else if (cfg.vecs == 1) LAUNCH(T, kVW, 512, 1);                               \
    else LAUNCH(T, kVW, 512, kWideVecs<T>);                                       \
  } while (0)

template <typename T>
cudaError_t forward_typed(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                          void* stream_out, float* mean, float* rstd, int64_t M, int N, float eps, bool aligned,
                          cudaStream_t stream) {
  const RowConfig cfg = pick_config<T>(N, aligned, false);
  const int64_t blocks = blocks_for(M, cfg, int64_t{1} << 20);
#define LAUNCH(TT, VW, TPR, VECS)                                                                              \
  add_layer_norm_forward_kernel<TT, VW, TPR, VECS><<<(unsigned)blocks, block_threads(cfg), 0, stream>>>(       \
      static_cast<const TT*>(x), static_cast<const TT*>(residual), static_cast<const TT*>(weight),             \
      static_cast<const TT*>(bias), static_cast<TT*>(y), static_cast<TT*>(stream_out), mean, rstd, M, N, eps)
  FUSEFORMER_LN_DISPATCH(T, cfg, aligned, 1, LAUNCH);
#undef LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* dy, const void* dstream, const void* stream_in, const void* weight,
                           const float* mean, const float* rstd, void* dh, void* dh_copy, float* dweight_partial, float* dbias_partial, int64_t M, int N, bool aligned,
                           int max_blocks, cudaStream_t stream) {
  const RowConfig cfg = pick_config<T>(N, aligned, true);
  const int64_t blocks = blocks_for(M, cfg, max_blocks);
#define LAUNCH(TT, VW, TPR, VECS)                                                                             \
  add_layer_norm_backward_kernel<TT, VW, TPR, VECS><<<(unsigned)blocks, block_threads(cfg), 0, stream>>>(     \
      static_cast<const TT*>(dy), static_cast<const TT*>(dstream), static_cast<const TT*>(stream_in),         \
      static_cast<const TT*>(weight), mean, rstd, static_cast<TT*>(dh), static_cast<TT*>(dh_copy),           \
      dweight_partial, dbias_partial, M, N)
  FUSEFORMER_LN_DISPATCH(T, cfg, aligned, kWarpVecs<T>, LAUNCH);
#undef LAUNCH
  return cudaGetLastError();
}

// Blocks of the backward resident at once on one SM, up to kBackwardBlocksPerSm: the grid the
// caller launches (add_layer_norm_backward's max_blocks) as one wave, each block walking its
// rows. The cap bounds the partial rows (one a block, written, then read by the sum kernel). By
// the launch bounds: N = 768 bf16 (warp rows) 4 blocks of 4 rows, as before; N = 2048 (256
// threads) 4 blocks, 8 rows of loads in flight an SM where the earlier backward had 2 blocks of
// 1; N = 4096 (512 threads) 2 blocks, 4 rows where it had 1; rows of at most 32 vectors (128
// threads of 4 warp rows) 8 blocks.
constexpr int kBackwardBlocksPerSm = 8;

template <typename T>
int backward_blocks_per_sm_typed(int N, bool aligned) {
  const RowConfig cfg = pick_config<T>(N, aligned, true);
  int blocks = 1;
  cudaError_t status = cudaSuccess;
#define LAUNCH(TT, VW, TPR, VECS) \
  status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, add_layer_norm_backward_kernel<TT, VW, TPR, VECS>, block_threads(cfg), 0)
  FUSEFORMER_LN_DISPATCH(T, cfg, aligned, kWarpVecs<T>, LAUNCH);
#undef LAUNCH
  if (status != cudaSuccess || blocks < 1) return 1;
  return blocks < kBackwardBlocksPerSm ? blocks : kBackwardBlocksPerSm;
}

template <typename T>
cudaError_t sum_partials_typed(const float* dweight_partial, const float* dbias_partial, void* dweight, void* dbias,
                               int64_t rows, int N, cudaStream_t stream) {
  add_layer_norm_sum_partials_kernel<T><<<ceil_div(N, kSumCols), kSumCols * kSumSlices, 0, stream>>>(
      dweight_partial, dbias_partial, static_cast<T*>(dweight), static_cast<T*>(dbias), rows, N);
  return cudaGetLastError();
}

}  // namespace

cudaError_t add_layer_norm_forward(DType dtype, const void* x, const void* residual, const void* weight,
                                   const void* bias, void* y, void* stream_out, float* mean, float* rstd,
                                   int64_t M, int N, float eps, bool aligned, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return forward_typed<__half>(x, residual, weight, bias, y, stream_out, mean, rstd, M, N, eps, aligned, stream);
    case DType::BF16: return forward_typed<__nv_bfloat16>(x, residual, weight, bias, y, stream_out, mean, rstd, M, N, eps, aligned, stream);
    case DType::F32: return forward_typed<float>(x, residual, weight, bias, y, stream_out, mean, rstd, M, N, eps, aligned, stream);
  }
  return cudaErrorInvalidValue;
}

int add_layer_norm_backward_blocks_per_sm(DType dtype, int N, bool aligned) {
  switch (dtype) {
    case DType::F16: return backward_blocks_per_sm_typed<__half>(N, aligned);
    case DType::BF16: return backward_blocks_per_sm_typed<__nv_bfloat16>(N, aligned);
    case DType::F32: return backward_blocks_per_sm_typed<float>(N, aligned);
  }
  return 1;
}

int64_t add_layer_norm_partial_rows(DType dtype, int64_t M, int N, bool aligned, int max_blocks) {
  if (M == 0) return 0;
  const RowConfig cfg = dtype == DType::F32 ? pick_config<float>(N, aligned, true) : pick_config<__half>(N, aligned, true);
  return blocks_for(M, cfg, max_blocks);  // one partial row per block
}

cudaError_t add_layer_norm_sum_partials(DType dtype, const float* dweight_partial, const float* dbias_partial,
                                        void* dweight, void* dbias, int64_t rows, int N, cudaStream_t stream) {
  if (dweight == nullptr && dbias == nullptr) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return sum_partials_typed<__half>(dweight_partial, dbias_partial, dweight, dbias, rows, N, stream);
    case DType::BF16: return sum_partials_typed<__nv_bfloat16>(dweight_partial, dbias_partial, dweight, dbias, rows, N, stream);
    case DType::F32: return sum_partials_typed<float>(dweight_partial, dbias_partial, dweight, dbias, rows, N, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_layer_norm_backward(DType dtype, const void* dy, const void* dstream, const void* stream_in,
                                    const void* weight, const float* mean, const float* rstd, void* dh,
                                    void* dh_copy, float* dweight_partial,
                                    float* dbias_partial, int64_t M, int N, bool aligned, int max_blocks,
                                    cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return backward_typed<__half>(dy, dstream, stream_in, weight, mean, rstd, dh, dh_copy, dweight_partial, dbias_partial, M, N, aligned, max_blocks, stream);
    case DType::BF16: return backward_typed<__nv_bfloat16>(dy, dstream, stream_in, weight, mean, rstd, dh, dh_copy, dweight_partial, dbias_partial, M, N, aligned, max_blocks, stream);
    case DType::F32: return backward_typed<float>(dy, dstream, stream_in, weight, mean, rstd, dh, dh_copy, dweight_partial, dbias_partial, M, N, aligned, max_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fuseformer
