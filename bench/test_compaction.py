"""Token compaction (scores + budget -> packed hidden states and ids) against x[mask], index_select and
topk+sort+gather; every result must equal sparsectx's exactly."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("compaction"))
def test_compaction(bench_impl, config, impl):
    bench_impl("compaction", config, impl)
