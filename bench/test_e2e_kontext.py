"""One denoising step of the FLUX.1-Kontext-12B architecture (random weights; a tiny preset on the CPU) with the
reference tokens (reference i on id plane i + 1) compacted by sparsectx, by plain torch, all kept, and none (the
limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_kontext"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_kontext", config, impl)
