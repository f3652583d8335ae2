"""One denoising step of the FLUX.3 architecture (diffusers' default config, random weights; a tiny preset on the
CPU) with the reference tokens (the model's own input) compacted by sparsectx, by plain torch, all kept, and none
(the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_flux3"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_flux3", config, impl)
