// Flash-style attention backward for fp16/bf16, recomputing the probabilities from the
// forward's logsumexp instead of storing them. With s = scale * q.k + bias (natural units),
// p = exp(s - lse), delta_i = sum_d dout_id * out_id (computed by the caller):
//     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale * dS K,   dK = scale * dS^T Q
// Two kernels, so that no gradient needs atomics:
//   dq kernel:   a block owns 64 query rows (16 per warp, like the forward), loops over keys;
//   dkdv kernel: a block owns 64 keys of one kv head (16 per warp) and loops over the query
//                heads of its group (GQA sums happen in registers/shared memory) and their
//                query tiles of 32 (one query per lane in the elementwise step).
// Products are WMMA 16x16x16 with fp32 accumulation; the accumulators live in shared memory
// in fp32 (a fragment's element-to-row mapping is unspecified). Masking matches the forward:
// causal top-left, key-padding bias, key_end tiles skipped; rows with lse = +inf (every key
// masked) get p = 0 and so zero gradients.
#include "attention_common.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

using namespace nvcuda;
using namespace attn;

// ---- dQ ------------------------------------------------------------------------------------

constexpr int kQRows = 64;  // query rows per dq block

template <typename T, int D>
struct DqTile {
  static constexpr int BN = D > 64 ? 32 : 64;
  static constexpr int kCols = BN / 32;
  static constexpr int QLD = D + 8, SLD = BN + 4, PLD = BN + 8, OLD = D + 4;
  static constexpr size_t q_bytes = sizeof(T) * kQRows * QLD;  // Q and dO
  static constexpr size_t kv_bytes = sizeof(T) * BN * QLD;     // K and V
  static constexpr size_t s_bytes = sizeof(float) * kQRows * SLD;  // S and dP
  static constexpr size_t p_bytes = sizeof(T) * kQRows * PLD;      // dS
  static constexpr size_t o_bytes = sizeof(float) * kQRows * OLD;  // dQ accumulator
  static constexpr size_t smem_bytes = 2 * q_bytes + 2 * kv_bytes + 2 * s_bytes + p_bytes + o_bytes;
  static_assert(D % 16 == 0, "WMMA needs head dims that are multiples of 16");
  static_assert(q_bytes % 32 == 0 && kv_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0,
                "every region must start 32-byte aligned for WMMA");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(AttentionBackwardParams bp) {
  using G = DqTile<T, D>;
  constexpr int BN = G::BN;
  const AttentionParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = reinterpret_cast<T*>(smem + G::q_bytes);
  T* Ks = reinterpret_cast<T*>(smem + 2 * G::q_bytes);
  T* Vs = reinterpret_cast<T*>(smem + 2 * G::q_bytes + G::kv_bytes);
  float* Ss = reinterpret_cast<float*>(smem + 2 * G::q_bytes + 2 * G::kv_bytes);
  float* dPs = reinterpret_cast<float*>(smem + 2 * G::q_bytes + 2 * G::kv_bytes + G::s_bytes);
  T* dSs = reinterpret_cast<T*>(smem + 2 * G::q_bytes + 2 * G::kv_bytes + 2 * G::s_bytes);
  float* dQs = reinterpret_cast<float*>(smem + 2 * G::q_bytes + 2 * G::kv_bytes + 2 * G::s_bytes + G::p_bytes);

  const int q_start = blockIdx.y * kQRows;
  const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq;
  const int hk = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
  const T* dout = static_cast<const T*>(bp.dout) + b * bp.dout_strides[0] + h * bp.dout_strides[1];
  const float* key_bias = p.key_bias == nullptr ? nullptr : p.key_bias + b * p.key_bias_batch_stride;
  const int64_t row_base = ((int64_t)b * p.Hq + h) * p.Lq;  // into lse, delta, dq

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;
  float* S_w = Ss + row0 * G::SLD;
  float* dP_w = dPs + row0 * G::SLD;
  T* dS_w = dSs + row0 * G::PLD;
  float* dQ_w = dQs + row0 * G::OLD;

  load_tile<T, D>(Qs, G::QLD, q, p.q_strides[2], q_start, kQRows, p.Lq, p.aligned);
  load_tile<T, D>(dOs, G::QLD, dout, bp.dout_strides[2], q_start, kQRows, p.Lq, p.aligned);
  for (int idx = threadIdx.x; idx < kQRows * G::OLD; idx += kThreads) dQs[idx] = 0.f;

  // Rows past Lq get lse = +inf, so p = 0 there.
  float lse2[16], delta[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int qi = q_start + row0 + r;
    lse2[r] = qi < p.Lq ? p.lse[row_base + qi] * kLog2e : INFINITY;
    delta[r] = qi < p.Lq ? bp.delta[row_base + qi] : 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  int n_end = p.causal ? min(p.Lk, q_start + kQRows) : p.Lk;
  if (p.key_end != nullptr) n_end = min(n_end, p.key_end[b]);

  for (int n_start = 0; n_start < n_end; n_start += BN) {
    __syncthreads();
    load_tile<T, D>(Ks, G::QLD, k, p.k_strides[2], n_start, BN, p.Lk, p.aligned);
    load_tile<T, D>(Vs, G::QLD, v, p.v_strides[2], n_start, BN, p.Lk, p.aligned);
    __syncthreads();
    if (p.causal && n_start > q_start + row0 + 15) continue;

    // S_w = Q_w K^T and dP_w = dO_w V^T (K, V stored (key, d): their transposes are col-major).
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
      wmma::fill_fragment(s_acc, 0.f);
      wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
      for (int kt = 0; kt < D / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, Qs + row0 * G::QLD + kt * 16, G::QLD);
        wmma::load_matrix_sync(bt, Ks + nt * 16 * G::QLD + kt * 16, G::QLD);
        wmma::mma_sync(s_acc, a, bt, s_acc);
        wmma::load_matrix_sync(a, dOs + row0 * G::QLD + kt * 16, G::QLD);
        wmma::load_matrix_sync(bt, Vs + nt * 16 * G::QLD + kt * 16, G::QLD);
        wmma::mma_sync(dp_acc, a, bt, dp_acc);
      }
      wmma::store_matrix_sync(S_w + nt * 16, s_acc, G::SLD, wmma::mem_row_major);
      wmma::store_matrix_sync(dP_w + nt * 16, dp_acc, G::SLD, wmma::mem_row_major);
    }
    __syncwarp();

#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int qi = q_start + row0 + r;
#pragma unroll
      for (int c = 0; c < G::kCols; ++c) {
        const int col = lane + 32 * c, kj = n_start + col;
        float prob = 0.f;
        if (kj < p.Lk && !(p.causal && kj > qi)) {
          float s2 = S_w[r * G::SLD + col] * scale_log2;
          if (key_bias != nullptr) s2 += key_bias[kj] * kLog2e;
          prob = exp2f(s2 - lse2[r]);
        }
        dS_w[r * G::PLD + col] = from_float<T>(prob * (dP_w[r * G::SLD + col] - delta[r]));
      }
    }
    __syncwarp();

    // dQ_w += dS_w K
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, dQ_w + dt * 16, G::OLD, wmma::mem_row_major);
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bk;
        wmma::load_matrix_sync(a, dS_w + kt * 16, G::PLD);
        wmma::load_matrix_sync(bk, Ks + kt * 16 * G::QLD + dt * 16, G::QLD);
        wmma::mma_sync(acc, a, bk, acc);
      }
      wmma::store_matrix_sync(dQ_w + dt * 16, acc, G::OLD, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();  // with no key tile at all, the rows below were zeroed by other warps

  T* dq = static_cast<T*>(bp.dq) + row_base * D;
  for (int r = 0; r < 16; ++r) {
    const int qi = q_start + row0 + r;
    if (qi >= p.Lq) break;
    for (int d = lane; d < D; d += 32) dq[(int64_t)qi * D + d] = from_float<T>(dQ_w[r * G::OLD + d] * p.scale);
  }
}

// ---- dK, dV --------------------------------------------------------------------------------

constexpr int kKeys = 64;      // keys per dkdv block (16 per warp)
constexpr int kQueries = 32;   // query rows per inner tile: one per lane

template <typename T, int D>
struct DkvTile {
  static constexpr int QLD = D + 8, SLD = kQueries + 4, PLD = kQueries + 8, OLD = D + 4;
  static constexpr size_t kv_bytes = sizeof(T) * kKeys * QLD;       // K and V
  static constexpr size_t q_bytes = sizeof(T) * kQueries * QLD;     // Q and dO
  static constexpr size_t s_bytes = sizeof(float) * kKeys * SLD;    // S^T and dP^T
  static constexpr size_t p_bytes = sizeof(T) * kKeys * PLD;        // P^T and dS^T
  static constexpr size_t acc_bytes = sizeof(float) * kKeys * OLD;  // dK and dV
  static constexpr size_t row_bytes = sizeof(float) * kQueries;     // lse (base 2) and delta
  static constexpr size_t smem_bytes = 2 * kv_bytes + 2 * q_bytes + 2 * s_bytes + 2 * p_bytes + 2 * acc_bytes + 2 * row_bytes;
  static_assert(D % 16 == 0, "WMMA needs head dims that are multiples of 16");
  static_assert(kv_bytes % 32 == 0 && q_bytes % 32 == 0 && s_bytes % 32 == 0 && p_bytes % 32 == 0 && acc_bytes % 32 == 0,
                "every region must start 32-byte aligned for WMMA");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(AttentionBackwardParams bp) {
  using G = DkvTile<T, D>;
  const AttentionParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* at = smem;
  T* Ks = reinterpret_cast<T*>(at);            at += G::kv_bytes;
  T* Vs = reinterpret_cast<T*>(at);            at += G::kv_bytes;
  T* Qs = reinterpret_cast<T*>(at);            at += G::q_bytes;
  T* dOs = reinterpret_cast<T*>(at);           at += G::q_bytes;
  float* St = reinterpret_cast<float*>(at);    at += G::s_bytes;
  float* dPt = reinterpret_cast<float*>(at);   at += G::s_bytes;
  T* Pt = reinterpret_cast<T*>(at);            at += G::p_bytes;
  T* dSt = reinterpret_cast<T*>(at);           at += G::p_bytes;
  float* dKs = reinterpret_cast<float*>(at);   at += G::acc_bytes;
  float* dVs = reinterpret_cast<float*>(at);   at += G::acc_bytes;
  float* lse2_s = reinterpret_cast<float*>(at); at += G::row_bytes;
  float* delta_s = reinterpret_cast<float*>(at);

  const int n_start = blockIdx.y * kKeys;
  const int b = blockIdx.x / p.Hkv, hk = blockIdx.x % p.Hkv;
  const int group = p.Hq / p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
  const float* key_bias = p.key_bias == nullptr ? nullptr : p.key_bias + b * p.key_bias_batch_stride;
  const int key_end = p.key_end == nullptr ? p.Lk : min(p.Lk, p.key_end[b]);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;  // this warp's first key within the tile
  float* St_w = St + row0 * G::SLD;
  float* dPt_w = dPt + row0 * G::SLD;
  T* Pt_w = Pt + row0 * G::PLD;
  T* dSt_w = dSt + row0 * G::PLD;
  float* dK_w = dKs + row0 * G::OLD;
  float* dV_w = dVs + row0 * G::OLD;

  load_tile<T, D>(Ks, G::QLD, k, p.k_strides[2], n_start, kKeys, p.Lk, p.aligned);
  load_tile<T, D>(Vs, G::QLD, v, p.v_strides[2], n_start, kKeys, p.Lk, p.aligned);
  for (int idx = threadIdx.x; idx < kKeys * G::OLD; idx += kThreads) dKs[idx] = dVs[idx] = 0.f;
  const float scale_log2 = p.scale * kLog2e;

  // Keys at or past key_end are masked for every query: their gradients stay zero.
  const int m_first = p.causal ? (n_start / kQueries) * kQueries : 0;  // earlier queries see none of these keys
  for (int g = 0; g < group && n_start < key_end; ++g) {
    const int h = hk * group + g;
    const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
    const T* dout = static_cast<const T*>(bp.dout) + b * bp.dout_strides[0] + h * bp.dout_strides[1];
    const int64_t row_base = ((int64_t)b * p.Hq + h) * p.Lq;
    for (int m_start = m_first; m_start < p.Lq; m_start += kQueries) {
      __syncthreads();  // the previous tile's Q, dO, lse and delta are no longer read
      load_tile<T, D>(Qs, G::QLD, q, p.q_strides[2], m_start, kQueries, p.Lq, p.aligned);
      load_tile<T, D>(dOs, G::QLD, dout, bp.dout_strides[2], m_start, kQueries, p.Lq, p.aligned);
      if (threadIdx.x < kQueries) {
        const int qi = m_start + threadIdx.x;
        lse2_s[threadIdx.x] = qi < p.Lq ? p.lse[row_base + qi] * kLog2e : INFINITY;
        delta_s[threadIdx.x] = qi < p.Lq ? bp.delta[row_base + qi] : 0.f;
      }
      __syncthreads();
      // Causal: every query of this tile lies before every key of this warp.
      if (p.causal && m_start + kQueries - 1 < n_start + row0) continue;

      // S^T_w = K_w Q^T and dP^T_w = V_w dO^T (Q, dO stored (query, d): transposes col-major).
#pragma unroll
      for (int nt = 0; nt < kQueries / 16; ++nt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
        wmma::fill_fragment(s_acc, 0.f);
        wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
        for (int kt = 0; kt < D / 16; ++kt) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
          wmma::load_matrix_sync(a, Ks + row0 * G::QLD + kt * 16, G::QLD);
          wmma::load_matrix_sync(bt, Qs + nt * 16 * G::QLD + kt * 16, G::QLD);
          wmma::mma_sync(s_acc, a, bt, s_acc);
          wmma::load_matrix_sync(a, Vs + row0 * G::QLD + kt * 16, G::QLD);
          wmma::load_matrix_sync(bt, dOs + nt * 16 * G::QLD + kt * 16, G::QLD);
          wmma::mma_sync(dp_acc, a, bt, dp_acc);
        }
        wmma::store_matrix_sync(St_w + nt * 16, s_acc, G::SLD, wmma::mem_row_major);
        wmma::store_matrix_sync(dPt_w + nt * 16, dp_acc, G::SLD, wmma::mem_row_major);
      }
      __syncwarp();

      const int qi = m_start + lane;
      const float lse2 = lse2_s[lane], delta = delta_s[lane];
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const int kj = n_start + row0 + r;
        float prob = 0.f;
        if (kj < key_end && qi < p.Lq && !(p.causal && kj > qi)) {
          float s2 = St_w[r * G::SLD + lane] * scale_log2;
          if (key_bias != nullptr) s2 += key_bias[kj] * kLog2e;
          prob = exp2f(s2 - lse2);
        }
        Pt_w[r * G::PLD + lane] = from_float<T>(prob);
        dSt_w[r * G::PLD + lane] = from_float<T>(prob * (dPt_w[r * G::SLD + lane] - delta));
      }
      __syncwarp();

      // dV_w += P^T_w dO,  dK_w += dS^T_w Q
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> dv_acc, dk_acc;
        wmma::load_matrix_sync(dv_acc, dV_w + dt * 16, G::OLD, wmma::mem_row_major);
        wmma::load_matrix_sync(dk_acc, dK_w + dt * 16, G::OLD, wmma::mem_row_major);
#pragma unroll
        for (int kt = 0; kt < kQueries / 16; ++kt) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bq;
          wmma::load_matrix_sync(a, Pt_w + kt * 16, G::PLD);
          wmma::load_matrix_sync(bq, dOs + kt * 16 * G::QLD + dt * 16, G::QLD);
          wmma::mma_sync(dv_acc, a, bq, dv_acc);
          wmma::load_matrix_sync(a, dSt_w + kt * 16, G::PLD);
          wmma::load_matrix_sync(bq, Qs + kt * 16 * G::QLD + dt * 16, G::QLD);
          wmma::mma_sync(dk_acc, a, bq, dk_acc);
        }
        wmma::store_matrix_sync(dV_w + dt * 16, dv_acc, G::OLD, wmma::mem_row_major);
        wmma::store_matrix_sync(dK_w + dt * 16, dk_acc, G::OLD, wmma::mem_row_major);
      }
      __syncwarp();
    }
  }
  __syncthreads();  // the zeroed accumulators of skipped blocks were written by other warps

  const int64_t kv_base = ((int64_t)b * p.Hkv + hk) * p.Lk;
  T* dk = static_cast<T*>(bp.dk) + kv_base * D;
  T* dv = static_cast<T*>(bp.dv) + kv_base * D;
  for (int r = 0; r < 16; ++r) {
    const int kj = n_start + row0 + r;
    if (kj >= p.Lk) break;
    for (int d = lane; d < D; d += 32) {
      dk[(int64_t)kj * D + d] = from_float<T>(dK_w[r * G::OLD + d] * p.scale);
      dv[(int64_t)kj * D + d] = from_float<T>(dV_w[r * G::OLD + d]);
    }
  }
}

template <typename KernelT>
cudaError_t launch_with_smem(KernelT kernel, dim3 grid, size_t smem, const AttentionBackwardParams& bp,
                             cudaStream_t stream) {
  // Above 48 KB of dynamic shared memory a kernel must opt in (per device, so on every call).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(bp);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch(const AttentionBackwardParams& bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  // A grid dimension of 0 is an invalid launch: with no query there is no dq to write (and
  // dk, dv come out zero from the dkdv kernel), with no key no dk, dv.
  if (p.Lq > 0) {
    const cudaError_t err = launch_with_smem(attention_backward_dq_kernel<T, D>,
                                             dim3(p.B * p.Hq, ceil_div(p.Lq, kQRows)), DqTile<T, D>::smem_bytes, bp,
                                             stream);
    if (err != cudaSuccess) return err;
  }
  if (p.Lk == 0) return cudaSuccess;
  return launch_with_smem(attention_backward_dkdv_kernel<T, D>, dim3(p.B * p.Hkv, ceil_div(p.Lk, kKeys)),
                          DkvTile<T, D>::smem_bytes, bp, stream);
}

template <typename T>
cudaError_t dispatch_head_dim(const AttentionBackwardParams& bp, cudaStream_t stream) {
#define FUSEFORMER_CASE(HD) \
  if (bp.fwd.D == HD) return launch<T, HD>(bp, stream);
  FUSEFORMER_ATTENTION_HEAD_DIMS(FUSEFORMER_CASE)
#undef FUSEFORMER_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t attention_backward(DType dtype, const AttentionBackwardParams& bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  if (p.B == 0 || p.Hq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return dispatch_head_dim<__half>(bp, stream);
    case DType::BF16: return dispatch_head_dim<__nv_bfloat16>(bp, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fuseformer
