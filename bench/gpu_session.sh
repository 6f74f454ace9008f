#!/usr/bin/env bash
# The GPU checks no CPU machine can run, in stages sized for the device tool's 10-minute
# commands (torch and triton preinstalled there, never reinstalled). One call may run several
# stages, in order:
#
#   bash bench/gpu_session.sh prewarm    # bench/prewarm.py in the background: the bench's compiles, in parallel
#   bash bench/gpu_session.sh tests      # the gpu-marked tests (while csrc/ builds), test_compile (full tracebacks),
#                                        # the csrc/ ones, the suite
#   bash bench/gpu_session.sh profile    # bench/profile_calls.py: where add+LN fwd+bwd's time goes, triton vs cuda;
#                                        # the kernels of a BERT-base forward and bf16 MLM training
#                                        # step by device time
#   bash bench/gpu_session.sh overhead   # `fuseformer bench --filter overhead`: host µs per eager call
#   bash bench/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck, one test per kernel
#   bash bench/gpu_session.sh compile    # first-call time of the autotuned attention forward: its configs compiled
#                                        # one by one (Triton's autotuner) against kernels/precompile.py's thread
#                                        # pool, each in a fresh process with an empty Triton cache; run it before
#                                        # `prewarm` or alone (their compiles would share the CPU)
#   bash bench/gpu_session.sh bench      # `fuseformer bench`, models then ops, results under bench_models/, bench_ops/
#
# Several stages in one call, each step time-boxed by an environment variable (seconds; defaults
# COMPILE_TIMEOUT=120 GPU_TESTS_TIMEOUT=200 CSRC_TESTS_TIMEOUT=200 SUITE_TIMEOUT=300 (0 skips the
# suite) PREWARM_TIMEOUT=240 PROFILE_TIMEOUT=120 OVERHEAD_TIMEOUT=120 MODELS_TIMEOUT=240 OPS_TIMEOUT=300),
# plus the csrc builds (~1-2 min the first time on a machine, run beside test_compile).
# SESSION_SECONDS caps every box at what
# is left of the whole call (20 s kept for a step's SIGINT and the packing), so the last stage gets the rest and ends
# before the device tool's limit. BENCH_QUICK=1 gives the benchmark's shorter timings;
# MODELS_FILTER / OPS_FILTER pick and order the cases (default: the targets' cases first, then
# every other case). `prewarm` runs the bench's cases once in PREWARM_PROCS (4) + PREWARM_MODEL_PROCS (3) processes at
# once, beside the stages after it, so that the timed run finds Triton's autotune configs and
# torch.compile's graphs in the on-disk caches (bench/prewarm.py says why); the stages that time
# anything (profile, overhead, bench) first wait for it. Everything in one 600-second command:
#   SESSION_SECONDS=585 COMPILE_TIMEOUT=120 GPU_TESTS_TIMEOUT=100 CSRC_TESTS_TIMEOUT=45 SUITE_TIMEOUT=0 \
#     PREWARM_TIMEOUT=240 PROFILE_TIMEOUT=60 OVERHEAD_TIMEOUT=35 MODELS_TIMEOUT=90 OPS_TIMEOUT=600 BENCH_QUICK=1 \
#     bash bench/gpu_session.sh prewarm tests profile overhead bench
# (H100, 2026-11-26: the csrc builds took 75 s and 131 s side by side; test_compile's first test
# alone 76 s; the gpu-marked Triton/model tests ran ~3 s each, hence 4 workers now; the csrc
# ones 25 s on 8 workers; the ops suite's 21 headline cases 251 s.)
# (H200, 2026-11-27, that command with the archive carried, bench/results/h200/2026-11-27-5e53e2b/session_timings.txt:
# install 5 s, unpack 8 s, csrc builds 97 s and 176 s, test_compile + test_eager_path cut at
# 130 s (14 passed), the gpu-marked Triton/model tests cut at 106 s (61 passed), the csrc ones
# 21 s (435 passed), profile 14 s, overhead 34 s, models cut at 93 s with no case finished (HF +
# torch.compile's first compiles; a second call on the warm machine ran all 7 in 127 s), the
# whole ops suite, 26 cases, 82 s, all in 511 s. The tests overlap the prewarm (they time
# nothing), so the order stays; the models and the last gpu tests (61 of 63 ran; the model
# forward+backward under sync debug mode did not) get room from test_compile's box, and
# profile from nothing (it has three sections more since):
#   SESSION_SECONDS=585 COMPILE_TIMEOUT=60 GPU_TESTS_TIMEOUT=130 CSRC_TESTS_TIMEOUT=40 SUITE_TIMEOUT=0 \
#     PREWARM_TIMEOUT=240 PROFILE_TIMEOUT=80 OVERHEAD_TIMEOUT=40 MODELS_TIMEOUT=140 OPS_TIMEOUT=600 BENCH_QUICK=1 \
#     bash bench/gpu_session.sh prewarm tests profile overhead bench )
# (H200, 2026-11-27 evening, bench/results/h200/2026-11-27-a3eeca9/session_timings.txt: `prewarm tests profile bench`
# with COMPILE_TIMEOUT=45 GPU_TESTS_TIMEOUT=120 CSRC_TESTS_TIMEOUT=35 PROFILE_TIMEOUT=110
# MODELS_TIMEOUT=150 ran in 558 s: builds 105 s and 182 s, prewarm 105 s and 204 s (699 kernels
# still compiled there), the gpu-marked tests cut at 120 s (67 passed), test_compile waiting on
# the build (now after it), profile 79 s, models cut at 154 s with 5 of 7 cases, the whole ops
# suite (29 cases) in 90 s; a second call finished the models (BENCH_SUITES=models, the first
# call's results.json carried in .gpu/bench_models/) in 70 s, warm.)
#
# (H200, 2026-11-28, bench/results/h200/session_timings.txt: `prewarm tests overhead bench` with
# GPU_TESTS_TIMEOUT=150 OVERHEAD_TIMEOUT=45 MODELS_TIMEOUT=160 in SESSION_SECONDS=570: builds 159 s
# and 225 s, prewarm 158 s and 251 s (699 kernels still compiled, the sm_80 attention's and
# Linear+GELU's autotune configs mostly), 73 of 84 gpu-marked tests in their box, the overhead
# group cut at 45 s (it keeps its rows when cut since), models cut at 164 s with 4 of 7 cases,
# 11 s left for ops; a second call on the warm machine, `bench` alone, finished the models in
# 82 s and the whole ops suite in 95 s: 814 device-seconds in all. Give the overhead group 90 s.)
#
# Before a session, on the CPU machine, in a Python with triton 3.6 (the GPU machines' release),
# and a Python 3.12 (theirs) with the same triton for Triton's C launcher modules:
#   python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
#   python3.12 -m venv /tmp/t36p312 && /tmp/t36p312/bin/pip install triton==3.6.0
#   /tmp/t36/bin/python -m fuseformer.bench.triton_cache build --launcher-python /tmp/t36p312/bin/python
# compiles for sm_90 the Triton kernels of the benchmark, the overhead group and the tests
# below, and builds their C launchers, into .tritoncache/sm90.tar.xz (2026-11-27: 947 kernels
# and 41 C modules, 19.7 MiB, 17 min on 2 cores from an empty cache); name .tritoncache in the
# device call's carry, and this script unpacks it first.
#
# The device tool brings back at most 8 files from $OUT: every log and result is written to
# a work folder and packed at the end into $OUT/gpu_session.tar.gz, with $OUT/summary.txt (the
# stage timings and the tails of the logs) beside it, after every stage and at exit. Without $OUT the work folder is
# bench/results/gpu-session and nothing is packed. Commit the bench results under
# bench/results/<device>/ (h100, h200).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: gpu_session.sh STAGE... (compile, prewarm, tests, profile, overhead, sanitize, bench)" >&2; exit 2; }
for stage in "$@"; do
    case "$stage" in compile | prewarm | tests | profile | overhead | sanitize | bench) ;; *) echo "unknown stage $stage" >&2; exit 2 ;; esac
done
# What this call compiled all the same, by kernel, beside the kernels carried in
# .tritoncache (unpacked below, after the install): written into the packed logs.
carried_list=""
triton_cache_report() {
    [ -n "${carried_list:-}" ] || return 0
    local entry new names others
    new=$(ls "$TRITON_CACHE_DIR" | grep -vxFf "$carried_list")
    names=$(for entry in $new; do
        ls "$TRITON_CACHE_DIR/$entry" | sed -n 's/^__grp__\(.*\)\.json$/\1/p'
    done)
    # New entries without a group file are not kernels: Triton's C launchers (one per kernel
    # signature, built with the C compiler on first use) and its driver utilities.
    others=$(for entry in $new; do
        ls "$TRITON_CACHE_DIR/$entry" | grep -q '^__grp__' || ls "$TRITON_CACHE_DIR/$entry" | grep '\.so$'
    done)
    {
        echo "Triton cache: $(grep -c . "$carried_list") entries carried (kernels and C modules), $(echo "$names" | grep -c .) kernels compiled here;"
        echo "C modules built here: $(echo "$others" | grep -c .) ($(echo "$others" | grep . | sort | uniq -c | tr -s ' \n' ' '))"
        echo "compiled here, by kernel (torch.compile's own are named triton_*):"
        echo "$names" | grep . | sort | uniq -c | sort -rn
    } >"$OUT/triton_cache_compiled.txt"
    # Their metadata (the kernel's name, constants and options, a few KB each): what a CPU
    # machine needs to see why the carried archive missed them (1042 carried, 699 still
    # compiled here on 2026-11-27).
    local entry_dir
    for entry in $new; do
        for entry_dir in "$TRITON_CACHE_DIR/$entry"/*.json; do
            [ -f "$entry_dir" ] && echo "$entry/$(basename "$entry_dir")"
        done
    done | tar czf "$OUT/triton_cache_compiled_meta.tar.gz" -C "$TRITON_CACHE_DIR" -T - 2>/dev/null
}
if [ -n "${OUT:-}" ]; then
    RESULT_DIR=$OUT
    OUT=$(mktemp -d /tmp/gpu_session.XXXXXX)
    pack() {
        triton_cache_report
        {
            cat "$OUT/timings.txt" 2>/dev/null
            for log in "$OUT"/*.txt; do
                case "$log" in */timings.txt | */install*.txt) continue ;; esac
                echo "===== $(basename "$log") (last 40 lines)"
                tail -n 40 "$log"
            done
        } >"$RESULT_DIR/summary.txt"
        tar czf "$RESULT_DIR/gpu_session.tar.gz" -C "$OUT" .
    }
    trap pack EXIT
else
    OUT=bench/results/gpu-session
fi
mkdir -p "$OUT"
# Every Triton compile of ours in every process of this call (the tests' and the bench's), with
# its key's parts and who asked, packed with the logs: on a CPU machine,
# `python -m fuseformer.bench.triton_cache misses triton_compiles.jsonl` says which the carried
# archive lacked and how each differs from the nearest kernel it holds.
export FUSEFORMER_TRITON_COMPILE_LOG=${FUSEFORMER_TRITON_COMPILE_LOG:-$OUT/triton_compiles.jsonl}

# box SECONDS: a step's time box, capped at what is left of SESSION_SECONDS (less 20 s: the
# 10 s a step gets after its SIGINT, and the packing), never under 1 s. Steps end with SIGINT
# (`timeout -s INT`), so a cut-off pytest still prints its failures with their tracebacks and
# a cut-off benchmark keeps the cases it finished.
DEADLINE=${SESSION_SECONDS:+$((SECONDS + SESSION_SECONDS))}
box() {
    local want=$1
    if [ -n "$DEADLINE" ] && [ $((DEADLINE - SECONDS - 20)) -lt "$want" ]; then
        want=$((DEADLINE - SECONDS - 20))
    fi
    echo $((want < 1 ? 1 : want))
}

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
    # Wheels carried in .whl/ (the device tool's README says how; a GPU box has no network):
    # nvidia-cutlass for csrc/'s CuTe headers, and the benchmark's optional peers (liger-kernel
    # for add+LN). All pure Python; --no-deps keeps the machine's torch and triton.
    if ls .whl/*.whl >/dev/null 2>&1; then
        PIP_NO_INDEX=1 python3 -m pip install -q --no-deps .whl/*.whl >"$OUT/install_wheels.txt" 2>&1
    fi
    PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.txt" 2>&1 || {
        tail -n 20 "$OUT/install.txt"
        return 1
    }
}
timed install install || exit 1

# Triton kernels compiled ahead on a CPU for sm_90 (bench/triton_cache.py builds the archive;
# carry .tritoncache): unpacked, under this machine's own Triton cache keys, into the cache
# every later process of this call uses, so that the first calls find the benchmark's kernels
# compiled.
TRITON_ARCHIVE=${TRITON_ARCHIVE:-.tritoncache/sm90.tar.xz}
if [ -f "$TRITON_ARCHIVE" ]; then
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fuseformer_triton_cache}
    timed triton-cache-unpack python3 -m fuseformer.bench.triton_cache unpack "$TRITON_ARCHIVE" "$TRITON_CACHE_DIR" \
        >"$OUT/triton_cache.txt" 2>&1
    carried_list=$OUT/triton_cache_carried.list
    ls "$TRITON_CACHE_DIR" >"$carried_list"
else
    echo "no $TRITON_ARCHIVE carried: every Triton kernel compiles here (bench/triton_cache.py)" >"$OUT/triton_cache.txt"
fi
{
    nvidia-smi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null
} >"$OUT/environment.txt" 2>&1

# The cuda backend JIT-builds csrc/ on first use (about 30 s with ninja; later processes load
# it from torch's extension cache): build it first, alone, so that a compile error reads as
# one, and its time is not counted in a test's or a benchmark case's.
# Started in the background (beside test_compile, which needs no csrc/) and waited for before
# anything that uses it. Never time-boxed: torch's extension build leaves a lock file behind
# when killed, and every later process would wait on it.
built=""
cuda_build_start() {
    [ -n "$built" ] && return 0
    built=1
    # The CUTLASS Linear+GELU is a module of its own (csrc/linear_gelu_cutlass*.cu, about a
    # minute of nvcc for sm_90a, its three files at once): built here too, so that the gpu
    # tests and the benchmark's fuseformer-cuda-cutlass load it from the cache. The two builds
    # run side by side: each ends in one long translation unit that leaves most cores idle.
    timed cuda-build python3 -c "from fuseformer.kernels import cuda_backend as c; print(c.unavailable_reason() or 'cuda backend ready')" \
        >"$OUT/cuda_build.txt" 2>&1 &
    build_pids="$!"
    timed cutlass-build python3 -c "from fuseformer.kernels import cuda_backend as c; print(c.gemm_unavailable_reason() or 'CUTLASS GEMM module ready')" \
        >"$OUT/cutlass_build.txt" 2>&1 &
    build_pids="$build_pids $!"
}
cuda_build_wait() {
    cuda_build_start
    # shellcheck disable=SC2086
    wait $build_pids 2>/dev/null
    build_pids=""
}

# Before a stage that times host work (profile, overhead, bench): the eager figures are host-bound, so
# anything else holding the CPU is timed with them. The H200 run of 2026-11-28 had eager figures
# move by up to 65% between runs and within one, its first call's bench following stages cut by
# their boxes (pytest-gpu killed, exit 137; test_compile hung in inductor's pool shutdown). So:
# stop what cut-off test stages left behind (pytest and its xdist workers, inductor's compile
# pool: never the benchmark's own processes), then record the load and the busiest processes
# in load.txt, to read beside the figures.
quiesce() {
    local pids pid ancestors=" " up=$$
    while [ "${up:-0}" -gt 1 ]; do  # this script and whatever started it are never stopped
        ancestors="$ancestors$up "
        up=$(awk '{print $4}' "/proc/$up/stat" 2>/dev/null)
    done
    # pytest (its controller), pytest-xdist's workers (execnet starts them as `python -c` reading
    # their code from stdin), inductor's compile-pool workers.
    pids=$(pgrep -f "python3 -m pytest|sys\.stdin\.readline|_inductor/compile_worker" | while read -r pid; do
        case "$ancestors" in *" $pid "*) ;; *) echo "$pid" ;; esac
    done)
    if [ -n "$pids" ]; then
        echo "# before $1: stopping leftovers: $(echo "$pids" | tr '\n' ' ')" >>"$OUT/load.txt"
        for pid in $pids; do ps -o pid=,etime=,args= -p "$pid" >>"$OUT/load.txt" 2>/dev/null; done
        # shellcheck disable=SC2086
        kill -INT $pids 2>/dev/null
        sleep 3
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null
    fi
    {
        echo "# before $1 at +${SECONDS}s: loadavg $(cat /proc/loadavg), $(nproc) CPUs"
        ps -eo pid,pcpu,etime,args --sort=-pcpu | head -n 8 | cut -c1-160
    } >>"$OUT/load.txt" 2>&1
}

# The benchmark's default order: the cases the issues' targets name first, so that a run cut
# off by its time box has measured those; then '*', every other case.
# GPT-2 inference early: its padded LM head (models/layers.py VocabLogits) is untimed yet.
DEFAULT_MODELS_FILTER="bert_infer_B32_L128*,bert_train_B32_L128*,gpt2_infer_B8_L512,bert_infer_B8_L512_pad30,*"
# First the cases whose untimed variants could decide a default: the fast GELU (erf forward),
# the Hopper backward and atomic dQ (attention forward+backward: no run has timed them yet,
# bench/results/h100/README.md, the correction), the pipelined add+LN backward and the
# persistent forward, the cross-entropy kernel (untimed); then the rest of the targets' cases.
DEFAULT_OPS_FILTER="attn_fwd_pad_d64_L512,linear_gelu_fwd_erf_16384x768x3072,attn_fwd_bwd_d64_L2048,\
attn_fwd_bwd_causal_d64_L2048,add_ln_fwd_bwd_16384x768,add_ln_fwd_16384x768,linear_gelu_fwd_bwd_erf_16384x768x3072,\
cross_entropy_fwd_bwd_mlm_padded_4096x30522,\
linear_gelu_fwd_tanh_16384x768x3072,add_ln_fwd_16384x4096,add_ln_fwd_bwd_16384x4096,attn_fwd_d128_L4096,\
attn_fwd_d64_L4096,attn_fwd_causal_d64_L4096,attn_fwd_d64_L512,*"

# The prewarm processes (bench/prewarm.py) for both suites, in the background; their own
# --seconds ends them (SIGINT), the outer timeout only backs that up.
prewarm_pids=""
prewarm_start() {
    local limit
    limit=$(box "${PREWARM_TIMEOUT:-240}")
    timed prewarm-ops timeout -s INT -k 10 "$((limit + 15))" python3 -m fuseformer.bench.prewarm --suite ops \
        --filter "${OPS_FILTER:-$DEFAULT_OPS_FILTER}" ${BENCH_QUICK:+--quick} --procs "${PREWARM_PROCS:-4}" \
        --seconds "$limit" --logs "$OUT/prewarm" >"$OUT/prewarm_ops.txt" 2>&1 &
    prewarm_pids="$!"
    # Three processes for the models (two until 2026-11-28, when the one holding the training
    # cases was cut at 245 s): prewarm.py deals the training cases apart now.
    timed prewarm-models timeout -s INT -k 10 "$((limit + 15))" python3 -m fuseformer.bench.prewarm --suite models \
        --filter "${MODELS_FILTER:-$DEFAULT_MODELS_FILTER}" ${BENCH_QUICK:+--quick} --procs "${PREWARM_MODEL_PROCS:-3}" \
        --seconds "$limit" --logs "$OUT/prewarm" >"$OUT/prewarm_models.txt" 2>&1 &
    prewarm_pids="$prewarm_pids $!"
}
# Before anything that times: compiles beside it would be measured as its time.
prewarm_wait() {
    [ -z "$prewarm_pids" ] && return 0
    # shellcheck disable=SC2086
    wait $prewarm_pids 2>/dev/null
    prewarm_pids=""
    tail -n 8 "$OUT"/prewarm_*.txt
}

_last_stage=${*: -1}
run_stage() {
case "$1" in
prewarm)
    prewarm_start
    ;;
tests)
    cuda_build_start
    # The gpu-marked tests of the Triton kernels and models (bf16, large shapes, graphs, no
    # host sync) first, while csrc/ builds, and before those of csrc/, each group in its own
    # box: the csrc/ group is ten times larger and must not starve the first.
    # Files in GPU_TESTS_FIRST (default: those whose code changed since the last GPU run) are
    # collected, and so handed to the workers, first: a box cut short has run them.
    local first=${GPU_TESTS_FIRST:-"tests/test_attention_hopper.py tests/test_models_graphs.py tests/test_models_api.py tests/test_fused_block.py tests/test_attention.py"}
    local files=$first f
    for f in tests/test_*.py; do
        case " $first tests/test_cuda_backend.py tests/test_cuda_gemm.py " in *" $f "*) ;; *) files="$files $f" ;; esac
    done
    # -v: each test's outcome by name as it ends. A box cut short kills pytest-xdist's controller
    # before its junit file or summary is written (2026-11-28: 73 dots, no names).
    # shellcheck disable=SC2086
    timed pytest-gpu timeout -s INT -k 10 "$(box "${GPU_TESTS_TIMEOUT:-200}")" python3 -m pytest -m gpu -v -rfE -n 4 --durations=10 \
        $files --junitxml="$OUT/pytest_gpu.xml" \
        >"$OUT/pytest_gpu.txt" 2>&1
    cuda_build_wait
    # test_compile.py failed on an earlier GPU run with its traceback lost: full tracebacks, in
    # a file of its own. After the csrc/ build: on 2026-11-27 its four workers spent their
    # whole 45 s box waiting on that build's lock, and no test ran (test modules that asked
    # K.available_backends() at import built csrc/ while pytest collected; they ask only
    # triton's reason since, so the gpu-marked tests above run beside the build).
    # TORCHINDUCTOR_COMPILE_THREADS=1: inductor compiles in each worker's own process. With its
    # subprocess pool, a worker hung at exit in the pool's shutdown (2026-11-28: all 26 tests had
    # run, and the step sat out the rest of its 45 s box).
    timed pytest-compile timeout -s INT -k 10 "$(box "${COMPILE_TIMEOUT:-120}")" env TORCHINDUCTOR_COMPILE_THREADS=1 \
        python3 -m pytest tests/test_compile.py tests/test_eager_path.py -q -rfE -n 4 \
        --tb=long >"$OUT/pytest_compile.txt" 2>&1
    timed pytest-gpu-csrc timeout -s INT -k 10 "$(box "${CSRC_TESTS_TIMEOUT:-200}")" python3 -m pytest -m gpu -q -rfE -n 8 --durations=10 \
        tests/test_cuda_backend.py tests/test_cuda_gemm.py --junitxml="$OUT/pytest_gpu_csrc.xml" \
        >"$OUT/pytest_gpu_csrc.txt" 2>&1
    # The compile-only checks (nvcc/ptxas/cuobjdump on the sources, the CPU emulation) are CI's
    # job: minutes of CPU that prove nothing more on a GPU machine.
    # SUITE_TIMEOUT=0 skips it (CI runs the same tests in Triton's interpreter).
    if [ "${SUITE_TIMEOUT:-300}" -gt 0 ]; then
        timed pytest-suite timeout -s INT -k 10 "$(box "${SUITE_TIMEOUT:-300}")" python3 -m pytest -m "not gpu and not benchmark" -n 8 -q -rfE \
            --durations=15 --ignore=tests/test_csrc_compile.py --ignore=tests/test_csrc_emulated.py \
            --ignore=tests/test_triton_compile.py --junitxml="$OUT/pytest_suite.xml" >"$OUT/pytest_suite.txt" 2>&1
    fi
    tail -n 15 "$OUT"/pytest_*.txt
    ;;
compile)
    timed compile-time timeout -s INT -k 10 "$(box "${COMPILE_TIME_TIMEOUT:-150}")" python3 -m fuseformer.bench.compile_time \
        --op attention >"$OUT/compile_time.txt" 2>&1
    tail -n 5 "$OUT/compile_time.txt"
    ;;
profile)
    cuda_build_wait
    prewarm_wait
    quiesce profile
    timed profile timeout -s INT -k 10 "$(box "${PROFILE_TIMEOUT:-120}")" python3 -m fuseformer.bench.profile_calls \
        >"$OUT/profile.txt" 2>&1
    tail -n 90 "$OUT/profile.txt"
    ;;
overhead)
    cuda_build_wait  # a build beside it would be timed as host overhead
    prewarm_wait
    quiesce overhead
    timed overhead timeout -s INT -k 10 "$(box "${OVERHEAD_TIMEOUT:-120}")" python3 -m fuseformer.bench --filter overhead --out "$OUT/overhead" \
        >"$OUT/overhead.txt" 2>&1
    tail -n 30 "$OUT/overhead.txt"
    ;;
sanitize)
    cuda_build_wait
    # No caching allocator: memcheck sees each tensor's own bounds, not a pooled block.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for target in \
        "tests/test_attention.py::test_gpu_large" \
        "tests/test_add_layer_norm.py::test_bf16_on_gpu" \
        "tests/test_linear_gelu.py::test_bf16_on_gpu" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity" \
        "tests/test_cuda_backend.py::test_gpu_add_layer_norm_parity" \
        "tests/test_cuda_backend.py::test_gpu_add_layer_norm_parity@False-1100-1536-dtype2" \
        "tests/test_cuda_backend.py::test_gpu_add_layer_norm_parity@True-2200-768-dtype2" \
        "tests/test_cuda_backend.py::test_gpu_linear_gelu_parity" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity@cute-2-4-2-128-128-64" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity@cute-2-4-1-130-130-128" \
        "tests/test_cuda_backend.py::test_gpu_attention_parity@cute-3-2-2-65-70-128" \
        "tests/test_cuda_backend.py::test_gpu_sm90_attention@1000-1000" \
        "tests/test_cuda_backend.py::test_gpu_sm90_attention_backward@1000-1000" \
        "tests/test_cuda_gemm.py::test_gpu_cutlass_linear_gelu_parity@97-128-256-True-True-none-bf16-sm80" \
        "tests/test_cuda_gemm.py::test_gpu_cutlass_linear_gelu_parity@97-128-256-True-True-none-bf16-sm90"; do
        # One parametrization each: the sanitizer slows a launch 10-100x. TARGET@TEXT picks the
        # first one whose id holds TEXT (the CuTe attention forward and backward at head dims 64
        # and 128; one with an all-padded batch, whose rows have lse = +inf; the sm_90a forward
        # and backward over a ragged multi-tile case; the CUTLASS Linear+GELU's two paths, bias and
        # pre-activation store on, odd M; the csrc add+LN in bf16 on a 256-thread row block whose
        # backward prefetches the next row, and on warp rows with shared-memory column sums and
        # the prenorm stream's gradient, each group walking several rows).
        pick=""
        [[ "$target" == *@* ]] && pick=${target#*@} && target=${target%@*}
        first=$(python3 -m pytest -q --collect-only "$target" 2>/dev/null | grep '::' | grep -F -- "$pick" | head -n 1)
        for tool in memcheck racecheck; do
            name=$(echo "$target${pick:+_$pick}" | tr '/:.' '___')
            timed "$tool $target${pick:+@$pick}" timeout -s INT -k 10 "$(box 150)" compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 99 \
                python3 -m pytest -q -x "$first" >"$OUT/sanitizer_${tool}_${name}.txt" 2>&1
            echo "$tool $target${pick:+@$pick}: exit $?" | tee -a "$OUT/sanitizer_summary.txt"
        done
    done
    ;;
bench)
    cuda_build_wait
    prewarm_wait
    # Models first (the eager and CUDA-graph targets), then ops, each time-boxed on its own so
    # that a slow ops run cannot starve the models (MODELS_TIMEOUT, OPS_TIMEOUT seconds).
    # --resume: a second call after a cut-off run continues where the first one stopped, when
    # that run's results.json travels back in .gpu/bench_<suite>/ (carry .gpu; same commit only).
    # BENCH_SUITES picks the suites (default both; a follow-up call on a warm machine may run "ops" alone).
    for suite in ${BENCH_SUITES:-models ops}; do
        mkdir -p "$OUT/bench_$suite"
        [ -f ".gpu/bench_$suite/results.json" ] && cp ".gpu/bench_$suite/results.json" "$OUT/bench_$suite/"
        if [ "$suite" = models ]; then
            limit=${MODELS_TIMEOUT:-240} filter=${MODELS_FILTER:-$DEFAULT_MODELS_FILTER}
        else
            limit=${OPS_TIMEOUT:-300} filter=${OPS_FILTER:-$DEFAULT_OPS_FILTER}
        fi
        quiesce "bench-$suite"
        timed "bench-$suite" timeout -s INT -k 10 "$(box "$limit")" python3 -m fuseformer.bench --suite "$suite" --resume \
            --filter "$filter" ${BENCH_QUICK:+--quick} --out "$OUT/bench_$suite" >"$OUT/bench_$suite.txt" 2>&1
        tail -n 40 "$OUT/bench_$suite.txt"
    done
    ;;
esac
}
for stage in "$@"; do
    run_stage "$stage"
    [ "$stage" = "$_last_stage" ] && prewarm_wait  # never left running past the last stage
    # Packed after every stage as well as at exit: a command killed at the device tool's limit
    # runs no exit trap, and still returns what the finished stages wrote.
    [ -n "${RESULT_DIR:-}" ] && pack
done
