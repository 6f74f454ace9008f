// Attention backward on CUTLASS's CuTe (FlashAttention-2's structure), fp16/bf16, head dims 64
// and 128: the backward of attention_cute.cu (and of attention_forward.cu: both write the same
// out and natural-log lse). Same AttentionBackwardParams and outputs as attention_backward.cu
// (dq, dk, dv in the input dtype, contiguous; dk, dv summed over the query heads of a GQA group).
//
// Maths (s = scale q.k + bias in natural units, p = exp(s - lse), delta_i = sum_d dO_id O_id):
//     dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q
// Three kernels:
//   preprocess: delta = rowsum(dO * O) in fp32; zeroes the fp32 dQ accumulator
//               (attention_backward_rows.cu, shared with the Hopper backward).
//   main:       one block per (batch, kv head, kBlockN keys); dK and dV stay in registers while
//               it walks the query tiles of every query head of the GQA group (the group sum
//               happens in registers: no atomics, no race on dK/dV). Per query tile it
//               recomputes S^T = K Q^T, P^T = 2^(S^T scale log2e + bias log2e - lse log2e),
//               dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and
//               dQ_tile = dS K, which it adds into the fp32 accumulator with atomicAdd
//               (fp32x2 vectors on sm_90: add_dq).
//   convert:    dq = scale * accumulator, in the input dtype (attention_backward_rows.cu too).
// Why atomics for dQ rather than a separate dQ kernel: a dQ kernel would recompute S and dP
// (2 of the 7 GEMMs), i.e. 40% more tensor-core work than the 5 GEMMs here, and re-read K, V
// for every query tile; the price is an fp32 buffer of dq's size and a dq summed in a
// nondeterministic order (fp32, rounded once at the end: differences far below the fp16/bf16
// rounding of the result).
//
// Layout trick: the block computes S^T and dP^T (keys as rows), not S and dP. Its warps are
// stacked along the keys, so a warp owns whole rows of S^T, dV and dK; the C fragment of P^T
// (and of dS^T) is then, reshaped in registers, the A operand of dV += P^T dO (dK += dS^T Q),
// exactly as the forward feeds P into O += P V. Only dS goes through shared memory, for dQ,
// whose rows are queries. Q, dO (and lse, delta) of the next query tile are in flight (cp.async)
// while the block computes with the current one: for the whole iteration at head dim 64 (two
// stages), during the dQ product at 128 (one stage, to stay within 99 KB); K, V are loaded once.
//
// Masks as in the forward: causal (top-left), the per-(batch, key) fp32 bias, keys at or past
// key_end (per batch) or Lk get p = 0; blocks whose keys are all past key_end (or, causal, past
// the last query) only write zeros. Rows with lse = +inf (every key masked) give p = 0, so zero
// gradients. Rows past Lq are zero-filled and masked.
//
// Written and compiled without a GPU (see csrc/README.md); it has not run yet.
#include <cutlass/array.h>

#include "attention_cute.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

using namespace cute;
using namespace cute_attn;

// Tiles by head dim: the largest that ptxas (nvcc 13.0, -O3, sm_80 and sm_90a) compiles
// without spills and that keep shared memory within the 99 KB of sm_86/sm_89; see csrc/README.md.
template <int kHeadDim>
struct CuteBwdTiles;
template <>
struct CuteBwdTiles<64> {
  static constexpr int kBlockN = 128, kBlockM = 64, kNWarps = 8, kStages = 2;
};
template <>
struct CuteBwdTiles<128> {
  static constexpr int kBlockN = 128, kBlockM = 32, kNWarps = 8, kStages = 1;
};

template <typename Element_, int kHeadDim_>
struct CuteAttnBwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = CuteBwdTiles<kHeadDim>::kBlockN;  // keys of the block
  static constexpr int kBlockM = CuteBwdTiles<kHeadDim>::kBlockM;  // queries per inner tile
  static constexpr int kNWarps = CuteBwdTiles<kHeadDim>::kNWarps;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "the swizzled 64-column smem atom needs head dims that are multiples of 64");
  static_assert(kBlockN % (16 * kNWarps) == 0, "every warp owns whole 16-key row tiles");
  static_assert(kBlockM == 32 || kBlockM % 64 == 0, "dS's smem atom is 32 or 64 queries wide");

  // S^T, dP^T, dV, dK: (keys, *), warps along the keys.
  using TiledMmaKV = TiledMmaFor<Element, kNWarps>;
  // dQ = dS K: (queries, head dim), as many warps along the queries as 16-row tiles fit.
  static constexpr int kWarpsMdQ = kBlockM / 16 < kNWarps ? kBlockM / 16 : kNWarps;
  using TiledMmaDq = TiledMmaFor<Element, kWarpsMdQ, kNWarps / kWarpsMdQ>;

  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom<64>{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // Q, dO
  using SmemLayoutQt = Transposed<SmemLayoutQ>;  // (D, M): B operand of dK += dS^T Q, dV += P^T dO
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom<64>{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // dQ = dS K is computed 64 head-dim columns at a time (fewer live registers). The
  // column-major tiling of the 64-column smem atom makes columns [64 j, 64 j + 64) of K one
  // (N, 64) tile of its own at offset 64 j N, read as (64, N): the B operand.
  static constexpr int kDqCols = 64;
  using SmemLayoutKChunk = decltype(tile_to_shape(SmemLayoutAtom<64>{}, Shape<Int<kBlockN>, Int<kDqCols>>{}));
  using SmemLayoutKtChunk = Transposed<SmemLayoutKChunk>;
  using SmemLayoutdS = decltype(tile_to_shape(SmemLayoutAtom<kBlockM == 32 ? 32 : 64>{}, Shape<Int<kBlockN>, Int<kBlockM>>{}));  // dS^T
  using SmemLayoutdSt = Transposed<SmemLayoutdS>;  // (M, N): A operand of dQ = dS K

  using GmemTiledCopy = cute_attn::GmemTiledCopy<Element, kNThreads>;

  // Q, dO, lse, delta: 2 = double-buffered (the next tile loads during the whole iteration),
  // 1 = the next tile loads during the dQ product only.
  static constexpr int kStages = CuteBwdTiles<kHeadDim>::kStages;
  static constexpr int kKVElems = cosize(SmemLayoutKV{});
  static constexpr int kQElems = cosize(SmemLayoutQ{});
  static constexpr int kdSElems = cosize(SmemLayoutdS{});
  // K, V; per stage Q, dO; dS^T; per stage lse, delta (fp32).
  static constexpr int kSmemBytes = (2 * kKVElems + 2 * kStages * kQElems + kdSElems) * int(sizeof(Element)) +
                                    2 * kStages * kBlockM * int(sizeof(float));
  static_assert(kSmemBytes <= 99 * 1024, "over the 99 KB a block may have on sm_86/sm_89");
};

// dQ accumulator += acc, element i of the MMA's C fragment to address &gdq(i), rows at or past
// q_rows (coordinate tile cdq) left out. On sm_90 two at a time: the fragment's values come in
// pairs of neighbouring columns of one row (SM80's 16x8 C layout: (row g, columns 2t and 2t + 1),
// then row g + 8), 8-byte aligned in the row-major accumulator, and Hopper has an fp32x2 vector
// reduction (atomicAdd on float2, compute capability 9.x): half the atomics, each of 8 bytes.
// Elsewhere one fp32 atomic per element.
template <class Acc, class Gmem, class Coord>
__device__ __forceinline__ void add_dq(const Acc& acc, Gmem& gdq, const Coord& cdq, int q_rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The pairing, from the layouts themselves: the fragment's first mode is (2 columns, 2 row
  // halves) and its first value step is one column, 1 element apart in the accumulator.
  static_assert(decltype(size<0, 0>(acc))::value == 2, "C fragment values do not come in column pairs");
  static_assert(decltype(stride<0, 0>(gdq))::value == 1, "paired C values are not neighbours in the dQ accumulator");
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2)
    if (get<0>(cdq(i)) < q_rows)
      atomicAdd(reinterpret_cast<float2*>(&gdq(i)), make_float2(acc(i), acc(i + 1)));
#else
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i)
    if (get<0>(cdq(i)) < q_rows) atomicAdd(&gdq(i), acc(i));
#endif
}

// Scores S^T (rows: keys, cols: queries) to probabilities P^T in place. `row_bias` holds each
// row's bias in base-2 units (-inf for keys past the key limit); lse is per column (query).
// MASKED: the tile crosses the causal diagonal or the end of the queries.
template <bool MASKED, typename S, typename C>
CUTE_DEVICE void scores_to_probs(S& s, C const& coords, const float* row_bias, const float* lse, float scale_log2,
                                 int n0, int m0, int q_limit, bool causal) {
  CUTE_UNROLL
  for (int c = 0; c < size<1>(s); ++c) {
    const int col = get<1>(coords(0, c));
    const float lse2 = lse[col] * kLog2e;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float x = s(r, c) * scale_log2 + (row_bias[r] - lse2);
      if constexpr (MASKED) {
        const int query = m0 + col, key = n0 + get<0>(coords(r, c));
        if (query >= q_limit || (causal && key > query)) x = -INFINITY;
      }
      s(r, c) = exp2f(x);
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) attention_backward_cute_kernel(const AttentionBackwardParams bp) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  const AttentionParams& p = bp.fwd;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int n_block = blockIdx.y, n0 = n_block * kBlockN;
  const int b = blockIdx.x / p.Hkv, h_kv = blockIdx.x % p.Hkv;
  const int group = p.Hq / p.Hkv;  // GQA: query heads h_kv * group ... share this K/V head
  const int tid = threadIdx.x;

  int key_limit = p.Lk;
  if (p.key_end != nullptr) key_limit = min(key_limit, p.key_end[b]);
  // Causal: a query before the block's first key sees none of its keys.
  const int m_first = p.causal ? n0 / kBlockM : 0;
  const int m_count = (p.Lq + kBlockM - 1) / kBlockM - m_first;
  const bool has_work = n0 < key_limit && m_count > 0 && !(p.causal && n0 >= p.Lq);
  const int n_iters = has_work ? group * m_count : 0;  // (query head, query tile) pairs

  auto* k_ptr = static_cast<const Element*>(p.k) + b * p.k_strides[0] + h_kv * p.k_strides[1];
  auto* v_ptr = static_cast<const Element*>(p.v) + b * p.v_strides[0] + h_kv * p.v_strides[1];
  const int64_t dkv_offset = (int64_t(b) * p.Hkv + h_kv) * p.Lk * kHeadDim;  // dk, dv: contiguous
  const float* bias_ptr = p.key_bias == nullptr ? nullptr : p.key_bias + b * p.key_bias_batch_stride;
  const float scale_log2 = p.scale * kLog2e;

  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(p.Lk, Int<kHeadDim>{}), make_stride(p.k_strides[2], _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(p.Lk, Int<kHeadDim>{}), make_stride(p.v_strides[2], _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Traits::kKVElems), typename Traits::SmemLayoutKV{});
  Element* const q_base = smem + 2 * Traits::kKVElems;
  // Stage s holds Q at q_smem(s, 0) and dO at q_smem(s, 1).
  auto q_smem = [&](int stage, int is_do) { return make_smem_ptr(q_base + (2 * stage + is_do) * Traits::kQElems); };
  auto sQ_at = [&](int stage, int is_do) { return make_tensor(q_smem(stage, is_do), typename Traits::SmemLayoutQ{}); };
  auto sQt_at = [&](int stage, int is_do) { return make_tensor(q_smem(stage, is_do), typename Traits::SmemLayoutQt{}); };
  Element* const ds_base = q_base + 2 * Traits::kStages * Traits::kQElems;
  Tensor sdS = make_tensor(make_smem_ptr(ds_base), typename Traits::SmemLayoutdS{});    // dS^T (N, M)
  Tensor sdSt = make_tensor(make_smem_ptr(ds_base), typename Traits::SmemLayoutdSt{});  // dS (M, N)
  float* const rows_base = reinterpret_cast<float*>(ds_base + Traits::kdSElems);
  auto lse_at = [&](int stage) { return rows_base + 2 * stage * kBlockM; };  // natural-log lse per query
  auto delta_at = [&](int stage) { return rows_base + (2 * stage + 1) * kBlockM; };

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  // Iteration `it` is query head h_kv * group + it / m_count, query tile m_first + it % m_count.
  auto head_of = [&](int it) { return h_kv * group + it / m_count; };
  auto m_block_of = [&](int it) { return m_first + it % m_count; };
  // Q, dO, lse and delta of iteration `it` into stage `stage`: rows past Lq zero-filled.
  auto load_query_tile = [&](int it, int stage) {
    const int h = head_of(it), m_block = m_block_of(it);
    auto* q_ptr = static_cast<const Element*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
    auto* do_ptr = static_cast<const Element*>(bp.dout) + b * bp.dout_strides[0] + h * bp.dout_strides[1];
    Tensor gQ = local_tile(make_tensor(make_gmem_ptr(q_ptr), make_shape(p.Lq, Int<kHeadDim>{}),
                                       make_stride(p.q_strides[2], _1{})),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
    Tensor gdO = local_tile(make_tensor(make_gmem_ptr(do_ptr), make_shape(p.Lq, Int<kHeadDim>{}),
                                        make_stride(bp.dout_strides[2], _1{})),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
    const int rows = p.Lq - m_block * kBlockM;
    load_rows(gmem_copy, gmem_thr.partition_S(gQ), gmem_thr.partition_D(sQ_at(stage, 0)), tQcQ, rows);
    load_rows(gmem_copy, gmem_thr.partition_S(gdO), gmem_thr.partition_D(sQ_at(stage, 1)), tQcQ, rows);
    const int64_t row0 = (int64_t(b) * p.Hq + h) * p.Lq + m_block * kBlockM;  // into lse, delta
    for (int i = tid; i < kBlockM; i += kNThreads) {
      const bool in = i < rows;  // past Lq: zero-filled (its column is masked), address kept in bounds
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<float>::copy(p.lse[in ? row0 + i : row0], lse_at(stage)[i], in);
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<float>::copy(bp.delta[in ? row0 + i : row0], delta_at(stage)[i], in);
    }
  };

  // ---- dK, dV products: rows are keys ----
  typename Traits::TiledMmaKV mma_kv;
  auto thr_kv = mma_kv.get_thread_slice(tid);
  Tensor tSrK = thr_kv.partition_fragment_A(sK);                 // (MMA, MMA_N, MMA_D)
  Tensor tSrV = thr_kv.partition_fragment_A(sV);
  Tensor tSrQ = thr_kv.partition_fragment_B(sQ_at(0, 0));        // (MMA, MMA_M, MMA_D)
  Tensor tSrdO = thr_kv.partition_fragment_B(sQ_at(0, 1));
  using QtNoSwizzle = decltype(get_nonswizzle_portion(typename Traits::SmemLayoutQt{}));
  Tensor tKVrQt = thr_kv.partition_fragment_B(make_tensor(q_base, QtNoSwizzle{}));  // (MMA, MMA_D, MMA_M)
  Tensor tKVrdOt = thr_kv.partition_fragment_B(make_tensor(q_base, QtNoSwizzle{}));
  Tensor acc_dk = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});  // (MMA, MMA_N, MMA_D)
  Tensor acc_dv = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto copy_a_kv = make_tiled_copy_A(SmemCopyAtom<Element>{}, mma_kv);
  auto thr_a_kv = copy_a_kv.get_thread_slice(tid);
  Tensor tSsK = thr_a_kv.partition_S(sK);
  Tensor tSsV = thr_a_kv.partition_S(sV);
  auto copy_b_kv = make_tiled_copy_B(SmemCopyAtom<Element>{}, mma_kv);
  auto thr_b_kv = copy_b_kv.get_thread_slice(tid);
  auto copy_bt_kv = make_tiled_copy_B(SmemCopyAtomTransposed<Element>{}, mma_kv);
  auto thr_bt_kv = copy_bt_kv.get_thread_slice(tid);
  auto copy_ds_store = make_tiled_copy_C(SmemCopyAtomStore<Element>{}, mma_kv);
  auto thr_ds_store = copy_ds_store.get_thread_slice(tid);
  Tensor tdSsdS = thr_ds_store.partition_D(sdS);

  // (key, query) of every S^T element this thread holds, in the tile's coordinates.
  Tensor tScS = thr_kv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  // Each key row's additive term in base 2: its bias, or -inf past the key limit. Fixed for the block.
  float row_bias[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int key = n0 + get<0>(tScS_rc(r, 0));
    row_bias[r] = key >= key_limit ? -INFINITY : bias_ptr != nullptr ? bias_ptr[key] * kLog2e : 0.f;
  }

  // ---- dQ product: rows are queries ----
  typename Traits::TiledMmaDq mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  using dStNoSwizzle = decltype(get_nonswizzle_portion(typename Traits::SmemLayoutdSt{}));
  using KtNoSwizzle = decltype(get_nonswizzle_portion(typename Traits::SmemLayoutKtChunk{}));
  constexpr int kDqCols = Traits::kDqCols;
  Tensor tdQrdS = thr_dq.partition_fragment_A(make_tensor(ds_base, dStNoSwizzle{}));  // (MMA, MMA_M, MMA_N)
  Tensor tdQrKt = thr_dq.partition_fragment_B(make_tensor(smem, KtNoSwizzle{}));      // (MMA, MMA_D, MMA_N)
  auto copy_ds = make_tiled_copy_A(SmemCopyAtomTransposed<Element>{}, mma_dq);
  auto thr_ds = copy_ds.get_thread_slice(tid);
  Tensor tdQsdS = thr_ds.partition_S(sdSt);
  auto copy_kt = make_tiled_copy_B(SmemCopyAtomTransposed<Element>{}, mma_dq);
  auto thr_kt = copy_kt.get_thread_slice(tid);
  auto tdQsKt_at = [&](int chunk) {  // K's columns [64 chunk, 64 chunk + 64), as (64, N)
    return thr_kt.partition_S(make_tensor(make_smem_ptr(smem + chunk * kBlockN * kDqCols), typename Traits::SmemLayoutKtChunk{}));
  };
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kDqCols>>{}));

  if (n_iters > 0) {
    const int rows = key_limit - n0;  // keys past the limit are zero-filled (and masked by row_bias)
    load_rows(gmem_copy, gmem_thr.partition_S(gK), gmem_thr.partition_D(sK), tKVcKV, rows);
    load_rows(gmem_copy, gmem_thr.partition_S(gV), gmem_thr.partition_D(sV), tKVcKV, rows);
    // One commit group per iteration, even an empty one: cp_async_wait<kStages - 1> then
    // always means "this iteration's tile (and K, V) has landed".
    CUTE_UNROLL
    for (int stage = 0; stage < Traits::kStages; ++stage) {
      if (stage < n_iters) load_query_tile(stage, stage);
      cp_async_fence();
    }
  }

  for (int it = 0, stage = 0; it < n_iters; ++it, stage = stage + 1 == Traits::kStages ? 0 : stage + 1) {
    const int h = head_of(it), m0 = m_block_of(it) * kBlockM;
    cp_async_wait<Traits::kStages - 1>();
    __syncthreads();  // this stage landed, its zero-fill stores visible to every warp

    // S^T = K Q^T, then P^T in place.
    Tensor acc_s = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kBlockM>>{});  // (MMA, MMA_N, MMA_M)
    clear(acc_s);
    block_gemm<false>(acc_s, tSrK, tSrQ, tSsK, thr_b_kv.partition_S(sQ_at(stage, 0)), mma_kv, copy_a_kv, thr_a_kv,
                      copy_b_kv, thr_b_kv);
    Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    const bool masked = m0 + kBlockM > p.Lq || (p.causal && m0 < n0 + kBlockN - 1);
    if (masked) {
      scores_to_probs<true>(s, tScS_rc, row_bias, lse_at(stage), scale_log2, n0, m0, p.Lq, p.causal);
    } else {
      scores_to_probs<false>(s, tScS_rc, row_bias, lse_at(stage), scale_log2, n0, m0, p.Lq, p.causal);
    }

    // dV += P^T dO, P^T straight from registers.
    {
      Tensor p_lowp = to_lowp<Element>(acc_s);
      Tensor tdVrP = make_tensor(p_lowp.data(), acc_to_a_layout(p_lowp.layout()));
      block_gemm<true>(acc_dv, tdVrP, tKVrdOt, tdVrP, thr_bt_kv.partition_S(sQt_at(stage, 1)), mma_kv, copy_a_kv,
                       thr_a_kv, copy_bt_kv, thr_bt_kv);
    }

    // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place.
    Tensor acc_dp = partition_fragment_C(mma_kv, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    block_gemm<false>(acc_dp, tSrV, tSrdO, tSsV, thr_b_kv.partition_S(sQ_at(stage, 1)), mma_kv, copy_a_kv, thr_a_kv,
                      copy_b_kv, thr_b_kv);
    Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
    const float* delta = delta_at(stage);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(dp); ++c) {
      const float d = delta[get<1>(tScS_rc(0, c))];
      CUTE_UNROLL
      for (int r = 0; r < size<0>(dp); ++r) dp(r, c) = s(r, c) * (dp(r, c) - d);
    }

    // dS^T to shared memory for dQ; dK += dS^T Q from registers.
    Tensor ds_lowp = to_lowp<Element>(acc_dp);
    copy(copy_ds_store, thr_ds_store.retile_S(ds_lowp), tdSsdS);
    Tensor tdKrdS = make_tensor(ds_lowp.data(), acc_to_a_layout(ds_lowp.layout()));
    block_gemm<true>(acc_dk, tdKrdS, tKVrQt, tdKrdS, thr_bt_kv.partition_S(sQt_at(stage, 0)), mma_kv, copy_a_kv,
                     thr_a_kv, copy_bt_kv, thr_bt_kv);

    __syncthreads();  // dS complete; no warp reads this stage's Q, dO, lse, delta any more
    if (it + Traits::kStages < n_iters) load_query_tile(it + Traits::kStages, stage);  // overlaps the dQ product below
    cp_async_fence();

    // dQ rows of this tile += dS K, into the fp32 accumulator (scaled in the convert kernel).
    // This tile's rows of the accumulator, seen as the dQ product's C: one base pointer a thread
    // plus compile-time offsets, so the atomics need no per-element address arithmetic.
    Tensor gdQaccum = make_tensor(make_gmem_ptr(bp.dq_accum + ((int64_t(b) * p.Hq + h) * p.Lq + m0) * kHeadDim),
                                  Shape<Int<kBlockM>, Int<kHeadDim>>{}, Stride<Int<kHeadDim>, _1>{});
    const int q_rows = p.Lq - m0;
    CUTE_UNROLL
    for (int chunk = 0; chunk < kHeadDim / kDqCols; ++chunk) {
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kDqCols>>{});  // (MMA, MMA_M, MMA_D)
      clear(acc_dq);
      block_gemm<false>(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt_at(chunk), mma_dq, copy_ds, thr_ds, copy_kt, thr_kt);
      Tensor tdQgdQ = thr_dq.partition_C(local_tile(gdQaccum, Shape<Int<kBlockM>, Int<kDqCols>>{}, make_coord(0, chunk)));
      add_dq(acc_dq, tdQgdQ, tdQcdQ, q_rows);
    }
  }
  cp_async_wait<0>();  // only empty groups remain; leave none behind

  // dK (times the softmax scale) and dV through K's and V's shared memory, once no warp reads them.
  __syncthreads();
  Tensor mdK = make_tensor(make_gmem_ptr(static_cast<Element*>(bp.dk) + dkv_offset),
                           make_shape(p.Lk, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  Tensor mdV = make_tensor(make_gmem_ptr(static_cast<Element*>(bp.dv) + dkv_offset),
                           make_shape(p.Lk, Int<kHeadDim>{}), make_stride(Int<kHeadDim>{}, _1{}));
  Tensor gdK = local_tile(mdK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(mdV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  store_tile<Element, kNThreads>(acc_dk, p.scale, mma_kv, sK, gdK, p.Lk - n0);
  store_tile<Element, kNThreads>(acc_dv, 1.f, mma_kv, sV, gdV, p.Lk - n0);
}

template <typename Element, int kHeadDim>
cudaError_t launch_main(const AttentionBackwardParams& bp, cudaStream_t stream) {
  using Traits = CuteAttnBwdTraits<Element, kHeadDim>;
  const AttentionParams& p = bp.fwd;
  // (batch * kv heads) on x, which has no 65535 limit; the key blocks on y.
  const dim3 grid(p.B * p.Hkv, (p.Lk + Traits::kBlockN - 1) / Traits::kBlockN);
  return launch_with_smem(attention_backward_cute_kernel<Traits>, grid, Traits::kNThreads, Traits::kSmemBytes, stream,
                          bp);
}

template <typename Element>
cudaError_t run(DType dtype, AttentionBackwardParams bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  if (!p.aligned) bp.dq_accum = nullptr;  // the WMMA backward below writes dq itself
  cudaError_t err = attention_backward_preprocess(dtype, bp, stream);
  if (err != cudaSuccess) return err;
  // cp.async moves 16 bytes at a time: rows that do not start 16-byte aligned take the WMMA
  // backward, which reads the delta just computed.
  if (!p.aligned) return attention_backward(dtype, bp, stream);
  if (p.Lk > 0) {  // a grid dimension of 0 is an invalid launch; with no key dq stays zero
    err = p.D == 64 ? launch_main<Element, 64>(bp, stream)
          : p.D == 128 ? launch_main<Element, 128>(bp, stream)
                       : cudaErrorInvalidValue;  // bindings.cpp refuses these first, with the reason
    if (err != cudaSuccess) return err;
  }
  return attention_backward_convert_dq(dtype, bp, p.scale, stream);
}

}  // namespace

bool attention_backward_cute_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t attention_backward_cute(DType dtype, const AttentionBackwardParams& bp, cudaStream_t stream) {
  if (bp.fwd.B == 0 || bp.fwd.Hq == 0) return cudaSuccess;
  switch (dtype) {
    case DType::F16: return run<cutlass::half_t>(dtype, bp, stream);
    case DType::BF16: return run<cutlass::bfloat16_t>(dtype, bp, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fuseformer
