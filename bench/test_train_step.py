"""One fine-tuning step (forward + backward, gradient checkpointing) of the FLUX.2-klein-9B architecture (random
weights; a tiny preset on the CPU) with its references dropped at a keep ratio: the drop-in with
random_drop_selector (dropped tokens removed from the sequence) against drop training (dropped tokens masked in
attention), keeping every reference token, and none (the limit)."""
import pytest

from sparsectx.benchmarks import param_grid


@pytest.mark.parametrize("config, impl", **param_grid("train_step"))
def test_train_step(bench_impl, config, impl):
    bench_impl("train_step", config, impl)
