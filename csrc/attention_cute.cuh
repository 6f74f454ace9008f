// What the CuTe attention forward (attention_cute.cu) and backward (attention_cute_backward.cu)
// share: the SM80 mma.sync atom per dtype, the swizzled shared-memory atoms, the copy atoms,
// the fragment re-layouts, the pipelined block GEMM, the predicated tile loads and the
// registers -> shared -> global tile store. Needs nvcc and the CUTLASS/CuTe headers.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#include <cmath>
#include <type_traits>

namespace fuseformer {
namespace cute_attn {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// fp32 accumulation on fp16 or bf16 inputs: HMMA.16816.F32 on Ampere and Hopper.
template <typename Element>
using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                   MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;

// Warps stacked along M, 16 rows each; the N and K extents of one tiled MMA are 16 so that
// ldmatrix x4 fills a B fragment pair in one instruction.
template <typename Element, int kWarpsM, int kWarpsN = 1>
using TiledMmaFor = TiledMMA<MmaAtom<Element>, Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>,
                             Tile<Int<16 * kWarpsM>, Int<16 * kWarpsN>, _16>>;

// 8 rows x kCols columns (kCols = 64: 128 bytes a row; 32: 64 bytes), XOR-swizzled on 16-byte
// chunks: the 8 rows an ldmatrix reads hit 8 different bank groups.
template <int kCols>
using SmemLayoutAtom = decltype(composition(Swizzle<kCols == 64 ? 3 : 2, 3, 3>{},
                                            Layout<Shape<_8, Int<kCols>>, Stride<Int<kCols>, _1>>{}));

// The (cols, rows) view of a (rows, cols) shared-memory layout: an operand read transposed
// (ldmatrix.trans does the transposing on the way to registers).
template <typename SmemLayout>
using Transposed = decltype(composition(
    SmemLayout{}, make_layout(Shape<decltype(size<1>(SmemLayout{})), decltype(size<0>(SmemLayout{}))>{}, GenRowMajor{})));

template <typename Element>
using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
template <typename Element>
using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
// Accumulator fragments (converted) to shared memory: two adjacent elements per store.
template <typename Element>
using SmemCopyAtomStore = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

// Global <-> shared: each thread moves 8 elements (16 bytes); 8 threads cover a 64-column row.
template <int kNThreads>
using GmemLayoutAtom = Layout<Shape<Int<kNThreads / 8>, _8>, Stride<_8, _1>>;
template <typename Element, int kNThreads>
using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                               GmemLayoutAtom<kNThreads>{}, Layout<Shape<_1, _8>>{}));
template <typename Element, int kNThreads>
using GmemTiledCopyStore = decltype(make_tiled_copy(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
                                                    GmemLayoutAtom<kNThreads>{}, Layout<Shape<_1, _8>>{}));

// ---- fragment layouts -----------------------------------------------------------------------

// Accumulator (4 values, MMA_M, MMA_N) -> (rows, cols) = ((2, MMA_M), (2, MMA_N)): values 0,1
// of the atom are two adjacent columns of row r, values 2,3 the same columns of row r + 8.
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto rowcol_layout(Layout acc) {
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator of an (M, N) product (4, MMA_M, MMA_N) -> A operand of a product over N
// ((4, 2), MMA_M, MMA_N / 2): the C layout of two adjacent n8 atoms is the A layout of one k16 atom.
template <typename Layout>
CUTE_HOST_DEVICE constexpr auto acc_to_a_layout(Layout acc) {
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// The accumulator converted to the input dtype, element by element (times `scale`).
template <typename Element, typename Acc>
CUTE_DEVICE auto to_lowp(Acc const& acc, float scale = 1.f) {
  auto out = make_tensor_like<Element>(acc);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) out(i) = Element(acc(i) * scale);
  return out;
}

// acc += A B over the K mode, the shared->register copy of slice k+1 issued before the MMAs
// of slice k. A_IN_REGS: A is already in registers (P), only B is read from shared memory.
// copy_x is a tiled shared->register copy, thr_x its slice for this thread.
template <bool A_IN_REGS, typename Acc, typename RA, typename RB, typename SA, typename SB, typename Mma, typename CopyA,
          typename ThrA, typename CopyB, typename ThrB>
CUTE_DEVICE void block_gemm(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, Mma const& mma, CopyA const& copy_a,
                            ThrA const& thr_a, CopyB const& copy_b, ThrB const& thr_b) {
  auto rB_view = thr_b.retile_D(rB);
  auto load_a = [&](auto k) {
    if constexpr (!A_IN_REGS) {
      auto rA_view = thr_a.retile_D(rA);
      copy(copy_a, sA(_, _, k), rA_view(_, _, k));
    }
  };
  load_a(_0{});
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      load_a(k + 1);
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// gmem -> smem of one tile; rows at or past `row_limit` are zeroed instead (plain stores to
// other addresses than the cp.async ones, so no ordering issue). Head dims are whole tiles.
template <typename Copy, typename Src, typename Dst, typename Coord>
CUTE_DEVICE void load_rows(Copy const& tiled_copy, Src const& src, Dst&& dst, Coord const& coord, int row_limit) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < row_limit) {
      copy(tiled_copy, src(_, m, _), dst(_, m, _));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// An accumulator tile, converted (times `scale`), to global memory rows [0, row_limit) of `dst`
// through the shared tile `smem` (whose space the caller frees first: a __syncthreads before):
// fragment -> shared in 32-bit pieces, then shared -> global 16 bytes a thread, coalesced.
template <typename Element, int kNThreads, typename Acc, typename Mma, typename Smem, typename Gmem>
CUTE_DEVICE void store_tile(Acc const& acc, float scale, Mma const& tiled_mma, Smem& smem, Gmem& dst, int row_limit) {
  const int tid = threadIdx.x;
  auto lowp = to_lowp<Element>(acc, scale);
  auto smem_copy = make_tiled_copy_C(SmemCopyAtomStore<Element>{}, tiled_mma);
  auto smem_thr = smem_copy.get_thread_slice(tid);
  copy(smem_copy, smem_thr.retile_S(lowp), smem_thr.partition_D(smem));
  __syncthreads();
  GmemTiledCopyStore<Element, kNThreads> gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor src = gmem_thr.partition_S(smem);
  Tensor to = gmem_thr.partition_D(dst);
  Tensor coord = gmem_thr.partition_D(make_identity_tensor(make_shape(size<0>(smem), size<1>(smem))));
  Tensor regs = make_tensor_like(src);
  copy(gmem_copy, src, regs);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(regs); ++m)
    if (get<0>(coord(0, m, 0)) < row_limit) copy(gmem_copy, regs(_, m, _), to(_, m, _));
}

// kernel<<<grid, threads, smem_bytes, stream>>>(params); over 48 KB of dynamic shared memory
// needs the opt-in first (per device, so on every call).
template <typename Kernel, typename Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             Params const& params) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace cute_attn
}  // namespace fuseformer
