"""FLUX's rotary tables (pos_embed) of one forward: sparsectx's one launch against diffusers' module; every result
must equal sparsectx's bit for bit."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("rope_tables"))
def test_rope_tables(bench_impl, config, impl):
    bench_impl("rope_tables", config, impl)
