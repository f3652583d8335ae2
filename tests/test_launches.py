"""Kernel launches per call of the hot paths. On the GPU machines each launch cost 15-40 us of host time
(bench/RESULTS.md, 2026-11-30), and several measured rows are bound by that host work, not by the GPU: the number of
launches an op makes is part of its performance, and a change that adds a top-level aten op or a Triton launch
fails here. (A top-level aten op counts once, whatever it runs inside: ``x[long_index]`` and ``x[bool_mask]`` give
the same record, though on a GPU the second also runs ``nonzero`` and reads the host; host reads are
``sparsectx.diagnostics.count_host_reads``' to count.)

Triton launches are counted exactly: every ``kernel[grid](...)`` goes through ``KernelInterface.__getitem__``, the
base of jitted, interpreted and autotuned kernels (a dunder, looked up on the type, so no instance attribute left by
another test's monkeypatch can hide a launch; an autotuner's benchmark runs are not counted). aten ops are counted
by the profiler's CPU events: a top-level aten event counts as a launch unless it and everything it calls only
allocate or make views (``_NO_DATA``). The paths checked here make no CPU-only check (those read the data on the
host, which a GPU run skips), so the counts are the GPU's.
"""
import contextlib
import sys

import pytest
import torch

import sparsectx
from sparsectx import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(ops.backend_for(DEVICE) == ops.TORCH_REFERENCE,
                                reason="the Triton kernels do not run here")

# aten ops that neither launch a kernel nor write data: allocations and views
_NO_DATA = {f"aten::{name}" for name in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "reshape", "_reshape_alias",
    "_unsafe_view", "as_strided", "slice", "select", "alias", "resolve_conj", "resolve_neg", "unflatten", "flatten",
    "transpose", "permute", "expand", "unsqueeze", "squeeze", "detach", "t", "unbind", "split", "split_with_sizes",
    "chunk", "narrow", "contiguous", "view_as_real", "lift_fresh")}


_LAUNCH = "sparsectx-test::triton-launch"


def _top_level(event) -> bool:
    """An aten event called by no other aten op and not inside a Triton launch."""
    parent = event.cpu_parent
    if parent is not None and parent.name.startswith("aten::"):
        return False
    while parent is not None:
        if parent.name == _LAUNCH:
            return False
        parent = parent.cpu_parent
    return True


def _writes_data(event) -> bool:
    return event.name not in _NO_DATA or any(_writes_data(child) for child in event.cpu_children
                                             if child.name.startswith("aten::"))


@contextlib.contextmanager
def _launches():
    """``{"triton": [kernel names], "aten": [top-level aten ops that launch]}`` of the block, in order."""
    from triton.runtime.jit import KernelInterface

    record = {"triton": [], "aten": []}
    real = KernelInterface.__getitem__

    def counting(kernel, grid):
        launch = real(kernel, grid)
        jitted = kernel.fn if hasattr(kernel.fn, "fn") else kernel  # an autotuner wraps the jitted function

        def run(*args, **kwargs):
            record["triton"].append(jitted.fn.__name__)
            with torch.profiler.record_function(_LAUNCH):  # (the interpreter runs aten ops of its own in there)
                return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = counting
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            yield record
    finally:
        KernelInterface.__getitem__ = real
    record["aten"] = [e.name for e in profile.events() if e.name.startswith("aten::") and _top_level(e)
                      and _writes_data(e)]


@pytest.fixture(autouse=True)
def _buffers_not_poisoned(monkeypatch):
    """The launchers' buffers as they allocate them: the suite's poisoning (conftest) fills them, a launch each."""
    for name in ops._KERNEL_MODULES:
        monkeypatch.setattr(sys.modules[name], "torch", torch)


def _counted(fn):
    fn()  # compiles, and on a GPU autotunes (its benchmark launches are not the call's)
    with _launches() as launches:
        fn()
    return launches


def test_the_counter_sees_launches_and_skips_views_and_allocations():
    x = torch.randn(4, 6, device=DEVICE)
    with _launches() as launches:
        x.view(6, 4).unsqueeze(0).reshape(24)[1:].contiguous().t()  # views only
        torch.empty(3, device=DEVICE)
        x.sum(0)
        torch.zeros(2, device=DEVICE)
        x.t().contiguous()  # a copy
        x.t().reshape(24)  # a copy
    assert launches == {"triton": [], "aten": ["aten::sum", "aten::zeros", "aten::contiguous", "aten::reshape"]}, \
        launches


def test_kept_queries_in_place_launch_four_kernels_and_one_fill():
    """masked_attention with its query mask as the key mask, no autograd: the mask's block counts and index, one
    copy of the kept keys and values, the attention (queries read and outputs written in place) and the output's
    zero fill. Nothing else: no mask reduction, no query copy, no scatter, no filled dummy."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 40, 2, 16, generator=g).to(DEVICE) for _ in range(3))
    mask = (torch.rand(2, 40, generator=g) < 0.4).to(DEVICE)
    launches = _counted(lambda: sparsectx.masked_attention(q, k, v, mask, query_mask=mask))
    assert launches == {"triton": ["_block_counts_kernel", "_write_index_kernel", "_gather_rows_kernel",
                                   "_fwd_kernel"],
                        "aten": ["aten::zeros"]}, launches


def test_a_mask_is_compacted_by_two_kernels_without_a_reduction():
    from sparsectx.kernels import compaction

    mask = (torch.rand(3, 2500, generator=torch.Generator().manual_seed(4)) < 0.3).to(DEVICE)
    launches = _counted(lambda: compaction.compact_index(mask, None, mask.numel()))
    assert launches == {"triton": ["_block_counts_kernel", "_write_index_kernel"], "aten": []}, launches


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_norm_rope_of_two_streams_launches_once_per_pass(backward):
    """The text prefix and the image tokens in one launch per pass; the backward's only other launch sums the
    programs' partial rows into both weights' gradients, in their dtype."""
    g = torch.Generator().manual_seed(5)
    dtype = torch.float16
    text, image = (torch.randn(1, n, 2, 16, generator=g).to(DEVICE, dtype).requires_grad_(backward) for n in (5, 19))
    weights = [torch.randn(16, generator=g).to(DEVICE, dtype).requires_grad_(backward) for _ in range(2)]
    angles = torch.rand(24, 8, generator=g).to(DEVICE)
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    upstream = torch.randn(1, 24, 2, 16, generator=g).to(DEVICE, dtype)

    def call():
        out = sparsectx.rms_norm_rope(image, cos, sin, weights[1], 1e-6, prefix=text, prefix_weight=weights[0])
        return torch.autograd.grad(out, (image, text, *weights), upstream) if backward else out

    launches = _counted(call)
    if not backward:
        assert launches == {"triton": ["_rms_norm_rope_kernel"], "aten": []}, launches
        return
    assert launches == {"triton": ["_rms_norm_rope_kernel", "_rms_norm_rope_bwd_kernel", "_weight_grads_kernel"],
                        "aten": []}, launches


def test_rope_tables_of_four_axes_launch_one_kernel():
    """FLUX.2's rotary tables (four position axes): one launch for both tables, where diffusers' module runs about
    thirteen ops per axis."""
    ids = torch.randint(0, 64, (50, 4), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    freqs = torch.rand(32, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    launches = _counted(lambda: sparsectx.rope_tables(ids, freqs, [8, 8, 8, 8]))
    assert launches == {"triton": ["_rope_tables_kernel"], "aten": []}, launches


@pytest.mark.parametrize("budget_name", ["fixed", "adaptive"])
def test_a_budget_ranks_by_one_sort_and_one_kernel(budget_name):
    """A selection budget on scores of images of one length (the klein references): one sort of the (sample,
    image) rows and the ranking kernel, which writes the keep mask and the adaptive counts; before it, an adaptive
    budget ran some twenty ops after its sort (the mass, its prefix sums, the counts, the scatter of the mask). The
    adaptive budget's one host read (its scores' range: NaN, +inf and sign) is its `aminmax`; a fixed ratio's counts
    are a shared constant, copied for the result."""
    from sparsectx.selection import adaptive, fixed_ratio

    scores = torch.rand(1, 3 * 64, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    if budget_name == "fixed":
        launches = _counted(lambda: fixed_ratio(0.1)(scores, [64] * 3, nan_checked=True))
        expected_aten = ["aten::sort", "aten::clone"]
    else:
        launches = _counted(lambda: adaptive(0.9, floor=0.02, cap=0.5)(scores, [64] * 3))
        expected_aten = ["aten::aminmax", "aten::stack", "aten::sort"]
    assert launches == {"triton": ["_ranked_keep_kernel"], "aten": expected_aten}, launches
