"""One denoising step of the LongCat-Image-Edit-6B architecture (random weights; a tiny preset on the CPU) with the
reference tokens (the target on id plane 1, reference i on plane i + 2) compacted by sparsectx, by plain torch, all
kept, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_longcat"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_longcat", config, impl)
