"""A few of `fuseformer bench`'s cases through pytest-benchmark's `benchmark` fixture, for
people whose tooling collects pytest-benchmark JSON (history, --benchmark-compare).

CUDA only: conftest.py skips the `benchmark` marker without a GPU, and pytest.ini passes
--benchmark-disable by default. On a GPU runner:

    python -m pytest -m benchmark --benchmark-enable tests/test_bench_pytest_benchmark.py

Each case is prepared exactly as the harness prepares it (parity first, on the same
inputs); an implementation that fails parity fails the test instead of being timed.
"""
import pytest
import torch

pytestmark = pytest.mark.benchmark

CASES = ["attn_fwd_d64_L2048", "attn_fwd_pad_d64_L512", "add_ln_fwd_16384x768", "linear_gelu_fwd_erf_16384x768x3072"]
IMPLS = ["fuseformer-triton", "sdpa-best-or-eager"]


def _prepared(name):
    from fuseformer.bench import ops, timing

    device = torch.device("cuda")
    [case] = [c for c in ops.cases("cuda") if c.name == name]
    return case.prepare(device, torch.bfloat16, timing.l2_bytes(device))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_bench_case(benchmark, name, impl):
    prepared = _prepared(name)
    for checked, checks in prepared.parity.items():
        if prepared.kinds.get(checked) == "ours":
            assert all(p.ok for _, p in checks), f"{name} / {checked}: parity failed: {checks}"
    if impl == "sdpa-best-or-eager":
        # One baseline per case: the first SDPA backend that accepted it, else eager PyTorch.
        names = [n for n in prepared.fns if n.startswith("sdpa-") and n != "sdpa-math"] or ["torch-eager"]
        impl = names[0]
    if impl not in prepared.fns:
        pytest.skip(f"{impl}: {prepared.refused.get(impl) or prepared.errors.get(impl) or 'not run here'}")
    fn = prepared.fns[impl]
    benchmark.extra_info.update(case=name, impl=impl)

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=5, rounds=30, iterations=1)
