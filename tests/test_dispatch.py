"""Dispatch: which implementation each device/dtype takes, and that every path computes the same function."""
import pytest
import torch

import sparsectx
from sparsectx import ops


def test_backend_for_follows_device_dtype_and_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for("cpu", torch.float16) == ops.TRITON_INTERPRETER
    assert ops.backend_for("cpu", torch.float32) == ops.TRITON_INTERPRETER
    # the interpreter computes bf16 wrongly: bf16 on the CPU takes the torch reference
    assert ops.backend_for("cpu", torch.bfloat16) == ops.TORCH_REFERENCE
    assert ops.backend_for("meta", torch.float16) == ops.TORCH_REFERENCE
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for("cpu", torch.float16) == ops.TORCH_REFERENCE
    assert ops.backend_for("cuda", torch.bfloat16) == (ops.TRITON_GPU if ops._triton_available() else
                                                       ops.TORCH_REFERENCE)


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
