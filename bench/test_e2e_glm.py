"""A GLM-Image call's reference work (each reference written into the KV cache by a forward of its own) and 4 steps
reading the cache, GLM-Image DiT architecture (released config, random weights; a tiny preset on the CPU), with the
reference tokens dropped by sparsectx, the model writing the kept rows, all kept, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_glm"))
def test_call(bench_impl, config, impl):
    bench_impl("e2e_glm", config, impl)
