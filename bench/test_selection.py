"""Selection cost (issue 6): every registered selector with a fixed 10% budget (checked against the same top-k
computed by plain torch from the selector's scores) and with an adaptive budget (checked to stay within its floor
and cap per image)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("selection"))
def test_selection(bench_impl, config, impl):
    bench_impl("selection", config, impl)
