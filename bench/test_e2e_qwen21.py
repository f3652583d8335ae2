"""One denoising step of the Qwen-Image 2.1 architecture (diffusers' default config, random weights; a tiny preset
on the CPU) with the condition tokens dropped by sparsectx, the model on the compacted sequence, all kept, and none
(the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_qwen21"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_qwen21", config, impl)
