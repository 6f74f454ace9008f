"""CI compile check of the Triton kernels without a GPU.

On a CPU runner the kernel tests go through Triton's interpreter, which never lowers a kernel:
a kernel that breaks in the NVIDIA pipeline (TTGIR/LLVM/ptxas), or that needs more shared
memory than a block may have on the GPU (a launch failure there), would pass every CPU test.
tests/triton_compile_check.py compiles each entry kernel ahead of time for sm_90 and sm_80 --
every GPU autotune config, plus a set of constexpr cases (dtypes, masks, causal, dropout,
varlen, GQA, head dims 64/80/128, the LayerNorm flags and chunked rows, GELU erf/tanh) --
in a subprocess, because the interpreter (switched on for this process by conftest.py) must
not be set when the kernel modules build their autotune config lists. The Hopper attention
kernels (attention_hopper*.py) are compiled for sm_90 only, the one target they run on, and
their PTX is searched for wgmma and TMA instructions.

The default set keeps this near two minutes of two cores: every autotune config and the flag
cases for sm_90; for sm_80 the plain (non-autotuned) launches, where more shared memory than
the limit is a launch failure rather than a config the autotuner skips.
FUSEFORMER_TRITON_AOT_FULL=1 compiles every config and case for sm_80 as well (a few minutes).

Registers, spills and shared memory are printed per compile (pytest -s or -rP to see them).
Spills are reported, not failed on, except in the kernels of NO_SPILL (add+LN, the reductions,
the persistent TMA GEMM) and in the Hopper attention kernels (their design promises none). The
PTX of each compile is searched for wgmma, TMA copies and 16-byte vector accesses, which the
tests at the end require where a kernel is built on them. Skipped, with the reason, where
triton's NVIDIA backend or ptxas is missing or this triton's ahead-of-time compile API differs
from the one used.
"""
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import pytest

import compile_ahead

SCRIPT = pathlib.Path(__file__).resolve().parent / "triton_compile_check.py"
SKIP_EXIT = 3


def _static_skip_reason():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "triton has no NVIDIA backend"
    return None


@compile_ahead.build
def compile_check(tmp_path_factory):
    """triton_compile_check.py's results (started ahead, see compile_ahead)."""
    reason = _static_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("triton_aot") / "results.json"
    env = {k: v for k, v in compile_ahead.environ().items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode == SKIP_EXIT:
        pytest.skip(json.loads(out.read_text())["skip"] if out.exists() else proc.stdout[-2000:])
    assert out.exists(), f"the compile script wrote no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    assert "error" not in data, data["error"]
    data["subprocess_wall_s"] = wall
    return data


@pytest.fixture(scope="module")
def compiled(compile_check):
    """The check's results, with its table printed here (pytest -rP shows it) rather than from
    the build's thread, whose output would land in whichever test was running."""
    print(f"\n{SCRIPT.name}: {len(compile_check['results'])} compiles in {compile_check['subprocess_wall_s']:.1f}s "
          f"wall ({compile_check['workers']} workers)")
    print(_table(compile_check["results"]))
    return compile_check


def _table(results):
    """One line per compiled kernel: the compact register/spill/shared-memory report."""
    lines = [f"{'kernel':20s} {'arch':5s} {'case':32s} {'config':40s} {'regs':>4s} {'spill':>6s} {'smem':>7s}"]
    for r in results:
        if r["ok"]:
            spill = "?" if r["spill_bytes"] is None else str(r["spill_bytes"])
            cells = f"{r['n_regs'] if r['n_regs'] is not None else '?':>4} {spill:>6s} {r['shared']:>7d}"
        else:
            cells = "FAILED"
        lines.append(f"{r['kernel']:20s} sm_{r['arch']:<2d} {r['case']:32s} {r['config']:40s} {cells}")
    return "\n".join(lines)


def _where(r):
    return f"{r['kernel']} sm_{r['arch']} [{r['case']}] config {r['config']} constexprs {r['constexprs']}"


def test_every_kernel_compiles(compiled):
    failed = [r for r in compiled["results"] if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(compiled['results'])} compiles failed:\n" + "\n\n".join(
        f"{_where(r)}\n{r['error']}" for r in failed
    )


def test_shared_memory_fits_the_target(compiled):
    # Triton's launcher refuses a kernel whose shared memory exceeds the device's opt-in
    # maximum per block (sm_90 227 KB, sm_80 163 KB). A plain launch over it fails; the
    # autotuner skips such a config, which only fails when no config of the case fits.
    skipped = [r for r in compiled["results"] if r["smem_over"] and not r["smem_launch_failure"]]
    for r in skipped:
        print(f"autotuner would skip (shared memory {r['shared']} B > {r['smem_limit']} B): {_where(r)}")
    failing = [r for r in compiled["results"] if r["smem_launch_failure"]]
    assert not failing, "launch would fail, shared memory over the per-block limit:\n" + "\n".join(
        f"{_where(r)}: {r['shared']} B > {r['smem_limit']} B" for r in failing
    )


def test_every_entry_kernel_and_config_is_covered(compiled):
    """A kernel or autotune config added later must not slip through uncompiled."""
    cov = compiled["coverage"]
    assert not cov["entry_kernels_not_compiled"], (
        f"entry kernels that tests/triton_compile_check.py does not compile: {cov['entry_kernels_not_compiled']}"
    )
    assert not cov["configs_not_compiled"], f"autotune configs never compiled: {cov['configs_not_compiled']}"


def test_spill_report(compiled):
    """Spills cost speed, not correctness: listed here, never failed on. The ptxas report must
    have been parsed, though, or the register/spill columns would silently read '?'."""
    ok = [r for r in compiled["results"] if r["ok"]]
    assert ok and all(r["n_regs"] is not None and r["spill_bytes"] is not None for r in ok), (
        "ptxas's -v report was not captured for: " + ", ".join(_where(r) for r in ok if r["n_regs"] is None)
    )
    spills = [r for r in ok if r["spill_bytes"]]
    print(f"\n{len(spills)} of {len(ok)} compiled kernels spill registers:")
    for r in sorted(spills, key=lambda r: -r["spill_bytes"]):
        print(f"  {r['spill_bytes']:>7d} B  regs={r['n_regs']}  {r['kernel']} sm_{r['arch']} [{r['case']}] {r['config']}")


# Kernels whose compiles must not spill at all (the memory-bound add+LN and cross-entropy kernels, the
# reductions, and the persistent TMA GEMM, whose configs were chosen not to).
NO_SPILL = ("add_ln_fwd", "add_ln_fwd_rows", "add_ln_fwd_rows_pipelined", "add_ln_bwd", "add_ln_bwd_pipelined",
            "ln_keep_mask", "sum_rows", "sum_rows_pipelined", "gelu_bwd_db", "linear_gelu_tma", "ce_fwd", "ce_bwd",
            "ce_reduce", "attn_bwd_dkdv_one_pass64", "attn_bwd_dkdv_one_pass128")


def _of(compiled, kernel):
    found = [r for r in compiled["results"] if r["kernel"] == kernel and r["ok"]]
    assert found, f"no compile of {kernel} in the results"
    return found


def test_no_spills_where_none_are_allowed(compiled):
    spilling = [r for k in NO_SPILL for r in _of(compiled, k) if r["spill_bytes"] != 0]
    assert not spilling, "register spills in kernels that must not spill:\n" + "\n".join(
        f"{r['spill_bytes']} B, {r['n_regs']} regs: {_where(r)}" for r in spilling
    )


def test_persistent_gemm_uses_wgmma_and_tma(compiled):
    """The point of `_linear_gelu_tma`: on sm_90a its tiles arrive by TMA (cp.async.bulk.tensor)
    and feed Hopper's asynchronous tensor-core MMA (wgmma), in every config and case."""
    for r in _of(compiled, "linear_gelu_tma"):
        assert r["arch"] == 90
        assert r["ptx"]["wgmma"] > 0, f"no wgmma.mma_async in {_where(r)}"
        assert r["ptx"]["tma"] > 0, f"no cp.async.bulk.tensor in {_where(r)}"


def test_multi_row_layer_norm_moves_16_byte_vectors(compiled):
    """`_add_ln_fwd_rows` loads and stores rows in 16-byte vectors (ld/st.global.v4) for BERT's
    768 and also for N = 1000, where only its alignment hint (8 | N) proves the alignment."""
    for r in _of(compiled, "add_ln_fwd_rows"):
        assert r["ptx"]["ld_v4"] > 0 and r["ptx"]["st_v4"] > 0, f"no 16-byte vector access in {_where(r)}: {r['ptx']}"


def test_cross_entropy_checks_labels_on_the_device(compiled):
    """The reducing kernel asserts on the labels on the device (so a GPU call makes no launch
    for the check), and nothing else in it does (debug mode adds no other assert)."""
    for r in _of(compiled, "ce_reduce"):
        assert r["ptx"]["assertfail"] == 1, f"{_where(r)}: {r['ptx']}"
    for kernel in ("ce_fwd", "ce_bwd"):
        for r in _of(compiled, kernel):
            assert r["ptx"]["assertfail"] == 0, f"{_where(r)}: {r['ptx']}"


def test_cross_entropy_moves_16_byte_vectors_on_padded_rows(compiled):
    """On the models' padded vocabulary (rows of 30528 bf16, a multiple of 8 elements), the
    cross-entropy's forward loads and its backward loads and stores 16-byte vectors."""
    for kernel, store in (("ce_fwd", False), ("ce_bwd", True)):
        for r in _of(compiled, kernel):
            if "bf16" in r["case"]:
                ptx = r["ptx"]
                assert ptx["ld_v4"] > 0 and (ptx["st_v4"] > 0 or not store), f"scalar access in {_where(r)}: {ptx}"


def test_pipelined_layer_norm_loops_prefetch_and_only_they(compiled):
    """The pipelined add+LN variants (STAGES > 1, and the column sums of their backward) copy the
    next tile's or rows' inputs into shared memory in 16-byte cp.async while the current one is
    computed; the default kernels, which were timed, compile as before, without."""
    for kernel in ("add_ln_fwd_rows_pipelined", "add_ln_bwd_pipelined", "sum_rows_pipelined"):
        for r in _of(compiled, kernel):
            assert r["constexprs"]["STAGES"] > 1 and r["ptx"]["cp_async_16"] > 0, f"no 16-byte cp.async in {_where(r)}"
    for kernel in ("add_ln_fwd", "add_ln_fwd_rows", "add_ln_bwd", "sum_rows"):
        for r in _of(compiled, kernel):
            assert r["ptx"]["cp_async_16"] == 0, f"cp.async in {_where(r)}"


def test_looping_layer_norm_plans_fit_their_register_budget(compiled):
    """rows_plan and backward_plan size their grids to the programs that fit on an SM at once,
    from per-thread register budgets: a kernel over its budget would make the grid run in two
    waves. Every compile of the looping kernels stays within the figure its plan assumes."""
    aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
    for kernel in ("add_ln_fwd_rows", "add_ln_fwd_rows_pipelined"):
        for r in _of(compiled, kernel):
            budget = aln.DROPOUT_ROWS_REGS if r["constexprs"]["DROPOUT"] else aln.ROWS_REGS
            assert r["n_regs"] <= budget, f"{r['n_regs']} registers > {budget}: {_where(r)}"
    for kernel in ("add_ln_bwd", "add_ln_bwd_pipelined"):
        for r in _of(compiled, kernel):
            if r["constexprs"]["SINGLE"]:
                assert r["n_regs"] <= aln.BACKWARD_REGS, f"{r['n_regs']} registers > {aln.BACKWARD_REGS}: {_where(r)}"


def test_fast_gelu_uses_the_special_function_unit_and_only_it_does(compiled):
    """FAST_GELU compiles to PTX's rcp.approx.ftz and ex2.approx.ftz (one MUFU op each) in every
    GELU kernel; the exact maths (libdevice's erf, IEEE division) never does."""
    kernels = ("linear_gelu_fwd", "linear_gelu_tma", "gelu_bwd", "gelu_bwd_db")
    results = [r for k in kernels for r in _of(compiled, k)]
    assert any(r["constexprs"]["FAST_GELU"] for r in results)
    for r in results:
        used = r["ptx"]["rcp_approx_ftz"] > 0 and r["ptx"]["ex2_approx_ftz"] > 0
        assert used == r["constexprs"]["FAST_GELU"], f"{r['ptx']}: {_where(r)}"


def test_atomic_dq_adds_fp32_vectors_and_nothing_else_adds(compiled):
    """The portable dK/dV pass with ATOMIC_DQ (attention.VARIANTS["dq"]) sums dQ with 16-byte fp32
    vector reductions on sm_90; without it, in the dQ pass and in the one-kernel backward (ONE_PASS,
    which stores dQ), nothing is added to memory."""
    atomic = _of(compiled, "attn_bwd_dkdv_atomic")
    assert {r["arch"] for r in atomic} == {80, 90}
    for r in atomic:
        if r["arch"] == 90:
            assert r["ptx"]["add_v4_f32"] > 0, f"no fp32 vector add in {_where(r)}"
    one_pass = _of(compiled, "attn_bwd_dkdv_one_pass64") + _of(compiled, "attn_bwd_dkdv_one_pass128")
    for r in _of(compiled, "attn_bwd_dkdv") + _of(compiled, "attn_bwd_dq") + one_pass:
        assert r["ptx"]["add_v4_f32"] == 0, _where(r)
    spilling = [r for r in atomic if r["arch"] == 90 and r["case"] == "bf16 d64" and r["spill_bytes"]
                and r["constexprs"].get("BLOCK_N") != 128]
    assert not spilling, [_where(r) for r in spilling]


def test_hopper_kernels_are_wgmma_tma_and_spill_free(compiled):
    """The design of kernels/attention_hopper.py (forward) and attention_hopper_bwd.py (dK/dV and
    dQ), checked on their sm_90a compiles (every autotune config and every flag case): their
    dots lower to wgmma (tl.dot on Hopper; the forward's BLOCK_M=128 over 8 warps is two
    warpgroups), their tiles come by TMA (cp.async.bulk.tensor, from the in-kernel tensor
    descriptors), and no config spills a register (a spill would be a slow path kept quiet)."""
    hopper = [r for r in compiled["results"] if r["kernel"].endswith("_hopper")]
    kernels = {r["kernel"] for r in hopper}
    assert kernels == {"attn_fwd_hopper", "attn_bwd_dkdv_hopper", "attn_bwd_dkdv_wide_hopper",
                       "attn_bwd_dkdv_atomic_hopper", "attn_bwd_dq_hopper"}, (
        f"Hopper kernels missing from tests/triton_compile_check.py's jobs: {kernels}")
    assert all(r["arch"] == 90 for r in hopper)
    problems = []
    for r in hopper:
        if not r["ok"]:
            continue  # reported by test_every_kernel_compiles
        if not r["ptx"]["wgmma"]:
            problems.append(f"no wgmma.mma_async: {_where(r)}")
        if not r["ptx"]["tma"]:
            problems.append(f"no cp.async.bulk.tensor: {_where(r)}")
        if r["spill_bytes"]:
            problems.append(f"{r['spill_bytes']} B of spills: {_where(r)}")
        # Atomic dQ (ATOMIC_DQ) adds its fp32 tiles in 16-byte vectors; nothing else adds.
        if bool(r["ptx"]["add_v4_f32"]) != bool(r["constexprs"].get("ATOMIC_DQ")):
            problems.append(f"{r['ptx']['add_v4_f32']} fp32 vector adds: {_where(r)}")
    assert not problems, "\n".join(problems)
    # Where the descriptors come from: made in the kernel, each is fenced for the TMA unit in
    # every program; passed from the host (HOST_DESC), none is. Each kernel compiles both ways.
    for kernel in kernels:
        made = [r for r in hopper if r["kernel"] == kernel and r["ok"]]
        host = [r for r in made if r["constexprs"].get("HOST_DESC")]
        assert host and len(host) < len(made), kernel
        assert not any(r["ptx"]["tensormap_fence"] for r in host), kernel
        assert all(r["ptx"]["tensormap_fence"] for r in made if r not in host), kernel
    # The control: the portable kernels' sm_90 compiles load through pointers (cp.async at
    # most), so the TMA needle above tells the two designs apart.
    portable = [r for r in compiled["results"] if r["kernel"].startswith("attn_") and r["arch"] == 90 and r["ok"]
                and not r["kernel"].endswith("_hopper")]
    assert portable and not any(r["ptx"]["tma"] for r in portable)
    # Warp specialization (setmaxnreg between producer and consumer partitions) is not applied
    # on sm_90 by Triton 3.6/3.9 (attention_hopper.py's docstring); report it if that changes.
    specialized = [r for r in hopper if r["ok"] and r["ptx"]["setmaxnreg"]]
    print(f"\nHopper kernels: {len(hopper)} compiles, {len(specialized)} warp-specialized (setmaxnreg)")
