"""Dispatch: which implementation each device/dtype takes, and that every path computes the same function."""
import functools
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsectx
from sparsectx import ops


def _prints_ok_in_a_fresh_process(script: str) -> None:
    """Runs ``script`` in a new Python process without TRITON_INTERPRET (the scripts set it themselves, at the
    moment they test) and checks that it printed ``ok``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_backend_for_follows_device_dtype_and_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for("cpu", torch.float16) == ops.TRITON_INTERPRETER
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER
    # the interpreter computes bf16 wrongly: bf16 on the CPU takes the torch reference
    assert ops.backend_for("cpu", torch.bfloat16) == ops.TORCH_REFERENCE
    assert ops.backend_for("meta", torch.float16) == ops.TORCH_REFERENCE
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for("cpu", torch.float16) == ops.TORCH_REFERENCE
    # CUDA tensors take the kernels when they were built for a GPU, not the interpreted ones of a CPU test run
    # (tests/conftest.py imports the kernels at start-up, in the suite's mode)
    assert ops.backend_for("cuda", torch.bfloat16) == (ops.TRITON_GPU if ops._triton_available()
                                                       and torch.cuda.is_available() else ops.TORCH_REFERENCE)


def test_the_interpreter_flag_is_read_as_triton_reads_it(monkeypatch):
    """Triton builds its kernels for the interpreter under TRITON_INTERPRET=true (or yes, on, y, any case), which
    sparsectx read as false: the ops took the torch reference, and the kernel tests compared it with itself."""
    triton = pytest.importorskip("triton")
    for value in ("1", "true", "TRUE", "Yes", "on", "y", "0", "false", "no", "2", "", " 1"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert ops.interpreter_enabled() == triton.knobs.runtime.interpret, value
    # before Triton is imported (import sparsectx does not import it): the same words, read by sparsectx
    with monkeypatch.context() as before_triton:
        before_triton.delitem(sys.modules, "triton")
        for value in ("1", "true", "TRUE", "Yes", "on", "y", "0", "false", "no", "2", ""):
            monkeypatch.setenv("TRITON_INTERPRET", value)
            assert ops.interpreter_enabled() == triton.knobs.runtime.interpret, value
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert ops.backend_for("cpu", torch.float32) == (ops.TRITON_INTERPRETER if ops._kernels_built_as(True)
                                                     else ops.TORCH_REFERENCE)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not ops.interpreter_enabled()


def test_a_misspelt_autotune_setting_is_refused(monkeypatch):
    """SPARSECTX_AUTOTUNE=off (or false) kept every candidate: only "0" was read."""
    from sparsectx.kernels._launch import autotune_all_configs

    for value, expected in (("0", False), ("off", False), ("False", False), ("1", True), ("on", True)):
        monkeypatch.setenv("SPARSECTX_AUTOTUNE", value)
        assert autotune_all_configs() is expected, value
    monkeypatch.delenv("SPARSECTX_AUTOTUNE")
    assert autotune_all_configs() is True
    monkeypatch.setenv("SPARSECTX_AUTOTUNE", "")  # (set empty: as unset)
    assert autotune_all_configs() is True
    for value in ("2", "fast", " 0"):
        monkeypatch.setenv("SPARSECTX_AUTOTUNE", value)
        with pytest.raises(ValueError, match="SPARSECTX_AUTOTUNE="):
            autotune_all_configs()


def test_backend_for_refuses_what_is_not_a_dtype_or_a_device():
    """A dtype given as a string ("bfloat16") was answered as another dtype (the interpreter, which bf16 never
    takes), and a device name torch does not know raised torch's RuntimeError naming no argument."""
    for dtype in ("bfloat16", 3):
        with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
            ops.backend_for("cpu", dtype)
    with pytest.raises(ValueError, match="device 'nonsense' is not a torch device"):
        ops.backend_for("nonsense", torch.float16)
    for device in (0.5, True, [0]):  # (a bool is no CUDA index; a list was refused as unhashable by the cache)
        with pytest.raises(TypeError, match="device must be a torch.device, a string or a CUDA index"):
            ops.backend_for(device, torch.float16)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ops.backend_for("cpu", [torch.float16])


@pytest.mark.skipif(ops.backend_for("cpu", torch.float32) != ops.TRITON_INTERPRETER,
                    reason="the kernels run through the interpreter here")
def test_a_kept_backend_answer_follows_a_kernel_module_imported_later(monkeypatch):
    """``backend_for`` keeps its answers (every op call asks): a kernel module imported after an answer, built in
    another mode, changes it (here a stand-in module built for a GPU, under TRITON_INTERPRET=1)."""
    import warnings

    name = "sparsectx_test_kernels_imported_later"
    monkeypatch.setattr(ops, "_KERNEL_MODULES", ops._KERNEL_MODULES + (name,))
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER  # (the kept answer)
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(INTERPRETED=False))
    with warnings.catch_warnings():  # (the interpreter-set-late warning, given once per process)
        warnings.simplefilter("ignore")
        assert ops.backend_for("cpu", torch.float32) == ops.TORCH_REFERENCE


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_kernels_imported_without_the_interpreter_are_not_sent_cpu_tensors():
    """triton.jit fixes a kernel's mode at import: TRITON_INTERPRET=1 set after the kernels were imported for a GPU
    (e.g. by ``sparsectx info``) sends CPU tensors to the reference path (before: Triton's '0 active drivers'
    error), and the results are right."""
    script = """
import os, torch, sparsectx
from sparsectx import ops
import sparsectx.kernels.attention, sparsectx.kernels.compaction
assert not sparsectx.kernels.attention.INTERPRETED and not sparsectx.kernels.compaction.INTERPRETED
os.environ["TRITON_INTERPRET"] = "1"
assert ops.backend_for("cpu", torch.float32) == ops.TORCH_REFERENCE, ops.backend_for("cpu", torch.float32)
q = torch.randn(5, 1, 16); cu = torch.tensor([0, 5], dtype=torch.int32)
out = sparsectx.sparse_attention(q, q, q, cu, cu, 5, 5)
torch.testing.assert_close(out, sparsectx.reference.sparse_attention_ref(q, q, q, cu, cu)[0])
kept = sparsectx.compact_tokens(torch.tensor([[0.1, 0.9, 0.5]]), budget=2)
assert kept.index.tolist() == [1, 2], kept.index
print("ok")
"""
    _prints_ok_in_a_fresh_process(script)


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_interpreter_asked_for_after_a_plain_import_runs_the_kernels_interpreted():
    """``import sparsectx`` imports neither Triton nor its kernels: TRITON_INTERPRET=1 set afterwards (and before
    the first op) still runs the ops through the interpreted kernels, with the reference's results and no
    warning."""
    script = """
import os, sys, warnings, torch, sparsectx
from sparsectx import ops
assert "triton" not in sys.modules
os.environ["TRITON_INTERPRET"] = "1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER, ops.backend_for("cpu", torch.float32)
    q = torch.randn(5, 1, 16); cu = torch.tensor([0, 5], dtype=torch.int32)
    out = sparsectx.sparse_attention(q, q, q, cu, cu, 5, 5)
assert sparsectx.kernels.attention.INTERPRETED
torch.testing.assert_close(out, sparsectx.reference.sparse_attention_ref(q, q, q, cu, cu)[0])
assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
print("ok")
"""
    _prints_ok_in_a_fresh_process(script)


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_interpreter_asked_for_after_import_runs_the_reference_and_says_so():
    """TRITON_INTERPRET=1 set after Triton was imported (a notebook cell after torch.compile or another library
    loaded it; ``import sparsectx`` itself no longer does): Triton's own jitted library (``tl.zeros``...) is built
    for a GPU then, so interpreted kernels can not run. Every op crashed ("Cannot call @triton.jit'd outside of the
    scope of a kernel") while ``backend_for`` said "triton-interpreter"; now the reference runs, right, after one
    RuntimeWarning saying what to do."""
    script = """
import os, warnings, torch, triton, sparsectx
from sparsectx import ops
os.environ["TRITON_INTERPRET"] = "1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert ops.backend_for("cpu", torch.float32) == ops.TORCH_REFERENCE, ops.backend_for("cpu", torch.float32)
    q = torch.randn(5, 1, 16); cu = torch.tensor([0, 5], dtype=torch.int32)
    out = sparsectx.sparse_attention(q, q, q, cu, cu, 5, 5)
    kept = sparsectx.compact_tokens(torch.tensor([[0.1, 0.9, 0.5]]), budget=2)
torch.testing.assert_close(out, sparsectx.reference.sparse_attention_ref(q, q, q, cu, cu)[0])
assert kept.index.tolist() == [1, 2], kept.index
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "before importing torch or sparsectx" in messages[0], messages
print("ok")
"""
    _prints_ok_in_a_fresh_process(script)


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_kernel_configs_report_the_autotuner_choices(monkeypatch):
    import triton

    from sparsectx.kernels import attention

    kernel = attention.FWD_TUNERS[0]  # the forward's autotuner for head dims up to 128
    small, big = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4), triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8)
    monkeypatch.setattr(kernel, "configs", [small, big])
    monkeypatch.setattr(kernel, "cache", {(128, True, False, "torch.bfloat16"): big})
    monkeypatch.setattr(kernel, "configs_timings", {small: [0.9, 0.8, 1.0], big: 0.5}, raising=False)
    report = ops.kernel_configs()["fwd"]
    assert report["picked"] == {str((128, True, False, "torch.bfloat16")): str(big)}
    assert report["last_tuned"] == {str(small): 0.9, str(big): 0.5}
    # one candidate: nothing was tuned, nothing is reported
    monkeypatch.setattr(kernel, "configs", [big])
    assert "fwd" not in ops.kernel_configs()


def test_the_suite_runs_the_kernels(device):
    """Without this, every kernel test (attention, compaction, dispatch) would compare the torch reference with
    itself: fp32/fp16 take the Triton kernels here (compiled on a GPU, interpreted on the CPU)."""
    for dtype in (torch.float32, torch.float16):
        assert ops.backend_for(device, dtype) != ops.TORCH_REFERENCE


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(21, 2, 32, generator=g).to(dtype)
    k, v = torch.randn(9, 2, 32, generator=g).to(dtype), torch.randn(9, 2, 32, generator=g).to(dtype)
    ref_k, ref_v = (torch.randn(2, 12, 2, 32, generator=g).to(dtype) for _ in range(2))
    kept = sparsectx.compact_tokens(torch.rand(2, 12, generator=g), budget=[3, 12])
    cu_q = torch.tensor([0, 13, 21], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    return (q, k, v, cu_q, cu_k, 13, 5), dict(ref_k=ref_k, ref_v=ref_v, ref_index=kept.index,
                                              cu_seqlens_ref=kept.cu_seqlens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares the CPU interpreter and reference paths")
def test_interpreter_and_reference_paths_agree(monkeypatch):
    args, kwargs = _inputs(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER
    triton_out = sparsectx.sparse_attention(*args, **kwargs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for("cpu", torch.float32) == ops.TORCH_REFERENCE
    torch_out = sparsectx.sparse_attention(*args, **kwargs)
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares the CPU interpreter and reference paths")
@pytest.mark.parametrize("interpret", ["0", "1"])
@pytest.mark.parametrize("scale", [None, 0.3, -0.7])
def test_gradients_of_both_cpu_paths_at_any_scale(monkeypatch, interpret, scale):
    """Both CPU paths' gradients (out and lse, gathered references) against the fp64 formulas at the default and
    other scales: only the forward was compared across paths, at the default scale, so the reference path's backward
    taking 1/sqrt(D) instead of the scale given passed the suite."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert ops.backend_for("cpu", torch.float32) == (ops.TRITON_INTERPRETER if interpret == "1"
                                                     else ops.TORCH_REFERENCE)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(11, 2, 16, generator=g)
    k, v = torch.randn(7, 2, 16, generator=g), torch.randn(7, 2, 16, generator=g)
    ref_k, ref_v = torch.randn(2, 6, 2, 16, generator=g), torch.randn(2, 6, 2, 16, generator=g)
    index = torch.tensor([4, 0, 2, 5, 1], dtype=torch.int32)
    cu_q, cu_k, cu_r = (torch.tensor(c, dtype=torch.int32) for c in ([0, 5, 11], [0, 3, 7], [0, 3, 5]))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, ref_k, ref_v)]
    out, lse = sparsectx.sparse_attention(*leaves[:3], cu_q, cu_k, 6, 4, ref_k=leaves[3], ref_v=leaves[4],
                                          ref_index=index, cu_seqlens_ref=cu_r, softmax_scale=scale,
                                          return_lse=True)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    torch.autograd.backward([out, lse], [dout, dlse])
    exact = sparsectx.reference.sparse_attention_bwd_ref(
        dout.double(), dlse.double(), q.double(), k.double(), v.double(), cu_q, cu_k, ref_k=ref_k.double(),
        ref_v=ref_v.double(), ref_index=index, cu_seqlens_ref=cu_r, softmax_scale=scale)
    for name, leaf, want in zip(("dq", "dk", "dv", "dref_k", "dref_v"), leaves, exact):
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_half_logits_beyond_the_fp16_range_stay_finite_on_every_cpu_path(monkeypatch, interpret):
    """Legal fp16 inputs whose q.k exceeds fp16's range before scaling (|q.k| = 65536, scale 1e-3): every path
    accumulates in fp32 (the torch reference path too: before, it computed q.k in fp16 and returned NaN), so the
    output is the mean of v and the gradients are finite, also for masked_attention."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q = torch.full((4, 1, 64), 32.0, dtype=torch.float16)
    v = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(0)).half()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    query = q.clone().requires_grad_()
    out, lse = sparsectx.sparse_attention(query, q, v, cu, cu, 4, 4, softmax_scale=1e-3, return_lse=True)
    torch.testing.assert_close(out.float(), v.float().mean(0, keepdim=True).expand(4, 1, 64), rtol=0, atol=2e-3)
    torch.testing.assert_close(lse, torch.full_like(lse, 65.536 + math.log(4)), rtol=1e-5, atol=0)
    out.float().sum().backward()
    assert torch.isfinite(query.grad).all()
    masked = sparsectx.masked_attention(q[None], q[None], v[None], torch.ones(1, 4, dtype=torch.bool),
                                        softmax_scale=1e-3)
    assert torch.isfinite(masked).all()


def test_bf16_on_cpu_runs_the_reference_correctly():
    args, kwargs = _inputs(torch.bfloat16)
    out = sparsectx.sparse_attention(*args, **kwargs)
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kwargs.items()}
    exact, _ = sparsectx.reference.sparse_attention_ref(*args64[:5], **kw64)
    same, _ = sparsectx.reference.sparse_attention_ref(*args[:5], **kwargs)
    assert (out.double() - exact).abs().max() <= 2 * (same.double() - exact).abs().max() + 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_attention_with_query_mask_on_the_reference_path(monkeypatch, dtype):
    """The packed queries are padded to B*S rows (no host sync); every path must return q-shaped outputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 10, 2, 16, generator=g)
    mask = torch.rand(2, 10, generator=g) > 0.4
    leaf = q.to(dtype).requires_grad_(True)
    out = sparsectx.masked_attention(leaf, leaf, leaf, mask, query_mask=mask)
    out.float().sum().backward()
    exact = sparsectx.reference.masked_attention_ref(q.double(), q.double(), q.double(), mask, query_mask=mask)
    same = sparsectx.reference.masked_attention_ref(leaf.detach(), leaf.detach(), leaf.detach(), mask,
                                                    query_mask=mask)
    assert out.shape == q.shape and torch.isfinite(leaf.grad).all()
    assert (out.double() - exact).abs().max() <= 2 * (same.double() - exact).abs().max() + 1e-5


# ----------------------------------------------------------------------------------------------------------------
# inputs every path must handle alike (the interpreter's kernels and the torch reference)
# ----------------------------------------------------------------------------------------------------------------
PATHS = [pytest.param("1", id="interpreter"), pytest.param("0", id="reference")]


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` (1-d), in a view with stride 2 whose neighbours are junk."""
    base = torch.full((t.numel(), 2), 999, dtype=t.dtype, device=t.device)
    base[:, 0] = t
    view = base[:, 0]
    assert view.stride(0) == 2 and torch.equal(view, t)
    return view


@pytest.mark.skipif(torch.cuda.is_available(), reason="switches between the CPU interpreter and reference paths")
@pytest.mark.parametrize("interpret", PATHS)
def test_strided_index_tensors_read_by_value(monkeypatch, interpret):
    """cu_seqlens and index views with a non-unit stride give the results of their contiguous copies."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    args, kwargs = _inputs(torch.float32)
    expected = sparsectx.sparse_attention(*args, **kwargs)
    q, k, v, cu_q, cu_k, max_q, max_k = args
    strided = dict(kwargs, ref_index=_strided(kwargs["ref_index"]), cu_seqlens_ref=_strided(kwargs["cu_seqlens_ref"]))
    for validate in (True, False):
        got = sparsectx.sparse_attention(q, k, v, _strided(cu_q), _strided(cu_k), max_q, max_k, validate=validate,
                                         **strided)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    kept = sparsectx.compact_tokens(mask)
    packed = torch.arange(1.0, 6.0)[:, None]
    want = sparsectx.scatter_tokens(packed, kept.index, kept.cu_seqlens, 4, fill=-1.0)
    got = sparsectx.scatter_tokens(packed, _strided(kept.index), _strided(kept.cu_seqlens), 4, fill=-1.0)
    assert want[mask].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="switches between the CPU interpreter and reference paths")
@pytest.mark.parametrize("interpret", PATHS)
def test_results_are_contiguous_whatever_the_input_strides(monkeypatch, interpret):
    """Head-major q/k/v views: out and every gradient are contiguous ``[T, H, D]`` on both paths, as the fake op
    says (torch.compile's inductor relies on the fake op's strides)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    args, kwargs = _inputs(torch.float32)
    q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True) for t in args[:3])
    ref_k, ref_v = (kwargs[n].clone().requires_grad_(True) for n in ("ref_k", "ref_v"))
    assert q.stride(0) != q.shape[1] * q.shape[2]
    out = sparsectx.sparse_attention(q, k, v, *args[3:], **dict(kwargs, ref_k=ref_k, ref_v=ref_v))
    # autograd.grad: the op's own gradients (a leaf's .grad is re-laid out like the leaf)
    grads = torch.autograd.grad(out.sum(), (q, k, v, ref_k, ref_v))
    for name, t in zip(("out", "dq", "dk", "dv", "dref_k", "dref_v"), (out, *grads)):
        assert t.is_contiguous(), name
    op_args = (q, k, v, *args[3:], ref_k, ref_v, kwargs["ref_index"], kwargs["cu_seqlens_ref"], 12, 0.25)
    torch.library.opcheck(torch.ops.sparsectx.sparse_attention_fwd.default, op_args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="switches between the CPU interpreter and reference paths")
@pytest.mark.parametrize("interpret", PATHS)
def test_empty_sequences_and_batches(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q = torch.randn(2, 0, 2, 16)
    assert sparsectx.masked_attention(q, q, q, torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 0, 2, 16)
    x, ids = torch.randn(0, 5, 3), torch.zeros(0, 5, 4, dtype=torch.int64)
    by_mask = sparsectx.compact_tokens(torch.zeros(0, 5, dtype=torch.bool), x, ids)
    assert by_mask.cu_seqlens.tolist() == [0] and by_mask.index.numel() == 0
    assert by_mask.tensors[0].shape == (0, 3) and by_mask.tensors[1].shape == (0, 4)
    by_scores = sparsectx.compact_tokens(torch.randn(0, 5), x, budget=2, max_total=3)
    assert by_scores.index.tolist() == [0, 0, 0] and torch.equal(by_scores.tensors[0], torch.zeros(3, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="switches between the CPU interpreter and reference paths")
@pytest.mark.parametrize("interpret", PATHS)
def test_complex_payload_rows_are_copied(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, dtype=torch.complex64, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.5
    kept = sparsectx.compact_tokens(mask, x)
    assert torch.equal(kept.tensors[0], x[mask])
    back = sparsectx.scatter_tokens(kept.tensors[0], kept.index, kept.cu_seqlens, 7)
    assert torch.equal(back[mask], x[mask]) and torch.all(back[~mask] == 0)


# ----------------------------------------------------------------------------------------------------------------
# launch device: Triton launches on the current CUDA device, not on the tensors' device
# ----------------------------------------------------------------------------------------------------------------
def _launchers():
    """Every host function of the kernel modules that launches a kernel (the modules' public functions, less the
    ones that launch nothing)."""
    import inspect

    from sparsectx.kernels import attention, compaction, norm_rope

    launch_nothing = {"tuned_configs"}
    return [fn for module in (attention, compaction, norm_rope) for name, fn in vars(module).items()
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")
            and name not in launch_nothing]


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_every_launcher_enters_its_tensors_device():
    import inspect

    launchers = _launchers()
    assert {fn.__name__ for fn in launchers} == {"attention_forward", "attention_backward", "attention_key_mass",
                                                 "compact_index", "gather_rows", "scatter_rows", "ranked_keep_mask",
                                                 "rms_norm_rope", "rms_norm_rope_backward", "rope_tables"}
    for fn in launchers:
        arg = getattr(fn, "launch_device_arg", None)
        assert arg is not None, f"{fn.__name__} launches kernels without entering its tensors' device"
        assert arg in inspect.signature(fn.__wrapped__).parameters


class _OnDevice:
    def __init__(self, device):
        self.device = torch.device(device)


def test_launch_guard_makes_the_tensors_device_current(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current: the launcher runs with cuda:1 current; on the current device or
    the CPU it runs as is (and the CPU never asks CUDA anything)."""
    from sparsectx.kernels._launch import on_device_of

    current, entered = [0], []

    class _Guard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(self.index)
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", _Guard)

    @on_device_of("x")
    def launcher(scale, x, *, tag=None):
        return current[0], tag

    assert launcher(2.0, _OnDevice("cuda:1"), tag="a") == (1, "a")
    assert launcher(2.0, x=_OnDevice("cuda:1")) == (1, None)  # given by keyword
    assert entered == [1, 1] and current[0] == 0  # restored after the call
    assert launcher(2.0, _OnDevice("cuda:0")) == (0, None)
    assert entered == [1, 1]  # already current: no guard

    monkeypatch.setattr(torch.cuda, "current_device", lambda: pytest.fail("asked CUDA for a CPU tensor"))
    assert launcher(2.0, torch.zeros(1)) == (0, None)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_ops_on_a_device_that_is_not_current():
    """Attention forward/backward and compaction on cuda:1 while cuda:0 is current give the CPU reference's
    results (without the launch guard they would launch on cuda:0)."""
    torch.cuda.set_device(0)
    (q, k, v, cu_q, cu_k, mq, mk), refs = _inputs(torch.float32)
    on_cpu = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = ops.sparse_attention(*on_cpu, cu_q, cu_k, mq, mk, **refs)
    expected.sum().backward()
    moved = [t.to("cuda:1").requires_grad_(True) for t in (q, k, v)]
    out = ops.sparse_attention(*moved, cu_q.to("cuda:1"), cu_k.to("cuda:1"), mq, mk,
                               **{name: t.to("cuda:1") for name, t in refs.items()})
    out.sum().backward()
    # (fp32: the kernels' matmuls in IEEE fp32, no TF32)
    torch.testing.assert_close(out.cpu(), expected.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip(moved, on_cpu):
        torch.testing.assert_close(got.grad.cpu(), want.grad, atol=1e-5, rtol=1e-5)
    scores = torch.rand(2, 50)
    kept = sparsectx.compact_tokens(scores.to("cuda:1"), scores.to("cuda:1")[..., None], budget=[7, 20])
    expected = sparsectx.compact_tokens(scores, scores[..., None], budget=[7, 20])
    assert torch.equal(kept.index.cpu(), expected.index) and torch.equal(kept.tensors[0].cpu(), expected.tensors[0])
    assert torch.cuda.current_device() == 0


def _forward_ad_calls(device="cpu"):
    """(name, f(x) -> tensor) of each public op, differentiable in x (its other inputs on ``device``)."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32).to(device)
    q = torch.randn(8, 2, 8, generator=g)
    dense = torch.randn(2, 5, 2, 8, generator=g)
    mask = (torch.rand(2, 5, generator=g) < 0.6).to(device)
    scores = torch.randn(2, 5, generator=g).to(device)
    index = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4], dtype=torch.int32).to(device)  # (each position once a sample)
    other_q, other_dense = q.to(device), dense.to(device)
    return {
        "sparse_attention": (q, lambda x: sparsectx.sparse_attention(x, other_q, other_q, cu, cu, 5, 5)),
        "masked_attention": (dense, lambda x: sparsectx.masked_attention(x, other_dense, other_dense, mask)),
        "compact_tokens": (dense, lambda x: sparsectx.compact_tokens(scores, x, budget=2).tensors[0]),
        "scatter_tokens": (q, lambda x: sparsectx.scatter_tokens(x, index, cu, 5)),
    }


@pytest.mark.parametrize("name", list(_forward_ad_calls()))
@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_ad_is_refused(name, mode):
    """The kernels' outputs carry no forward-mode tangent: torch.func.jvp saw a zero derivative (sparse_attention,
    masked_attention) or no tangent (compaction), silently. Each op now refuses a tangent; without one, under the same
    forward-AD level, it runs."""
    import torch.autograd.forward_ad as forward_ad

    x, f = _forward_ad_calls()[name]
    with pytest.raises(NotImplementedError, match="forward-mode AD tangent"):
        if mode == "torch.func.jvp":
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        else:
            with forward_ad.dual_level():
                f(forward_ad.make_dual(x, torch.ones_like(x)))
    with forward_ad.dual_level():
        assert torch.equal(f(x), f(x.clone()))


@pytest.mark.parametrize("name", list(_forward_ad_calls()))
@pytest.mark.parametrize("where", ["meta", "FakeTensorMode"])
def test_ops_on_tensors_without_data_give_the_output_shapes(name, where):
    """Inputs that hold no data (the meta device, FakeTensors: shape propagation by tracers and inference stacks)
    run the ops' fake implementations with the default validate=True (failed: "Cannot copy out of meta tensor",
    "Tensor.item() cannot be called on meta tensors", DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, f = _forward_ad_calls()[name]
    expected = f(x)
    if where == "meta":
        _, f_meta = _forward_ad_calls("meta")[name]
        out = f_meta(x.to("meta"))
        assert out.is_meta
    else:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _, f_fake = _forward_ad_calls()[name]
            out = f_fake(mode.from_tensor(x))
    assert out.shape == expected.shape and out.dtype == expected.dtype


@pytest.mark.parametrize("name", list(_forward_ad_calls()))
def test_torch_func_gradient_transforms_are_refused(name):
    """torch.func.grad through the ops failed with torch's internals ("Cannot access storage of TensorWrapper",
    "must override the setup_context staticmethod"); now a NotImplementedError naming the input and what works."""
    x, f = _forward_ad_calls()[name]
    with pytest.raises(NotImplementedError, match="torch.func differentiation transform"):
        torch.func.grad(lambda t: f(t).sum())(x)


def test_vmap_runs_attention_and_refuses_the_compaction():
    """torch.vmap over sparse_attention equals a loop over the vmapped dimension (torch's fallback for custom ops);
    over the compaction, whose kept counts differ per sample, a NotImplementedError says to call it on the batch
    (it failed with "Cannot access storage of BatchedTensorImpl" or a data-dependent control-flow error)."""
    calls = _forward_ad_calls()
    x, f = calls["sparse_attention"]
    stacked = torch.stack([x, x * 0.5, x.flip(0)])
    torch.testing.assert_close(torch.vmap(f)(stacked), torch.stack([f(row) for row in stacked]), rtol=0, atol=0)
    for name in ("compact_tokens", "scatter_tokens"):
        x, f = calls[name]
        with pytest.raises(NotImplementedError, match=f"{name} does not run under torch.vmap"):
            torch.vmap(f)(torch.stack([x, x]))
    # the index tensors or the budget batched by vmap: refused naming them (they failed in a validation read with
    # "Cannot access data pointer of Tensor that doesn't have storage")
    scores = torch.randn(2, 6)
    packed = sparsectx.compact_tokens(scores, budget=[2, 3])
    rows = torch.randn(5, 3)
    index, cu = torch.stack([packed.index, packed.index.flip(0)]), torch.stack([packed.cu_seqlens] * 2)
    for name, run, batched in (
            ("index", lambda i: sparsectx.scatter_tokens(rows, i, packed.cu_seqlens, 6), index),
            ("cu_seqlens", lambda c: sparsectx.scatter_tokens(rows, packed.index, c, 6), cu),
            ("budget", lambda b: sparsectx.compact_tokens(scores, budget=b).cu_seqlens,
             torch.tensor([[1, 2], [2, 3]]))):
        with pytest.raises(NotImplementedError, match=rf"does not run under torch.vmap \({name} is batched by it\)"):
            torch.vmap(run)(batched)
    # masked_attention with a query_mask compacts the queries: refused naming itself (it named compact_tokens)
    q = torch.randn(2, 2, 4, 1, 16)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    with pytest.raises(NotImplementedError, match="masked_attention with a query_mask does not run under torch.vmap"):
        torch.vmap(lambda t: sparsectx.masked_attention(t, t, t, mask, query_mask=mask))(q)
    # a key_mask batched by vmap (one mask per vmapped sample): refused naming it (it named compact_tokens)
    with pytest.raises(NotImplementedError, match="masked_attention with a batched key_mask does not run under"):
        torch.vmap(lambda m: sparsectx.masked_attention(q[0], q[0], q[0], m))(torch.stack([mask, ~mask]))
    # index tensors batched by vmap: sparse_attention's validate checks (host reads) are skipped, as when tracing
    # (they failed with "Cannot access data pointer of Tensor that doesn't have storage")
    rows = torch.randn(3, 5, 1, 16)
    cu = torch.tensor([[0, 2, 5], [0, 3, 5], [0, 5, 5]], dtype=torch.int32)
    got = torch.vmap(lambda t, c: sparsectx.sparse_attention(t, t, t, c, c, 5, 5))(rows, cu)
    want = torch.stack([sparsectx.sparse_attention(t, t, t, c, c, 5, 5) for t, c in zip(rows, cu)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # an index tensor batched alone (one shared q/k/v or reference buffer, a selection per vmapped sample): vmap's
    # loop over the op, as above (the op ran its implementation on the batched index: "Cannot access storage")
    got = torch.vmap(lambda c: sparsectx.sparse_attention(rows[0], rows[1], rows[2], c, c, 5, 5))(cu)
    want = torch.stack([sparsectx.sparse_attention(rows[0], rows[1], rows[2], c, c, 5, 5) for c in cu])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = torch.randn(2, 4, 1, 16)
    index = torch.tensor([[1, 3, 0], [0, 1, 2], [3, 2, 3]], dtype=torch.int32)
    cu_ref, cu_own = (torch.tensor(c, dtype=torch.int32) for c in ([0, 2, 3], [0, 2, 5]))

    def gathered(i):
        return sparsectx.sparse_attention(rows[0], rows[1], rows[2], cu_own, cu_own, 3, 3, ref_k=ref, ref_v=-ref,
                                          ref_index=i, cu_seqlens_ref=cu_ref)
    torch.testing.assert_close(torch.vmap(gathered)(index), torch.stack([gathered(i) for i in index]), rtol=0, atol=0)


def test_data_less_inputs_are_told_from_plain_ones_as_torch_does():
    """The ops' quick test for inputs without data (plain tensors answered without torch's ``is_fake``, 2.5 us per
    tensor on the host) agrees with ``is_fake``/meta for plain tensors, parameters, meta tensors, FakeTensors and
    FakeTensors wrapped by functionalization (as aot_autograd traces) or by vmap."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from sparsectx import ops

    plain = torch.randn(3, 2)
    mode = FakeTensorMode()
    fake = mode.from_tensor(plain)
    cases = {"plain": plain, "parameter": torch.nn.Parameter(plain.clone()), "meta": plain.to("meta"),
             "fake": fake, "functional plain": torch._to_functional_tensor(plain),
             "functional fake": torch._to_functional_tensor(fake)}
    expected = {"plain": False, "parameter": False, "meta": True, "fake": True, "functional plain": False,
                "functional fake": True}
    for name, t in cases.items():
        assert ops._holds_no_data(t) is expected[name], name
        assert expected[name] == (t.is_meta or is_fake(t)), name
    seen = {}

    def record(name):
        def f(t):
            seen[name] = ops._holds_no_data(t)
            return t
        return f

    torch.vmap(record("vmapped plain"))(plain)
    with mode:
        torch.vmap(record("vmapped fake"))(fake)
    assert seen == {"vmapped plain": False, "vmapped fake": True}


class _Passthrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: inside it, sparsectx's ops take their custom ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _attention_with_references(leaves):
    """sparse_attention over own keys and references gathered from a [B, R, H, D] buffer, with its lse."""
    q, k, v, ref_k, ref_v = leaves
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 5], dtype=torch.int32)
    ref_index = torch.tensor([1, 4, 0, 2, 3], dtype=torch.int32)
    cu_ref = torch.tensor([0, 2, 5], dtype=torch.int32)
    return sparsectx.sparse_attention(q, k, v, cu_q, cu_k, 4, 5, ref_k=ref_k, ref_v=ref_v, ref_index=ref_index,
                                      cu_seqlens_ref=cu_ref, return_lse=True)


def _norm_rope_with_prefix(leaves):
    x, prefix, weight, prefix_weight, cos, sin = leaves
    return (ops.rms_norm_rope(x, cos, sin, weight, prefix=prefix, prefix_weight=prefix_weight),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["sparse_attention", "rms_norm_rope"])
def test_eager_autograd_runs_a_function_twin_equal_to_the_custom_op(op, dtype):
    """Eager calls whose inputs require grad run the op's torch.autograd.Function twin (the custom op's dispatch
    and autograd wrapper cost about 40% of the host time of a forward + backward): its outputs and every input's
    gradient equal the custom op's (taken inside a pass-through dispatch mode) bit for bit, and a second-order
    backward raises as after the custom op."""
    g = torch.Generator().manual_seed(5)
    if op == "sparse_attention":
        shapes = [(7, 2, 16), (5, 2, 16), (5, 2, 16), (2, 6, 2, 16), (2, 6, 2, 16)]
        call, n_leaves, twin = _attention_with_references, 5, "_AttentionFunctionBackward"
    else:
        shapes = [(2, 5, 2, 16), (2, 3, 2, 16), (16,), (16,)]
        angles = torch.rand(8, 8, generator=g) * 10
        call, n_leaves, twin = _norm_rope_with_prefix, 4, "_RmsNormRopeFunctionBackward"
    inputs = [torch.randn(*shape, generator=g).to(dtype) for shape in shapes]
    if op == "rms_norm_rope":
        inputs += [angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)]

    def run():
        leaves = [t.clone().requires_grad_(i < n_leaves) for i, t in enumerate(inputs)]
        outputs = call(leaves)
        loss = sum(o.float().square().sum() * (i + 1) for i, o in enumerate(outputs))  # every output's gradient
        return outputs, torch.autograd.grad(loss, leaves[:n_leaves])

    twin_outputs, twin_grads = run()
    with _Passthrough():
        op_outputs, op_grads = run()
    assert type(twin_outputs[0].grad_fn).__name__ == twin
    assert "sparsectx" in type(op_outputs[0].grad_fn).__name__  # the custom op's autograd node
    for got, expected in zip(twin_outputs + twin_grads, op_outputs + op_grads):
        assert torch.equal(got.detach(), expected.detach())
    leaves = [t.clone().requires_grad_(i < n_leaves) for i, t in enumerate(inputs)]
    grads = torch.autograd.grad(call(leaves)[0].float().square().sum(), leaves[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        grads[0].float().sum().backward()


def test_eager_calls_that_record_nothing_skip_the_custom_ops(monkeypatch):
    """sparse_attention and attention_key_mass on plain tensors without autograd call their implementations
    directly (a custom op's dispatch costs tens of microseconds of host time per call, once per attention layer);
    with inputs that require grad, sparse_attention goes through its torch.autograd.Function twin (no custom op
    either); under torch.vmap, inside a dispatch or torch-function mode and under torch.jit.trace they go through
    the custom ops, which those need to see. The results are the same either way."""
    seen = []
    for name in ("_attention_fwd_op", "_key_mass_op"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, real=real, name=name: seen.append(name) or real(*a))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 2, 16, generator=g)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    attend = lambda x: sparsectx.sparse_attention(x, x * 0.5, x, cu, cu, 4, 4)  # noqa: E731
    dense = torch.randn(1, 5, 2, 16, generator=g)
    mass = lambda x: sparsectx.attention_key_mass(x, x * 0.5)  # noqa: E731

    direct = attend(q), mass(dense)
    assert seen == []
    recorded = attend(q.clone().requires_grad_(True))
    assert torch.equal(recorded.detach(), direct[0]) and seen == []
    assert type(recorded.grad_fn).__name__ == "_AttentionFunctionBackward"
    assert torch.equal(torch.vmap(attend)(q[None])[0], direct[0]) and seen == ["_attention_fwd_op"]
    seen.clear()
    with _Passthrough():
        assert torch.equal(attend(q), direct[0]) and torch.equal(mass(dense), direct[1])
    assert seen == ["_attention_fwd_op", "_key_mass_op"]
    seen.clear()

    class FunctionLog(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with FunctionLog():
        assert torch.equal(attend(q), direct[0])
    assert seen == ["_attention_fwd_op"]
    seen.clear()
    traced = torch.jit.trace(attend, (q,), check_trace=False)
    assert seen == ["_attention_fwd_op"] and "sparsectx::sparse_attention_fwd" in str(traced.graph)
    assert torch.equal(traced(q * 2), attend(q * 2))


def test_masked_attention_under_vmap_without_autograd_equals_a_loop():
    """vmap over masked_attention with no gradient recorded: the kept keys are gathered by index (the compaction,
    which the no-autograd path uses to copy them, refuses batched tensors), and the custom op's fallback loops."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 9, 2, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 9, generator=g) < 0.5
    for prefix in (0, 3):
        f = lambda a, b, c: sparsectx.masked_attention(a, b, c, mask, kept_prefix=prefix)  # noqa: E731
        with torch.no_grad():
            batched = torch.vmap(f)(q, k, v)
        torch.testing.assert_close(batched, torch.stack([f(*t) for t in zip(q, k, v)]), rtol=0, atol=0)


def test_ops_from_several_threads_give_what_each_gives_alone(run_in_threads):
    """compact_tokens, masked_attention, rms_norm_rope and rope_tables from four threads at once: the results of each
    call alone, no error (on the CPU through Triton's interpreter, which failed inside when two launches ran at
    once: 36-38 errors in 60 calls before its launches were serialised; the norm/RoPE launchers were not in this
    test, and without their launch guard 28 of 40 calls failed)."""
    gen = torch.Generator().manual_seed(0)
    scores, tokens = torch.rand(2, 40, generator=gen), torch.randn(2, 40, 8, generator=gen)
    q, k, v = (torch.randn(2, 24, 2, 16, generator=gen) for _ in range(3))
    mask = torch.rand(2, 24, generator=gen) > 0.4
    cos, sin = torch.rand(24, 16, generator=gen), torch.rand(24, 16, generator=gen)
    weight = torch.rand(16, generator=gen)
    ids, freqs = torch.randint(0, 9, (24, 3), generator=gen), torch.rand(16, generator=gen, dtype=torch.float64)
    calls = [
        lambda: sparsectx.compact_tokens(scores, tokens, budget=11),
        lambda: sparsectx.masked_attention(q, k, v, mask),
        lambda: sparsectx.rms_norm_rope(q, cos, sin, weight, 1e-6),
        lambda: sparsectx.rope_tables(ids, freqs, [4, 6, 6]),
    ]
    alone = [call() for call in calls]
    failures = []

    def same(got, want) -> bool:
        if isinstance(want, tuple):  # Compacted (its packed tensors a tuple again) or (cos, sin)
            return all(same(g, w) for g, w in zip(got, want, strict=True))
        return torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want

    def work(which: int):
        for _ in range(10):
            try:
                if not same(calls[which](), alone[which]):
                    failures.append("another result")
            except Exception as error:  # (raised in the thread: collected for the assertion)
                failures.append(f"{type(error).__name__}: {error}")

    run_in_threads([functools.partial(work, i) for i in range(4)], switch_interval=1e-5)
    assert not failures, failures[:3]


@pytest.mark.skipif(not ops._triton_available(), reason="needs triton")
def test_the_limits_ops_checks_are_the_kernels_limits():
    """ops checks inputs against limits of the kernels it can not import at its own import (Triton may be absent):
    its copies must be the kernels' values, else a call would pass the check and fail in a launch (or be refused
    while the kernels could take it)."""
    from sparsectx.kernels import compaction, norm_rope

    assert ops.ROPE_MAX_AXES == norm_rope.MAX_TABLE_AXES
    # a row kernel's [COPY_BLOCK_ROWS, samples] block must stay within Triton's 2**20 elements
    assert compaction.COPY_BLOCK_ROWS * ops.MAX_COMPACT_SAMPLES <= 1 << 20
    assert compaction.COPY_BLOCK_ROWS * ops.MAX_COMPACT_SAMPLES * 2 > 1 << 20  # (the largest power of two that fits)


def test_star_import_of_the_ops_binds_the_public_ops_only():
    """``from sparsectx.ops import *`` binds the public ops (every name ``sparsectx`` exports from ``sparsectx.ops``,
    and ``kernel_configs``), each a name of the module, and none of its imports or helpers (before: 36 names, among
    them ``torch``, ``math``, ``sys`` and ``written_ratio``)."""
    import sparsectx.ops as ops

    namespace = {}
    exec("from sparsectx.ops import *", namespace)
    bound = set(namespace) - {"__builtins__"}
    from_ops = {name for name in sparsectx.__all__ if getattr(ops, name, None) is getattr(sparsectx, name)}
    assert bound == set(ops.__all__) == from_ops | {"kernel_configs"}


def test_vmap_of_the_compaction_under_torch_compile_runs_without_payloads():
    """What docs/ops.md says of the compaction under torch.compile + vmap (the eager refusals do not apply): an
    index without payloads runs, each sample as alone; payloads fail with torch's batching-rule error (the docs
    said the compaction runs there, payloads or not)."""
    torch._dynamo.reset()
    scores, rows = torch.rand(3, 6), torch.randn(3, 6, 4)
    index = torch.compile(lambda s: torch.vmap(lambda r: sparsectx.compact_tokens(r[None], budget=2).index)(s),
                          backend="aot_eager", fullgraph=True)
    assert torch.equal(index(scores),
                       torch.stack([sparsectx.compact_tokens(scores[i:i + 1], budget=2).index for i in range(3)]))
    packed = torch.compile(
        lambda s, x: torch.vmap(lambda r, p: sparsectx.compact_tokens(r[None], p[None], budget=2).tensors[0])(s, x),
        backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="Batching rule not implemented for sparsectx::gather_rows"):
        packed(scores, rows)
    torch._dynamo.reset()
