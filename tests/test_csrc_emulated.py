"""csrc/add_layer_norm.cu, csrc/gelu.cu and csrc/attention_backward_rows.cu run on the CPU: their kernels and host dispatch compiled with g++ against
a stand-in for the CUDA runtime (tests/csrc_emulation/cuda_runtime.h: a fiber per CUDA thread,
barriers for __syncthreads and warp shuffles) and checked against a float64 reference by
tests/csrc_emulation/add_layer_norm_driver.cpp: forward (y, stream, mean, rstd, and y again with
the statistics skipped) and backward (dh, its copy, dweight and dbias through the partial-row
kernel), fp32/fp16/bf16, aligned and unaligned row configs, optional arguments present and
absent, a grid small enough that row groups sum several rows; and by
tests/csrc_emulation/gelu_driver.cpp: GELU and dGELU, both forms, 16-byte vector and element
kernels, lengths around the vector width, nothing written past the end; and by
tests/csrc_emulation/attention_backward_rows_driver.cpp: the attention backwards' delta
preprocess and dq conversion, every threads-a-row config, strided and misaligned rows.

This proves the indexing, the reductions, the config dispatch and the barriers, not speed,
memory alignment, or races between two warps' accesses inside one stretch between barriers
(a fiber runs such a stretch without a switch; compute-sanitizer on a GPU checks those). Each
CUDA thread is a fiber, and a block's warps run in a random order, one as far ahead of the
others as barriers let it: a missing __syncthreads gives wrong results
(tests/csrc_emulation/emulator_selftest.cpp checks the stand-in itself). Every add+LN hidden
size that picks its own config runs by default (~20 s); FUSEFORMER_EMULATE_HIDDEN="..."
chooses others.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "csrc_emulation"
DEFAULT_HIDDEN = "1 40 100 256 264 768 1023 1024 1536 2048 4096 4099 8192"


def _emulated_source(cu_text, min_launches):
    text = cu_text.replace("__shared__ alignas(16)", "alignas(16) static").replace("__shared__", "static")
    text, launches = re.subn(r"(\w+<[^<>]*>)<<<(.*?)>>>\(", r"emu::launch(\1, \2, ", text)
    assert launches >= min_launches, f"expected at least {min_launches} kernel launches, rewrote {launches}"
    return text


def _compile(out, binary, *sources):
    """g++ the sources against the stand-in into out/binary (skips where this g++ cannot)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found")
    binary = out / binary
    cmd = [cxx, "-std=c++20", "-O1", "-w", f"-I{EMULATION}", f"-I{ROOT / 'csrc'}", *map(str, sources), "-o", str(binary)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and ("_Float16" in result.stderr or "ucontext" in result.stderr):
        pytest.skip(f"this g++ lacks _Float16 or <ucontext.h>: {result.stderr[-300:]}")
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return binary


def _build(tmp_path_factory, name, min_launches):
    """csrc/NAME.cu with tests/csrc_emulation/NAME_driver.cpp, built with g++ against the stand-in."""
    out = tmp_path_factory.mktemp("emulated")
    source = out / f"{name}_emulated.cpp"
    source.write_text(_emulated_source((ROOT / "csrc" / f"{name}.cu").read_text(), min_launches))
    return _compile(out, f"{name}_emulated", source, EMULATION / f"{name}_driver.cpp")


def _run_ok(binary, *args):
    result = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("OK"), result.stdout[-3000:]


def test_the_stand_in_sums_right_and_catches_missing_barriers_and_deadlocks(tmp_path_factory):
    """The stand-in itself: a block-wide sum through shuffles and shared memory is right for one
    to 32 warps; with either of its two __syncthreads left out it comes out wrong (the schedule
    lets one warp run ahead); and a thread returning before a barrier the others wait at aborts
    with a message instead of hanging."""
    binary = _compile(tmp_path_factory.mktemp("emulator"), "emulator_selftest", EMULATION / "emulator_selftest.cpp")
    _run_ok(binary)
    result = subprocess.run([str(binary), "deadlock"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "deadlock in block 0: 63 threads wait" in result.stderr, result


def test_add_layer_norm_kernels_match_the_reference_on_the_cpu(tmp_path_factory):
    # the forward, backward and partial-sum launches
    binary = _build(tmp_path_factory, "add_layer_norm", 3)
    _run_ok(binary, *os.environ.get("FUSEFORMER_EMULATE_HIDDEN", DEFAULT_HIDDEN).split())


def test_attention_backward_row_kernels_match_the_reference_on_the_cpu(tmp_path_factory):
    # the preprocess launch and the convert's two (vector and element)
    binary = _build(tmp_path_factory, "attention_backward_rows", 3)
    _run_ok(binary)


def test_gelu_kernels_match_the_reference_on_the_cpu(tmp_path_factory):
    """csrc/gelu.cu's forward and dGELU, 16-byte vectors and one element at a time: every dtype,
    both GELU forms, lengths around the vector width, aligned and one-element-off pointers,
    nothing written past the end (tests/csrc_emulation/gelu_driver.cpp)."""
    binary = _build(tmp_path_factory, "gelu", 4)  # forward and backward, vector and element kernels
    _run_ok(binary)
