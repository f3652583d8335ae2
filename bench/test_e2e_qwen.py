"""One denoising step of the Qwen-Image-Edit-20B architecture (random weights; a tiny preset on the CPU) with the
reference tokens (reference i as frame i + 1) kept by ``sparsectx.enable``, the references shrunk to the kept count
(the compacted ideal's speed), all kept, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_qwen"))
def test_denoising_step(bench_impl, config, impl):
    bench_impl("e2e_qwen", config, impl)
