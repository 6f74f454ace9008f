#!/usr/bin/env bash
# The GPU checks no CPU machine can run, in stages that each fit one 10-minute command of a
# lent H100 (the device tool: torch and triton preinstalled there, never reinstalled):
#
#   bash bench/gpu_session.sh tests      # the whole suite on CUDA (bf16, gpu-marked, cuda backend)
#   bash bench/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck, one test per kernel
#   bash bench/gpu_session.sh bench      # `fuseformer bench` (ops + models), results under $OUT/bench
#
# Everything lands under $OUT (the device tool's folder that comes back), or
# bench/results/gpu-session without it. Commit the bench results under bench/results/<device>/ (h100, h200).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
stage=${1:?usage: gpu_session.sh tests|sanitize|bench}

# timed NAME CMD...: runs CMD and says how long it took, so a session cut short shows which
# stage ate the lent time. Also appended to $OUT/timings.txt. Printed on fd 3 (this script's
# stdout) so that a caller redirecting CMD's output still sees it.
exec 3>&1
timed() {
    local name=$1 start=$SECONDS rc
    shift
    "$@"
    rc=$?
    echo "[gpu_session] $name: $((SECONDS - start)) s (exit $rc)" | tee -a "$OUT/timings.txt" >&3
    return $rc
}

# Offline and without touching the machine's torch/triton: pyproject.toml makes this a PEP
# 660 editable install that needs no index and no isolated build environment.
install() {
    # csrc/ needs the CuTe headers of pip's nvidia-cutlass (pure Python, py3-none-any): a GPU
    # box without network gets it as a wheel carried in .whl/ (the device tool's README says how).
    if ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
        PIP_NO_INDEX=1 python3 -m pip install -q --no-deps .whl/nvidia_cutlass-*.whl >"$OUT/install_cutlass.txt" 2>&1
    fi
    PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1 || {
        tail -n 20 "$OUT/install.txt"
        return 1
    }
}
timed install install || exit 1
{
    nvidia-smi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null
} >"$OUT/environment.txt" 2>&1

# The cuda backend JIT-builds csrc/ on first use (about 30 s with ninja; later processes load
# it from torch's extension cache): build it first, alone, so that a compile error reads as
# one, and its time is not counted in a test's or a benchmark case's.
cuda_build() {
    timed cuda-build python3 -c "from fuseformer.kernels import cuda_backend as c; print(c.unavailable_reason() or 'cuda backend ready')" \
        >"$OUT/cuda_build.txt" 2>&1
    # The CUTLASS Linear+GELU is a module of its own (csrc/linear_gelu_cutlass*.cu, about a
    # minute of nvcc for sm_90a, its three files at once): built here too, so that the gpu
    # tests and the benchmark's fuseformer-cuda-cutlass load it from the cache.
    timed cutlass-build python3 -c "from fuseformer.kernels import cuda_backend as c; print(c.gemm_unavailable_reason() or 'CUTLASS GEMM module ready')" \
        >"$OUT/cutlass_build.txt" 2>&1
}

case "$stage" in
tests)
    cuda_build
    # The gpu-marked tests first (bf16, large shapes, csrc/), then the whole parity suite on
    # compiled kernels in parallel: 3 and 6 minutes are the targets on one H100.
    timed pytest-gpu timeout 170 python3 -m pytest -m gpu -q -rfE --durations=10 --junitxml="$OUT/pytest_gpu.xml" \
        >"$OUT/pytest_gpu.txt" 2>&1
    timed pytest-suite timeout 360 python3 -m pytest -m "not gpu and not benchmark" -n 8 -q -rfE --durations=15 \
        --junitxml="$OUT/pytest_suite.xml" >"$OUT/pytest_suite.txt" 2>&1
    tail -n 15 "$OUT/pytest_gpu.txt" "$OUT/pytest_suite.txt"
    ;;
sanitize)
    # No caching allocator: memcheck sees each tensor's own bounds, not a pooled block.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for target in \
        "tests/test_attention.py::test_gpu_large" \
        "tests/test_add_layer_norm.py::test_bf16_on_gpu" \
        "tests/test_linear_gelu.py::test_bf16_on_gpu" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity" \
        "tests/test_cuda_backend.py::test_gpu_add_layer_norm_parity" \
        "tests/test_cuda_backend.py::test_gpu_linear_gelu_parity" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity@cute-2-4-2-128-128-64" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity@cute-2-4-1-130-130-128" \
        "tests/test_cuda_gemm.py::test_gpu_cutlass_linear_gelu_parity@97-128-256-True-True-none-bf16-sm80" \
        "tests/test_cuda_gemm.py::test_gpu_cutlass_linear_gelu_parity@97-128-256-True-True-none-bf16-sm90"; do
        # One parametrization each: the sanitizer slows a launch 10-100x. TARGET@TEXT picks the
        # first one whose id holds TEXT (the CuTe attention forward at head dims 64 and 128; the
        # CUTLASS Linear+GELU's two paths, bias and pre-activation store on, odd M).
        pick=""
        [[ "$target" == *@* ]] && pick=${target#*@} && target=${target%@*}
        first=$(python3 -m pytest -q --collect-only "$target" 2>/dev/null | grep '::' | grep -F -- "$pick" | head -n 1)
        for tool in memcheck racecheck; do
            name=$(echo "$target${pick:+_$pick}" | tr '/:.' '___')
            timed "$tool $target${pick:+@$pick}" timeout 150 compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 99 \
                python3 -m pytest -q -x "$first" >"$OUT/sanitizer_${tool}_${name}.txt" 2>&1
            echo "$tool $target${pick:+@$pick}: exit $?" | tee -a "$OUT/sanitizer_summary.txt"
        done
    done
    ;;
bench)
    cuda_build
    # --resume: a second call after a cut-off run continues where the first one stopped.
    timed bench timeout 540 python3 -m fuseformer.bench --resume --out "$OUT/bench" >"$OUT/bench.txt" 2>&1
    tail -n 60 "$OUT/bench.txt"
    ;;
*)
    echo "unknown stage $stage: tests, sanitize or bench" >&2
    exit 2
    ;;
esac
