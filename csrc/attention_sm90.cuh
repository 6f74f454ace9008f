// Attention forward for Hopper (sm_90a): FlashAttention-3's structure, built from the CUTLASS
// Hopper FMHA collectives rather than written by hand. They ship with the nvidia-cutlass
// package (examples/88_hopper_fmha under the package's `source` folder; the build adds that
// folder to the include path, see kernels/cuda_backend.py): TMA loads of Q, K and V into
// swizzled shared memory, a producer warp and two consumer warpgroups (the "cooperative"
// warp-specialized schedule), wgmma with the fp32 accumulators in registers, the online
// softmax in base 2, and a TMA store of O. What is ours: the masks (below), the scale, the
// dispatch and the fallbacks (attention_sm90.cu).
//
// Scope: fp16/bf16, head dims 64 and 128, no mask or causal (top-left, as torch), one K/V head
// per query head. The collectives' fusion hook (`before_softmax`) sees only the (query, key)
// position of a score, not its batch, so the key-padding mask (a bias per batch and key) has
// no place here: those calls take the CuTe or WMMA kernels. TMA needs 16-byte aligned rows and
// the collectives need Lq % 8 == 0.
//
// Compiled for sm_90a only (wgmma and setmaxnreg exist nowhere else): without
// FUSEFORMER_SM90A the file defines no kernel at all and attention_sm90.cu answers "not
// built", so a build for other architectures never launches the collectives' error stub.
#pragma once

// The collectives' device-side asserts become calls that make ptxas serialize the wgmma
// pipeline across them (warning C7510, "Potential Performance Loss"); without them the
// kernels keep wgmma asynchronous.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "kernels.h"

#if defined(FUSEFORMER_SM90A)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include <algorithm>

#include "collective/fmha_fusion.hpp"
#include "device/device_universal.hpp"
#include "kernel/fmha_kernel_builder.hpp"

namespace fuseformer {
namespace sm90 {

using namespace cute;

// The fusion interface of the collectives: the producer loads get_trip_count key tiles; the
// consumers run get_unmasked_trip_count of them without calling before_softmax, then
// get_masked_trip_count more with it (the last ones). problem_size is (B, H, Lq, Lk, D) and
// blk_coord (query block, 0, (batch, head)).

// The tiles before the masked ones need no mask: both fusions derive it the same way.
template <class Fusion>
struct MaskedLast {
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_unmasked_trip_count(BlkCoord const& blk, TileShape const& tile, ProblemSize const& problem) {
    Fusion& self = *static_cast<Fusion*>(this);
    return self.get_trip_count(blk, tile, problem) - self.get_masked_trip_count(blk, tile, problem);
  }
};

// No mask: only the keys past Lk in the last tile (TMA fills them with zeros, which would
// otherwise score 0 instead of -inf).
struct TailFusion : MaskedLast<TailFusion> {
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const&, TileShape const& tile, ProblemSize const& problem) {
    return ceil_div(get<3>(problem), get<1>(tile));
  }
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_masked_trip_count(BlkCoord const& blk, TileShape const& tile, ProblemSize const& problem) {
    return std::min(1, get_trip_count(blk, tile, problem));
  }
  template <class AccQK, class IndexQK, class ProblemSize>
  CUTLASS_DEVICE void before_softmax(AccQK& acc, IndexQK const& index, ProblemSize const& problem) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); ++i)
      if (get<1>(index(i)) >= get<3>(problem)) acc(i) = -INFINITY;
  }
};

// Causal, top-left aligned (key j attends query i when j <= i, as torch's is_causal): a query
// block stops at the tile holding its last row's diagonal, and only the tiles that cross the
// diagonal -- plus the ragged last key tile, which is among them whenever it is reached --
// pay for the mask. Every row keeps key 0, so no row is fully masked.
struct CausalTailFusion : MaskedLast<CausalTailFusion> {
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const& blk, TileShape const& tile, ProblemSize const& problem) {
    int key_tiles = ceil_div(get<3>(problem), get<1>(tile));
    int diagonal_tiles = ceil_div((get<0>(blk) + 1) * get<0>(tile), get<1>(tile));
    return std::min(key_tiles, diagonal_tiles);
  }
  template <class BlkCoord, class TileShape, class ProblemSize>
  CUTLASS_DEVICE int get_masked_trip_count(BlkCoord const& blk, TileShape const& tile, ProblemSize const& problem) {
    // The key tiles that overlap this block's rows [m * BM, (m + 1) * BM): ceil(BM / BN) of
    // them end the trip (one more when BM is not a multiple of BN).
    int crossing = ceil_div(get<0>(tile), get<1>(tile)) + (get<0>(tile) % get<1>(tile) != 0);
    return std::min(crossing, get_trip_count(blk, tile, problem));
  }
  template <class AccQK, class IndexQK, class ProblemSize>
  CUTLASS_DEVICE void before_softmax(AccQK& acc, IndexQK const& index, ProblemSize const& problem) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      auto pos = index(i);
      if (get<1>(pos) > get<0>(pos) || get<1>(pos) >= get<3>(problem)) acc(i) = -INFINITY;
    }
  }
};

// (rows, head dim, (batch, head)) with unit stride along the head dim: the collectives' view of
// a (B, H, L, D) tensor whose rows are contiguous.
using StrideRows = cute::tuple<int, _1, cute::tuple<int, int>>;
using StrideLse = cute::tuple<_1, cute::tuple<int, int>>;

// 128 query rows a block (two consumer warpgroups of 64 each) and key tiles of 128 at both head
// dims. At head dim 128 that is CUTLASS's example tile; at 64 the example's 128 x 64 ran at 347
// TFLOP/s on the H100 (d64 L4096 bf16, 0.72x cuDNN, slower than our Triton kernel) while 128 x 128
// ran 659 at head dim 128: 128-key tiles give the S = Q K^T product wgmma's 64 x 128 shape
// instead of 64 x 64 and halve the per-tile softmax rescale and barrier work per key, as
// FlashAttention-3 does at head dim 64 (128-key blocks). 168 registers a thread, no spills
// (nvcc 13.0). Not yet timed: the next GPU run compares it with the H100 figures above.
template <int kHeadDim>
using TileShape = std::conditional_t<kHeadDim == 64, Shape<_128, _128, _64>, Shape<_128, _128, _128>>;

template <class Element, int kHeadDim, class Fusion>
using Operation = cutlass::device::Universal<typename cutlass::fmha::kernel::FmhaBuilder<
    Element, float, float, TileShape<kHeadDim>, StrideRows, StrideRows, StrideRows, Fusion,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::Kernel>;

inline StrideRows rows_stride(const int64_t strides[3]) {
  return StrideRows{static_cast<int>(strides[2]), _1{},
                    cute::make_tuple(static_cast<int>(strides[0]), static_cast<int>(strides[1]))};
}

// Run a collective-built operation (the forward's or the backward's) with the caller's softmax
// scale: Kernel::to_underlying_arguments builds the TMA descriptors, and the collectives fix the
// scale at 1/sqrt(D), so it is written over their two fields (natural and base-2 units).
template <class Op>
cudaError_t run_with_scale(typename Op::Arguments const& args, float scale, int device, cudaStream_t stream) {
  using Kernel = typename Op::Kernel;
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  params.mainloop.scale_softmax = scale;
  params.mainloop.scale_softmax_log2 = scale * 1.4426950408889634f;
  // Over 48 KB of shared memory needs the opt-in, once per device and kernel (Universal::initialize
  // would do it once per process, missing a second GPU).
  static bool smem_set[64] = {};
  if (device >= 64 || !smem_set[device]) {
    cudaError_t err = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(Kernel::SharedStorageSize));
    if (err != cudaSuccess) return err;
    if (device < 64) smem_set[device] = true;
  }
  if (Op::run(params, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? cudaErrorLaunchFailure : err;
  }
  return cudaSuccess;
}

// Launch one instantiation on the current device (its index and SM count, asked once by the
// caller, attention_sm90.cu, which has also checked every size and stride).
template <class Element, int kHeadDim, class Fusion>
cudaError_t launch(const AttentionParams& p, int device, int sm_count, cudaStream_t stream) {
  using Op = Operation<Element, kHeadDim, Fusion>;
  typename Op::Arguments args{
      {p.B, p.Hq, p.Lq, p.Lk, p.D},
      {static_cast<const Element*>(p.q), rows_stride(p.q_strides), static_cast<const Element*>(p.k),
       rows_stride(p.k_strides), static_cast<const Element*>(p.v), rows_stride(p.v_strides)},
      {static_cast<Element*>(p.out), rows_stride(p.out_strides), p.lse,
       StrideLse{_1{}, cute::make_tuple(p.Hq * p.Lq, p.Lq)}},
      cutlass::KernelHardwareInfo{device, sm_count}};
  if (Op::can_implement(args) != cutlass::Status::kSuccess || Op::get_workspace_size(args) != 0)
    return cudaErrorNotSupported;
  // The epilogue's lse reads the scale field too, so it stays the natural-log logsumexp of the
  // scaled scores.
  return run_with_scale<Op>(args, p.scale, device, stream);
}

// `launch(fusion)` with the fusion of the call's mask: causal or not (the forward's and the
// backward's instantiations both come through here). FUSEFORMER_SM90_CAUSAL_ONLY: the compile
// tests build the causal kernel alone.
template <class Launch>
cudaError_t with_fusion(bool causal, Launch&& launch) {
#if !defined(FUSEFORMER_SM90_CAUSAL_ONLY)
  if (!causal) return launch(TailFusion{});
#endif
  return launch(CausalTailFusion{});
}

// One (dtype, head dim): no mask and causal. Each combination lives in a file of its own so
// that a JIT build compiles the four in parallel (one instantiation takes ptxas ~25-50 s).
template <class Element, int kHeadDim>
cudaError_t launch_any(const AttentionParams& p, int device, int sm_count, cudaStream_t stream) {
  return with_fusion(p.causal, [&](auto fusion) {
    return launch<Element, kHeadDim, decltype(fusion)>(p, device, sm_count, stream);
  });
}

}  // namespace sm90
}  // namespace fuseformer

#define FUSEFORMER_SM90_INSTANCE(ELEMENT, HEAD_DIM, NAME)                                              \
  namespace fuseformer::sm90 {                                                                         \
  cudaError_t NAME(const AttentionParams& p, int device, int sm_count, cudaStream_t stream) {          \
    return launch_any<ELEMENT, HEAD_DIM>(p, device, sm_count, stream);                                 \
  }                                                                                                    \
  }

#endif  // FUSEFORMER_SM90A

namespace fuseformer::sm90 {
// The four instantiations (attention_sm90*.cu), declared for the dispatch in attention_sm90.cu.
cudaError_t forward_f16_d64(const AttentionParams& p, int device, int sm_count, cudaStream_t stream);
cudaError_t forward_f16_d128(const AttentionParams& p, int device, int sm_count, cudaStream_t stream);
cudaError_t forward_bf16_d64(const AttentionParams& p, int device, int sm_count, cudaStream_t stream);
cudaError_t forward_bf16_d128(const AttentionParams& p, int device, int sm_count, cudaStream_t stream);
// The backward's four (attention_sm90_bwd_*.cu, from attention_sm90_backward.cuh).
cudaError_t backward_f16_d64(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream);
cudaError_t backward_f16_d128(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream);
cudaError_t backward_bf16_d64(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream);
cudaError_t backward_bf16_d128(const AttentionBackwardParams& bp, int device, int sm_count, cudaStream_t stream);
}  // namespace fuseformer::sm90
