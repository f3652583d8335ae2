"""Training step of attention (forward + backward) on a mixed-budget batch against padded + key-mask SDPA and a
per-sample SDPA loop; output and the gradients of q, k, v must match."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("training"))
def test_training_step(bench_impl, config, impl):
    bench_impl("training", config, impl)
