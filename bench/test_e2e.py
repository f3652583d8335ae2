"""One denoising step of the FLUX.2-klein-9B architecture (random weights; a tiny preset on the CPU) with the
reference tokens compacted by sparsectx, by plain torch, all kept, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e", config, impl)
