// Attention forward on CUTLASS's CuTe (FlashAttention-2's structure), fp16/bf16, head dims 64
// and 128. The opt-in alternative to attention_forward.cu (FUSEFORMER_CUDA_ATTENTION=cute):
// same AttentionParams, same outputs (out, natural-log lse with +inf on a fully masked row),
// so either csrc/ backward (attention_backward.cu, attention_cute_backward.cu) runs after it.
//
// Why it should be faster than the WMMA kernel: the scores S and the output accumulator O stay
// in registers for the whole key loop. With the SM80 mma.sync 16x8x16 atom the owner of every
// accumulator element is known (thread lane/4 holds rows r and r+8, columns 2*(lane%4)+{0,1}),
// so the online softmax runs on the fragments themselves: row max / row sum within a thread,
// then across the 4 threads of a quad with two shuffles. P is converted in registers into the
// A operand of the P V product; nothing round-trips through shared memory but the K/V tiles.
//
// Block: kBlockM query rows of one (batch, head) (128 at head dim 64, 64 at 128), 4 warps,
// 16 rows per warp per MMA row tile. Keys in tiles of kBlockN (32 at head dim 64, 64 at 128),
// walked from the last tile to the first, so that the tiles needing masks (ragged end, causal
// diagonal) come first.
// Loads: cp.async 16-byte copies into swizzled shared memory (ldmatrix without bank
// conflicts). Q is loaded once; K and V are double-buffered: while the block computes with
// tile n from one stage, the cp.async of tile n-1 into the other stage is already in flight
// (issued a whole tile earlier), so a load has one tile of work to hide behind.
//
// Masks: causal (top-left: key j attends query i when j <= i), the key-padding fast path as
// an fp32 bias per (batch, key), and per batch `key_end`, past which key tiles are skipped.
// Rows past Lq and keys past min(Lk, key_end) are zero-filled on load and masked to -inf.
//
// Written and compiled without a GPU (see csrc/README.md); it has not run yet.
#include "attention_cute.cuh"
#include "kernels.h"

namespace fuseformer {
namespace {

using namespace cute;
using namespace cute_attn;

template <typename Element_, int kHeadDim_>
struct CuteAttnTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  // Tile sizes chosen by ptxas's report (nvcc 13.0, sm_80, -O3): the largest that do not
  // spill. 128 x 64 spilled at both head dims; at 128, 128 x 32 spilled too (the fp32 O
  // accumulator of 32 rows x 128 is 128 registers a thread). Not yet tuned on a GPU.
  static constexpr int kBlockM = kHeadDim == 128 ? 64 : 128;
  static constexpr int kBlockN = kHeadDim == 128 ? 64 : 32;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "the swizzled 64-column smem atom needs head dims that are multiples of 64");

  using TiledMma = TiledMmaFor<Element, kNWarps>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom<64>{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom<64>{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V read as (D, N): the B operand of O += P V; ldmatrix.trans transposes on the way.
  using SmemLayoutVt = Transposed<SmemLayoutKV>;
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));
  using GmemTiledCopy = cute_attn::GmemTiledCopy<Element, kNThreads>;

  static constexpr int kKVElems = cosize(SmemLayoutKV{});
  static constexpr int kStages = 2;  // K/V double buffering
  // Q, then per stage K and V: 32 KB at head dim 64, 80 KB at 128.
  static constexpr int kSmemElems = cosize(SmemLayoutQ{}) + kStages * 2 * kKVElems;
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element));
};

// Max then sum over the 4 lanes of a quad (they share the rows of a fragment).
CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

// Scores to base-2 units plus the masks: the bias (natural units), keys at or past
// key_limit (ragged) and keys after the query (causal diagonal) become -inf. Kept out of line
// of the unmasked tiles, which only scale.
template <typename S, typename C>
CUTE_DEVICE void apply_masks(S& s, C const& coords, const float* bias_ptr, float scale_log2, int col0, int row0,
                             int key_limit, bool ragged, bool diagonal) {
  CUTE_UNROLL
  for (int c = 0; c < size<1>(s); ++c) {
    const int col = col0 + get<1>(coords(0, c));
    const float bias = (bias_ptr != nullptr && col < key_limit) ? bias_ptr[col] * kLog2e : 0.f;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
      float x = s(r, c) * scale_log2 + bias;
      if ((ragged && col >= key_limit) || (diagonal && col > row0 + get<0>(coords(r, c)))) x = -INFINITY;
      s(r, c) = x;
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) attention_forward_cute_kernel(const AttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  extern __shared__ __align__(128) unsigned char smem_raw[];

  // Causal rows near the end see the most keys: launch those blocks first.
  const int m_block = p.causal ? int(gridDim.y) - 1 - int(blockIdx.y) : int(blockIdx.y);
  const int bh = blockIdx.x;
  const int b = bh / p.Hq, h = bh % p.Hq;
  const int h_kv = h / (p.Hq / p.Hkv);  // GQA: consecutive query heads share a K/V head
  const int tid = threadIdx.x;

  int key_limit = p.Lk;
  if (p.key_end != nullptr) key_limit = min(key_limit, p.key_end[b]);
  int n_block_max = (key_limit + kBlockN - 1) / kBlockN;
  if (p.causal) n_block_max = min(n_block_max, ((m_block + 1) * kBlockM + kBlockN - 1) / kBlockN);

  auto* q_ptr = static_cast<const Element*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  auto* k_ptr = static_cast<const Element*>(p.k) + b * p.k_strides[0] + h_kv * p.k_strides[1];
  auto* v_ptr = static_cast<const Element*>(p.v) + b * p.v_strides[0] + h_kv * p.v_strides[1];
  auto* o_ptr = static_cast<Element*>(p.out) + b * p.out_strides[0] + h * p.out_strides[1];
  float* lse_ptr = p.lse + int64_t(bh) * p.Lq;
  const float* bias_ptr = p.key_bias == nullptr ? nullptr : p.key_bias + b * p.key_bias_batch_stride;

  // Whole (L, D) matrices of this (batch, head), then this block's tiles of them.
  Tensor mQ = make_tensor(make_gmem_ptr(q_ptr), make_shape(p.Lq, Int<kHeadDim>{}), make_stride(p.q_strides[2], _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(p.Lk, Int<kHeadDim>{}), make_stride(p.k_strides[2], _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(p.Lk, Int<kHeadDim>{}), make_stride(p.v_strides[2], _1{}));
  Tensor mO = make_tensor(make_gmem_ptr(o_ptr), make_shape(p.Lq, Int<kHeadDim>{}), make_stride(p.out_strides[2], _1{}));
  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (M, D)
  Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (N, D, n_blocks)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
  // Stage s holds K at kv_smem(s, 0) and V at kv_smem(s, 1).
  Element* const kv_base = smem + cosize(typename Traits::SmemLayoutQ{});
  auto kv_smem = [&](int stage, int v) { return make_smem_ptr(kv_base + (2 * stage + v) * Traits::kKVElems); };
  auto sK_at = [&](int stage) { return make_tensor(kv_smem(stage, 0), typename Traits::SmemLayoutKV{}); };
  auto sV_at = [&](int stage) { return make_tensor(kv_smem(stage, 1), typename Traits::SmemLayoutKV{}); };
  auto sVt_at = [&](int stage) { return make_tensor(kv_smem(stage, 1), typename Traits::SmemLayoutVt{}); };
  Tensor sVtNoSwizzle = make_tensor(kv_base, typename Traits::SmemLayoutVtNoSwizzle{});  // fragment shape only

  // Row coordinates of the tiles, for the bounds predicates of the loads and the store.
  Tensor cQ = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor cKV = make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{});

  typename Traits::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_D, n_blocks)
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tQcQ = gmem_thr.partition_S(cQ);
  Tensor tKVcKV = gmem_thr.partition_S(cKV);

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK_at(0));       // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
  clear(acc_o);

  auto smem_copy_q = make_tiled_copy_A(SmemCopyAtom<Element>{}, tiled_mma);
  auto smem_thr_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(SmemCopyAtom<Element>{}, tiled_mma);
  auto smem_thr_k = smem_copy_k.get_thread_slice(tid);
  auto smem_copy_v = make_tiled_copy_B(SmemCopyAtomTransposed<Element>{}, tiled_mma);
  auto smem_thr_v = smem_copy_v.get_thread_slice(tid);

  // (row, col) of every score this thread holds, in the block's tile coordinates.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // 2 halves (r, r + 8) x MMA row tiles

  // Running max (base-2 units) and sum of every row this thread holds.
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;

  // Tile n of K and V into stage `stage`; rows past the key limit are zero-filled.
  auto load_kv = [&](int n, int stage) {
    const int rows = key_limit - n * kBlockN;
    load_rows(gmem_copy, tKgK(_, _, _, n), gmem_thr.partition_D(sK_at(stage)), tKVcKV, rows);
    load_rows(gmem_copy, tVgV(_, _, _, n), gmem_thr.partition_D(sV_at(stage)), tKVcKV, rows);
  };

  if (n_block_max > 0) {
    load_rows(gmem_copy, tQgQ, tQsQ, tQcQ, p.Lq - m_block * kBlockM);
    load_kv(n_block_max - 1, 0);
    cp_async_fence();
    if (n_block_max > 1) load_kv(n_block_max - 2, 1);
    // Exactly one commit group per tile, even an empty one, so that "all but the newest group
    // done" (cp_async_wait<1>) always means "this iteration's tile has landed".
    cp_async_fence();

    for (int n_block = n_block_max - 1, stage = 0; n_block >= 0; --n_block, stage ^= 1) {
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
      clear(acc_s);
      cp_async_wait<1>();
      __syncthreads();  // tile n (and Q) landed, its zero-fill stores visible to every warp
      Tensor tSsK = smem_thr_k.partition_S(sK_at(stage));
      Tensor tOsVt = smem_thr_v.partition_S(sVt_at(stage));

      block_gemm<false>(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_thr_q, smem_copy_k, smem_thr_k);

      Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));  // (rows, cols)
      // Masks only where they can bite: the bias everywhere, the key limit and the causal
      // diagonal on the tiles they cross.
      const int col0 = n_block * kBlockN, row0 = m_block * kBlockM;
      const bool ragged = col0 + kBlockN > key_limit;
      const bool diagonal = p.causal && col0 + kBlockN - 1 > row0;
      if (bias_ptr != nullptr || ragged || diagonal) {
        apply_masks(s, tScS_rc, bias_ptr, scale_log2, col0, row0, key_limit, ragged, diagonal);
      } else {
        CUTE_UNROLL
        for (int i = 0; i < size(s); ++i) s(i) *= scale_log2;
      }


      // Online softmax in base 2 on the fragment: m' = max(m, max_j s_j); p_j = 2^(s_j - m');
      // l' = l 2^(m - m') + sum_j p_j; O' = O 2^(m - m'). A row with no key so far keeps
      // m = -inf; it subtracts 0 instead, so that its p_j = 0 and no inf - inf NaN appears.
      Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float tile_max = row_max[r];
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s); ++c) tile_max = fmaxf(tile_max, s(r, c));
        tile_max = quad_max(tile_max);
        const float offset = tile_max == -INFINITY ? 0.f : tile_max;
        const float rescale = exp2f(row_max[r] - offset);  // 0 on the first tile (2^-inf)
        row_max[r] = tile_max;
        float tile_sum = 0.f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s); ++c) {
          s(r, c) = exp2f(s(r, c) - offset);
          tile_sum += s(r, c);
        }
        row_sum[r] = row_sum[r] * rescale + tile_sum;  // per-thread partial; the quad sums at the end
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o); ++c) o(r, c) *= rescale;
      }

      // P in the input dtype, reshaped in registers into the A operand of O += P V.
      Tensor p_lowp = to_lowp<Element>(acc_s);
      Tensor tOrP = make_tensor(p_lowp.data(), acc_to_a_layout(p_lowp.layout()));
      block_gemm<true>(acc_o, tOrP, tOrVt, tOrP, tOsVt, tiled_mma, smem_copy_q, smem_thr_q, smem_copy_v, smem_thr_v);

      __syncthreads();  // every warp is done reading this stage: refill it with tile n - 2
      if (n_block >= 2) load_kv(n_block - 2, stage);
      cp_async_fence();
    }
    cp_async_wait<0>();  // only empty groups remain; leave none behind
  }

  // out = O / l (0 where l = 0: no key attended), lse = (m + log2 l) ln 2 (+inf where l = 0).
  Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float l = quad_sum(row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    const int row = m_block * kBlockM + get<0>(tScS_rc(r, 0));
    if ((tid & 3) == 0 && row < p.Lq) lse_ptr[row] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : INFINITY;
  }

  // Registers -> shared (sQ's space, free once every warp is past its last read) -> global in
  // 16-byte rows, so the stores coalesce.
  __syncthreads();
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  store_tile<Element, Traits::kNThreads>(acc_o, 1.f, tiled_mma, sO, gO, p.Lq - m_block * kBlockM);
}

template <typename Element, int kHeadDim>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  using Traits = CuteAttnTraits<Element, kHeadDim>;
  // (batch * heads) on x, which has no 65535 limit; the query tiles on y.
  const dim3 grid(p.B * p.Hq, (p.Lq + Traits::kBlockM - 1) / Traits::kBlockM);
  return launch_with_smem(attention_forward_cute_kernel<Traits>, grid, Traits::kNThreads, Traits::kSmemBytes, stream, p);
}

template <typename Element>
cudaError_t dispatch_head_dim(const AttentionParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: return launch<Element, 64>(p, stream);
    case 128: return launch<Element, 128>(p, stream);
    default: return cudaErrorInvalidValue;  // bindings.cpp refuses these first, with the reason
  }
}

}  // namespace

bool attention_forward_cute_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

cudaError_t attention_forward_cute(DType dtype, const AttentionParams& p, cudaStream_t stream) {
  if (p.Lq == 0 || p.B == 0 || p.Hq == 0) return cudaSuccess;
  // cp.async moves 16 bytes at a time: rows that do not start 16-byte aligned take the WMMA kernel.
  if (!p.aligned) return attention_forward(dtype, p, stream);
  switch (dtype) {
    case DType::F16: return dispatch_head_dim<cutlass::half_t>(p, stream);
    case DType::BF16: return dispatch_head_dim<cutlass::bfloat16_t>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fuseformer
