"""One denoising step of the Z-Image Omni architecture (diffusers' default config with SigLIP features, random
weights; a tiny preset on the CPU) with the reference tokens dropped by sparsectx, the model on the compacted rows,
all kept, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_zimage"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_zimage", config, impl)
