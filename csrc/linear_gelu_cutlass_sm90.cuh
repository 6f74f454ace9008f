// The CUTLASS 3 Linear+GELU kernel for sm_90a (see linear_gelu_cutlass.cu for the whole
// design): the collective builders' TMA warp-specialized cooperative mainloop and an epilogue
// visitor tree with the per-column bias, the GELU and the aux store of the pre-activation.
// Included by the per-dtype translation units linear_gelu_cutlass_sm90_{bf16,f16}.cu.
//
// Compiled for an architecture other than sm_90a, the kernel's device body is CUTLASS's stub
// (it prints an error and returns): the dispatch never launches it there (g_sm90a_image in
// linear_gelu_cutlass.cu). FUSEFORMER_GEMM_NO_SM90 leaves the kernels out altogether.
#pragma once

#include "linear_gelu_cutlass.cuh"

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED) && !defined(FUSEFORMER_GEMM_NO_SM90)
#define FUSEFORMER_GEMM_SM90 1
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace fuseformer {
namespace cutlass_gelu {
namespace sm90 {
using namespace cute;

// Cooperative: both consumer warpgroups on one 256 x 128 output tile (128 x 128 each, 128 fp32
// accumulators per thread), the CUTLASS profiler's usual pick for large bf16 GEMMs on H100. A
// 2 x 1 cluster multicasts each weight tile to the two CTAs that share it. Pingpong 128 x 128
// (whose overlap of one warpgroup's epilogue with the other's wgmma suits a heavy GELU
// epilogue) spilled ~46 bytes per thread with this aux-store epilogue under nvcc 13.0, so it is
// not used; cooperative 128 x 128 also compiled without spills. Not tuned on a GPU.
using TileShape = Shape<_256, _128, _64>;
using ClusterShape = Shape<_2, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

template <class Element, template <class> class Act>
struct Kernel {
  // D = Act(acc + bias); aux = acc + bias (skipped when aux_ptr is null). No C operand: with a
  // void source the tree drops its beta * C term at compile time.
  using FusionOp = cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
      cutlass::layout::RowMajor, Act, Element, float, /*ElementAux=*/Element, /*ElementBias=*/Element,
      /*ElementSource=*/void, /*ElementScalar=*/float, kAlignment, kAlignment>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignment,     // C: none
      Element, cutlass::layout::RowMajor, kAlignment,  // D
      EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,
      Element, cutlass::layout::ColumnMajor, kAlignment,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <class Element, template <class> class Act>
cudaError_t run(const LinearGeluCutlassParams& p, int device, int sm_count, cudaStream_t stream) {
  using G = typename Kernel<Element, Act>::Gemm;
  const int N = int(p.N), K = int(p.K);
  const auto stride_x = make_stride(int64_t(K), Int<1>{}, int64_t(0));
  const auto stride_w = make_stride(int64_t(K), Int<1>{}, int64_t(0));
  const auto stride_out = make_stride(int64_t(N), Int<1>{}, int64_t(0));

  typename G::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {int(p.M), N, K, 1};
  args.mainloop.ptr_A = static_cast<const Element*>(p.x);
  args.mainloop.dA = stride_x;
  args.mainloop.ptr_B = static_cast<const Element*>(p.weight);
  args.mainloop.dB = stride_w;
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.f;
  fusion.beta = 0.f;
  fusion.bias_ptr = static_cast<const Element*>(p.bias);  // null: the broadcast reads zeros
  fusion.aux_ptr = static_cast<Element*>(p.preact);       // null: the aux store is skipped
  fusion.dAux = stride_out;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_out;
  args.epilogue.ptr_D = static_cast<Element*>(p.out);
  args.epilogue.dD = stride_out;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;

  return run_gemm<G>(args, stream);
}
}  // namespace sm90
}  // namespace cutlass_gelu
}  // namespace fuseformer

#endif  // FUSEFORMER_GEMM_SM90

// The per-dtype entry point a linear_gelu_cutlass_sm90_<dtype>.cu file defines: erf or tanh for
// ELEMENT, or cudaErrorInvalidDeviceFunction in a build without the sm90 kernels.
#if defined(FUSEFORMER_GEMM_SM90)
#define FUSEFORMER_GELU_SM90_ENTRY(NAME, ELEMENT)                                                              \
  cudaError_t fuseformer::cutlass_gelu::NAME(const LinearGeluCutlassParams& p, bool approximate_tanh, int device, \
                                             int sm_count, cudaStream_t stream) {                             \
    return approximate_tanh ? sm90::run<ELEMENT, GeluTanh>(p, device, sm_count, stream)                        \
                            : sm90::run<ELEMENT, GeluErf>(p, device, sm_count, stream);                        \
  }
#else
#define FUSEFORMER_GELU_SM90_ENTRY(NAME, ELEMENT)                                                              \
  cudaError_t fuseformer::cutlass_gelu::NAME(const LinearGeluCutlassParams&, bool, int, int, cudaStream_t) {   \
    return cudaErrorInvalidDeviceFunction;                                                                     \
  }
#endif
