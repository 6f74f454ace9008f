// Flash-style attention forward for fp16/bf16: one pass over the keys, no Lq x Lk matrix in
// memory, tensor-core (WMMA 16x16x16) products with fp32 accumulation.
//
// A block owns BM = 64 query rows of one (batch, head); each of its 4 warps owns 16 of them.
// For every tile of BN keys: S = Q K^T (WMMA, into shared memory), then per row the online
// softmax in base 2 (scores pre-multiplied by log2(e), so exp2 is one instruction):
//     m' = max(m, max_j s_j);  alpha = 2^(m - m');  p_j = 2^(s_j - m');  l' = l * alpha + sum_j p_j
//     O' = O * alpha + P V   (O kept in shared memory in fp32, since the row of each element
//                             of a WMMA accumulator fragment is unspecified)
// and at the end out = O / l, lse = (m + log2 l) * ln 2 (natural log, as the other backends).
// A row whose every key is masked ends with l = 0: out 0 and lse +inf (so exp(s - lse) = 0).
//
// Masks: causal (top-left aligned: query i sees key j <= i, as torch), and the key-padding
// fast path as an fp32 additive bias per (batch, key). Tiles past the causal diagonal, and
// past the last unmasked key of the batch (right padding), are skipped. Out-of-range rows and
// keys are zero-filled on load and masked to -inf, so any Lq, Lk works.
#include "attention_common.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

using namespace nvcuda;
using namespace attn;

constexpr int kBM = 64;

// Tile geometry. Leading dimensions are padded by 16 bytes so that consecutive rows start in
// different shared-memory banks; WMMA allows any multiple of 16 bytes.
template <typename T, int D>
struct Tile {
  static constexpr int BN = D > 64 ? 32 : 64;  // D = 128 with BN = 64 would exceed 99 KB (sm_86/89)
  static constexpr int kCols = BN / 32;        // scores per lane per row in the softmax
  static constexpr int QLD = D + 8;            // Q, K, V rows (T)
  static constexpr int SLD = BN + 4;           // scores (float)
  static constexpr int PLD = BN + 8;           // probabilities (T)
  static constexpr int OLD = D + 4;            // output accumulator (float)
  static constexpr size_t q_bytes = sizeof(T) * kBM * QLD;
  static constexpr size_t kv_bytes = sizeof(T) * BN * QLD;
  static constexpr size_t s_bytes = sizeof(float) * kBM * SLD;
  static constexpr size_t p_bytes = sizeof(T) * kBM * PLD;
  static constexpr size_t o_bytes = sizeof(float) * kBM * OLD;
  static constexpr size_t smem_bytes = q_bytes + 2 * kv_bytes + s_bytes + p_bytes + o_bytes;
  static_assert(D % 16 == 0, "WMMA needs head dims that are multiples of 16");
  static_assert(q_bytes % 32 == 0 && kv_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0,
                "every region must start 32-byte aligned for WMMA");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(AttentionParams p) {
  using G = Tile<T, D>;
  constexpr int BN = G::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::q_bytes);
  T* Vs = reinterpret_cast<T*>(smem + G::q_bytes + G::kv_bytes);
  float* Ss = reinterpret_cast<float*>(smem + G::q_bytes + 2 * G::kv_bytes);
  T* Ps = reinterpret_cast<T*>(smem + G::q_bytes + 2 * G::kv_bytes + G::s_bytes);
  float* Os = reinterpret_cast<float*>(smem + G::q_bytes + 2 * G::kv_bytes + G::s_bytes + G::p_bytes);

  // (batch, head) on x, which allows 2^31 - 1 of them; query tiles on y (65535 * 64 rows).
  const int q_start = blockIdx.y * kBM;
  const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);  // grouped-query attention: Hq / Hkv query heads per kv head
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
  const float* key_bias = p.key_bias == nullptr ? nullptr : p.key_bias + b * p.key_bias_batch_stride;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;  // this warp's first row within the tile
  float* S_w = Ss + row0 * G::SLD;
  T* P_w = Ps + row0 * G::PLD;
  float* O_w = Os + row0 * G::OLD;

  load_tile<T, D>(Qs, G::QLD, q, p.q_strides[2], q_start, kBM, p.Lq, p.aligned);
  for (int idx = threadIdx.x; idx < kBM * G::OLD; idx += kThreads) Os[idx] = 0.f;

  // Running max (base-2 units) and sum per row, replicated in every lane of the owning warp.
  float row_max[16], row_sum[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  int n_end = p.causal ? min(p.Lk, q_start + kBM) : p.Lk;
  if (p.key_end != nullptr) n_end = min(n_end, p.key_end[b]);

  for (int n_start = 0; n_start < n_end; n_start += BN) {
    __syncthreads();  // the previous tile's K and V are no longer read
    load_tile<T, D>(Ks, G::QLD, k, p.k_strides[2], n_start, BN, p.Lk, p.aligned);
    load_tile<T, D>(Vs, G::QLD, v, p.v_strides[2], n_start, BN, p.Lk, p.aligned);
    __syncthreads();
    // Under causal masking every key of this tile lies right of this warp's last row.
    if (p.causal && n_start > q_start + row0 + 15) continue;

    // S_w = Q_w K^T: K is stored (key, d) row-major, i.e. K^T column-major with ld QLD.
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, Qs + row0 * G::QLD + kt * 16, G::QLD);
        wmma::load_matrix_sync(bt, Ks + nt * 16 * G::QLD + kt * 16, G::QLD);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(S_w + nt * 16, acc, G::SLD, wmma::mem_row_major);
    }
    __syncwarp();

#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int qi = q_start + row0 + r;
      float s[G::kCols];
      float tile_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < G::kCols; ++c) {
        const int col = lane + 32 * c, kj = n_start + col;
        float score = S_w[r * G::SLD + col] * scale_log2;
        if (kj >= p.Lk || (p.causal && kj > qi)) {
          score = -INFINITY;
        } else if (key_bias != nullptr) {
          score += key_bias[kj] * kLog2e;
        }
        s[c] = score;
        tile_max = fmaxf(tile_max, score);
      }
      const float new_max = fmaxf(row_max[r], warp_max(tile_max));
      // While every key so far is masked the max is -inf; shift by 0 so that 2^(-inf) = 0
      // instead of 2^(-inf + inf) = NaN.
      const float shift = new_max == -INFINITY ? 0.f : new_max;
      const float alpha = exp2f(row_max[r] - shift);
      float tile_sum = 0.f;
#pragma unroll
      for (int c = 0; c < G::kCols; ++c) {
        const float prob = exp2f(s[c] - shift);
        tile_sum += prob;
        P_w[r * G::PLD + lane + 32 * c] = from_float<T>(prob);
      }
      row_sum[r] = row_sum[r] * alpha + warp_sum(tile_sum);
      row_max[r] = new_max;
      for (int d = lane; d < D; d += 32) O_w[r * G::OLD + d] *= alpha;
    }
    __syncwarp();

    // O_w += P_w V
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, O_w + dt * 16, G::OLD, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, P_w + kt * 16, G::PLD);
        wmma::load_matrix_sync(bv, Vs + kt * 16 * G::QLD + dt * 16, G::QLD);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(O_w + dt * 16, acc, G::OLD, wmma::mem_row_major);
    }
    __syncwarp();
  }
  // With no key tile at all (Lk = 0) the rows read below were zeroed by other warps.
  __syncthreads();

  T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + h * p.out_strides[1];
  float* lse = p.lse + ((int64_t)b * p.Hq + h) * p.Lq;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int qi = q_start + row0 + r;
    if (qi >= p.Lq) break;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    for (int d = lane; d < D; d += 32) out[qi * p.out_strides[2] + d] = from_float<T>(O_w[r * G::OLD + d] * inv);
    if (lane == 0) lse[qi] = row_sum[r] > 0.f ? (row_max[r] + log2f(row_sum[r])) * kLn2 : INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = Tile<T, D>::smem_bytes;
  // Above 48 KB of dynamic shared memory a kernel must opt in; cheap, so done on every call
  // (the attribute is per device and the current device may change between calls).
  cudaError_t err = cudaFuncSetAttribute(attention_forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.B * p.Hq, ceil_div(p.Lq, kBM));
  attention_forward_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionParams& p, cudaStream_t stream) {
#define FUSEFORMER_CASE(HD) \
  if (p.D == HD) return launch<T, HD>(p, stream);
  FUSEFORMER_ATTENTION_HEAD_DIMS(FUSEFORMER_CASE)
#undef FUSEFORMER_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

bool attention_forward_supports_head_dim(int head_dim) {
#define FUSEFORMER_CASE(HD) \
  if (head_dim == HD) return true;
  FUSEFORMER_ATTENTION_HEAD_DIMS(FUSEFORMER_CASE)
#undef FUSEFORMER_CASE
  return false;
}

cudaError_t attention_forward(DType dtype, const AttentionParams& p, cudaStream_t stream) {
  if (p.Lq == 0 || p.B == 0 || p.Hq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return dispatch_head_dim<__half>(p, stream);
    case DType::BF16: return dispatch_head_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;  // fp32 attention is left to the other backends
  }
}

}  // namespace fuseformer
