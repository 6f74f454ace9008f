// Attention backward for Hopper (sm_90a): FlashAttention-3's backward structure, assembled from
// CUTLASS's Hopper FMHA backward collective (examples/88_hopper_fmha, the folder the forward in
// attention_sm90.cuh builds on) rather than written by hand. One block per (128 keys, batch,
// head): a producer warp loads K and V once and streams Q, dO, lse and delta tile after tile by
// TMA; two consumer warpgroups (64 keys each) recompute S^T = K Q^T and dP^T = V dO^T with wgmma,
// keep dK and dV in registers over every query tile, and feed dQ = dS K through shared memory to
// a TMA reduce-add (cp.reduce.async.bulk.tensor) into an fp32 buffer: no atomics per element, no
// second pass over the keys.
//
// What is ours: the causal mask for the backward's (key block, query tile) walk (the example's
// own stops at floor(Lq / 64) query tiles and so drops a ragged last one), the caller's softmax
// scale written over the collective's fixed 1/sqrt(D), and the launch. delta = rowsum(dO * O)
// and the zeroed dQ buffer come from the preprocess kernel the CuTe backward runs too
// (attention_backward_rows.cu; the example's own multiplies O and dO in the input dtype,
// rounding each product to 8 mantissa bits in bf16), and dQ's fp32 -> dtype conversion from
// the convert kernel there, with a scale of 1 (the collective's dS already holds the softmax
// scale). See attention_sm90.cu for the dispatch.
//
// Scope, as the forward's: fp16/bf16, head dims 64 and 128, no mask or causal (top-left), one
// K/V head per query head, Lq % 8 == 0, 16-byte aligned rows, compiled for sm_90a only.
#pragma once

// As in attention_sm90.cuh: device asserts would serialize the wgmma pipeline.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "kernels.h"

#if defined(FUSEFORMER_SM90A)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "attention_sm90.cuh"

// The collective's one line that does not compile in our build: it rounds dS into a register
// fragment of the input dtype by plain assignment from float (`acc_DS(i) = ...`, from
// `make_fragment_like<Element>(acc_DP)`). cutlass::bfloat16_t has no assignment from float at
// all (why the example builds the backward for fp16 only), and half_t's goes through CUDA's
// __half, which torch's -D__CUDA_NO_HALF_CONVERSIONS__ turns off. So, in this translation unit
// only, a float register fragment re-made as a 16-bit float type gets elements that also take
// a float (rounded to nearest, the types' own explicit conversion). Same size and bits as the
// type itself: the collective then recasts them to 32-bit pairs for shared memory.
namespace fuseformer::sm90 {
template <class T>
struct AssignableFromFloat : T {
  AssignableFromFloat() = default;
  using T::operator=;
  CUTLASS_HOST_DEVICE AssignableFromFloat& operator=(float x) {
    T::operator=(T(x));
    return *this;
  }
};
static_assert(sizeof(AssignableFromFloat<cutlass::bfloat16_t>) == 2 && sizeof(AssignableFromFloat<cutlass::half_t>) == 2);
}  // namespace fuseformer::sm90

namespace cute {
// More specialized than cute's make_fragment_like<NewT>(Tensor const&), so it wins for exactly
// these calls: NewT a 16-bit float type, the source a float register fragment.
template <class NewT, size_t N, class Layout,
          class = std::enable_if_t<std::is_same_v<NewT, cutlass::bfloat16_t> || std::is_same_v<NewT, cutlass::half_t>>>
CUTE_HOST_DEVICE constexpr auto make_fragment_like(Tensor<ArrayEngine<float, N>, Layout> const& tensor) {
  return make_fragment_like<fuseformer::sm90::AssignableFromFloat<NewT>>(tensor.layout());
}
}  // namespace cute

#include "device/fmha_device_bwd.hpp"

// The backward walks, for one block of keys, the query tiles in order; the collective asks the
// fusion how many (get_trip_count), which of them hold any unmasked score (is_contributing:
// loads, MMAs and dQ reductions skip the others) and which scores to mask (before_softmax,
// called on every walked tile with positions (key, query)). TailFusion needs nothing of ours:
// the collective's generic adapter swaps its roles (ceil(Lq / tile) query tiles, keys >= Lk
// masked). CausalTailFusion cannot go through it (the swapped trip count would walk the wrong
// side of the diagonal), hence this specialization.
namespace cutlass::fmha::collective {
template <>
struct FusionBwdAdapter<fuseformer::sm90::CausalTailFusion> {
  // Every query tile, ragged last one included; the ones above the diagonal are skipped below.
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const&, TileShape const& tile, ProblemSize const& problem) {
    return ceil_div(get<2>(problem), get<0>(tile));
  }
  // Query tile m reaches key block n when its last query, (m + 1) BM - 1, is at or past the
  // block's first key, n BN (top-left causal: key j attends query i when j <= i). The last query
  // tile is walked by every block all the same: with more keys than queries, a block past the
  // last query would otherwise walk none, and the collective's dQ reducer warp then releases a
  // pipeline stage it never received (its only tile-free exit), which can stall the consumers'
  // pipeline tail. That tile is wholly masked there, so it adds zeros.
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE bool is_contributing(BlkCoord const& blk, TileShape const& tile, ProblemSize const& problem) {
    return get<1>(blk) * get<1>(tile) < (get<0>(blk) + 1) * get<0>(tile) ||
           get<0>(blk) == ceil_div(get<2>(problem), get<0>(tile)) - 1;
  }
  // Keys past Lk, zero-filled by TMA, are masked too: with a score of 0 their probability
  // exp(-lse) could overflow and turn the (zero) K row's dQ contribution into NaN.
  template <class AccQK, class IndexQK, class ProblemSize>
  CUTLASS_DEVICE void before_softmax(AccQK& acc, IndexQK const& index, ProblemSize const& problem) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      auto pos = index(i);  // (key, query)
      if (get<0>(pos) > get<1>(pos) || get<0>(pos) >= get<3>(problem)) acc(i) = -INFINITY;
    }
  }
};
}  // namespace cutlass::fmha::collective

namespace fuseformer {
namespace sm90 {

// (BlockQ, BlockKV, D): 128 keys a block (64 a consumer warpgroup) and 64-row query tiles, the
// example's tile at both head dims. The other it offers at head dim 64, 128-row query tiles,
// doubles the S and dP fragments and compiles (nvcc 13.0, bf16, causal) to a 368-byte stack
// frame and 112 bytes of spills, against this tile's 160 and 20.
template <int kHeadDim>
using BwdTileShape = Shape<_64, _128, Int<kHeadDim>>;

template <class Element, int kHeadDim, class Fusion>
using BwdDevice = cutlass::fmha::device::FmhaBwd<Element, float, BwdTileShape<kHeadDim>, Fusion>;

// (batch, head, row, 1): the collective's strides of a (B, H, L, D) tensor with contiguous rows.
using StrideBhl = cute::tuple<int, int, int, _1>;

inline StrideBhl bhl_stride(const int64_t strides[3]) {
  return StrideBhl{static_cast<int>(strides[0]), static_cast<int>(strides[1]), static_cast<int>(strides[2]), _1{}};
}

// The main kernel only: delta, the zeroed fp32 dQ buffer before it and dQ's conversion after it
// are the caller's (attention_sm90.cu). bp was checked there (sizes, strides, device).
template <class Element, int kHeadDim, class Fusion>
cudaError_t launch_backward(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream) {
  using Op = typename BwdDevice<Element, kHeadDim, Fusion>::Operation;
  const AttentionParams& p = bp.fwd;
  // delta and the dQ buffer are contiguous (B, H, Lq) and (B, H, Lq, D) fp32.
  const cute::tuple<int, int, _1> row_stride{p.Hq * p.Lq, p.Lq, _1{}};
  const StrideBhl dq_stride{p.Hq * p.Lq * p.D, p.Lq * p.D, p.D, _1{}};
  // dK and dV as the bindings allocate them: contiguous (B, H, Lk, D).
  const StrideBhl kv_grad_stride{p.Hkv * p.Lk * p.D, p.Lk * p.D, p.D, _1{}};
  typename Op::Arguments args{
      {p.B, p.Hq, p.Lq, p.Lk, p.D},
      {static_cast<const Element*>(p.q), bhl_stride(p.q_strides), static_cast<const Element*>(p.k),
       bhl_stride(p.k_strides), static_cast<const Element*>(p.v), bhl_stride(p.v_strides),
       static_cast<const Element*>(bp.dout), bhl_stride(bp.dout_strides), p.lse, row_stride, bp.delta, row_stride,
       bp.dq_accum, dq_stride},
      {static_cast<Element*>(bp.dk), kv_grad_stride, static_cast<Element*>(bp.dv), kv_grad_stride},
      cutlass::KernelHardwareInfo{device, sm_count}};
  if (Op::can_implement(args) != cutlass::Status::kSuccess || Op::get_workspace_size(args) != 0)
    return cudaErrorNotSupported;
  // The collective's P = exp2(scale_log2 S - log2(e) lse) and dS = P scale (dP - delta) read
  // the two scale fields run_with_scale writes.
  return run_with_scale<Op>(args, p.scale, device, stream);
}

template <class Element, int kHeadDim>
cudaError_t launch_backward_any(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream) {
  return with_fusion(bp.fwd.causal, [&](auto fusion) {
    return launch_backward<Element, kHeadDim, decltype(fusion)>(bp, device, sm_count, stream);
  });
}

}  // namespace sm90
}  // namespace fuseformer

#define FUSEFORMER_SM90_BACKWARD_INSTANCE(ELEMENT, HEAD_DIM, NAME)                                       \
  namespace fuseformer::sm90 {                                                                         \
  cudaError_t NAME(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream) {  \
    return launch_backward_any<ELEMENT, HEAD_DIM>(bp, device, sm_count, stream);                        \
  }                                                                                                    \
  }

#endif  // FUSEFORMER_SM90A
// (The four instantiations are declared in attention_sm90.cuh, for attention_sm90.cu's dispatch.)
