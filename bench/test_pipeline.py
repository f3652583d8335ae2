"""Whole Flux2KleinPipeline calls on the FLUX.2-klein-9B architecture (random weights; a tiny preset on the CPU): the
drop-in given fixed scores, with each built-in selector (their difference is what a selector costs inside a call),
the plain pipeline keeping every reference token, and a call without references."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("pipeline"))
def test_pipeline_call(bench_impl, config, impl):
    bench_impl("pipeline", config, impl)
