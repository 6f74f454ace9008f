"""Test set-up. Triton's interpreter must be switched on before any @triton.jit function is
decorated, so this runs before fuseformer is imported, and only where no CUDA device exists
(on a GPU runner the same tests run the real kernels)."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
# bench/triton_cache.py runs the GPU session's tests in a process of its own with a stand-in
# Triton driver, on CPU tensors, to compile their kernels for sm_90 ahead of a GPU session:
# no interpreter there, and nothing skipped for want of a GPU.
OFFLINE_SM90 = os.environ.get("FUSEFORMER_OFFLINE_SM90") == "1"
if not HAS_CUDA and not OFFLINE_SM90:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import compile_ahead  # noqa: E402

if os.environ.get("FUSEFORMER_TRITON_COMPILE_LOG"):  # bench/gpu_session.sh: what a GPU session compiles
    from fuseformer.bench.triton_cache import log_compiles_from_env

    log_compiles_from_env()

if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y"):  # as Triton reads it
    # Out-of-bounds loads/stores become errors naming the kernel instead of heap corruption.
    import interpreter_sanitizer

    interpreter_sanitizer.install()
    # triton.language patched once per launch, not again at every jit helper call (24 of 71 s
    # of a profiled BERT convergence run went there).
    import interpreter_calls

    interpreter_calls.install()

# The interpreter runs on numpy; two cores here, so keep torch from oversubscribing them.
if not HAS_CUDA:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.pluginmanager.register(compile_ahead, "fuseformer-compile-ahead")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA or OFFLINE_SM90:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords or "benchmark" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
