"""QK RMS norm + [text, image] join + RoPE of a klein-9B attention layer: sparsectx's one pass against diffusers'
eager code and its torch.compile; every result must be close to sparsectx's."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("norm_rope"))
def test_norm_rope(bench_impl, config, impl):
    bench_impl("norm_rope", config, impl)
