"""Sparse attention forward: one sample (compacted and gather paths), a mixed-budget batch, and the dense layout
with a key keep-mask, each against the PyTorch peers (SDPA backends, padding, loops, FlexAttention, nested)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("attention"))
def test_single_sample(bench_impl, config, impl):
    bench_impl("attention", config, impl)


@pytest.mark.parametrize("config, impl", **param_grid("batch"))
def test_mixed_budget_batch(bench_impl, config, impl):
    bench_impl("batch", config, impl)


@pytest.mark.parametrize("config, impl", **param_grid("masked"))
def test_dense_key_mask(bench_impl, config, impl):
    bench_impl("masked", config, impl)
