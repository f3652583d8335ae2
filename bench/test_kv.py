"""A 4-step run of the FLUX.2-klein-9B architecture (random weights; a tiny preset on the CPU) with diffusers'
reference KV cache: sparsectx.enable compacting the extract step (checked against compacting by hand), the KV cache
alone, the plain run without cache, and no reference (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("kv"))
def test_kv_cache_run(bench_impl, config, impl):
    bench_impl("kv", config, impl)
