"""One FLUX.2-klein-9B step (random weights; a tiny preset on the CPU) for a batch of requests that keep 5/10/25/50%
of their reference's tokens: sparsectx.enable running them as one packed sequence, as exact groups (sparsectx or
native attention), a loop of per-request steps compacted by hand (checked equal), and the dense batch keeping
every token."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("e2e_batch"))
def test_mixed_budget_batch_step(bench_impl, config, impl):
    bench_impl("e2e_batch", config, impl)
