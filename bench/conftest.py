"""pytest-benchmark suite: ``pytest bench/`` runs every case of ``sparsectx.benchmarks`` with tiny shapes on the
CPU and the real shapes on a GPU (bf16). Each test first checks the implementation's result against sparsectx's
(or, for sparsectx itself, against a peer's), so nothing wrong is ever timed; there are no timing assertions.

CPU runs time the torch reference path, or the Triton interpreter when TRITON_INTERPRET=1 is exported: their
times say nothing about a GPU. ``sparsectx bench`` prints the same cases as a table with ratios.
"""
import pytest
import torch

from sparsectx import benchmarks

# warnings about choices made on purpose on the CPU (eager FlexAttention; SDPA's strided-nested fallback)
EXPECTED_WARNINGS = ("ignore:flex_attention called without torch.compile:UserWarning",
                     "ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
# pytest-benchmark rounds: few on the CPU (tiny shapes, slow paths); slow GPU steps use the workload's own count
CPU_ROUNDS = 5


def pytest_configure(config):
    for line in EXPECTED_WARNINGS:
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def bench_device():
    return benchmarks.default_device()


@pytest.fixture(scope="module")
def workload_for(bench_device):
    """Builds a case's workload for a config, keeping only the latest one alive (GPU memory)."""
    cache = {}

    def get(case_name, config):
        key = (case_name, repr(config))
        if key not in cache:
            cache.clear()
            case = benchmarks.CASES[case_name]
            cache[key] = case.build(config, benchmarks.default_size(bench_device), bench_device)
        return cache[key]

    yield get
    cache.clear()
    benchmarks.release_cached_models()


@pytest.fixture
def bench_impl(benchmark, workload_for, bench_device):
    """``bench_impl(case, config, impl)``: checks one implementation's result, then benchmarks it."""

    def run(case_name, config, impl_name):
        workload = workload_for(case_name, config)
        try:
            fn, result, expected = benchmarks.checked_run(workload, impl_name)
        except benchmarks.Unavailable as exc:
            pytest.skip(str(exc))
        impl = workload.impl(impl_name)
        if impl.comparable and expected is not None:  # against the comparison result, or the workload's
            # higher-precision reference (None: no peer runs here, the row's own verify checks it)
            problem = benchmarks.comparison_problem(workload, impl, result, expected)
            assert not problem, problem
        if impl.verify is not None:  # a result with its own check (e.g. a part of a step, an adaptive budget)
            problem = impl.verify(result)
            assert not problem, problem
        elif not impl.comparable:  # a reference point computing a different function: same shape, finite values
            problem = benchmarks.reference_point_problem(result, expected)
            assert not problem, problem
        del result, expected

        def timed():
            fn()
            if bench_device.type == "cuda":
                torch.cuda.synchronize(bench_device)

        benchmark.extra_info.update(case=case_name, shape=workload.shape, impl=impl_name)
        reps = None if impl.short else workload.reps
        with impl.context():  # e.g. sparsectx enabled once, outside the timed calls
            if bench_device.type == "cuda" and reps is None:
                benchmark(timed)
            else:
                benchmark.pedantic(timed, rounds=reps or CPU_ROUNDS, warmup_rounds=1, iterations=1)
        median = benchmark.stats.stats.median if benchmark.stats else None
        if median:
            if workload.flops:
                benchmark.extra_info["tflops"] = workload.flops / median / 1e12
            if workload.bytes_moved:
                benchmark.extra_info["gbps"] = workload.bytes_moved / median / 1e9

    return run
