"""bf16 kernels on the CPU: the Triton interpreter patched to compute bf16 as a GPU does.

Triton's interpreter holds bf16 values as their uint16 bits and gets them wrong in two places the kernels use
(Triton 3.6 and 3.9): a cast from fp32 to bf16 truncates (a GPU rounds to nearest even), and ``tl.dot`` of bf16
operands multiplies the raw bits as integers (a GPU's tensor cores multiply the values and accumulate in fp32).
``install`` replaces those two (and every other cast to or from bf16, through fp32) and makes the other elementwise
arithmetic on bf16 values raise (binary and unary ops, fma, clamp): the kernels load bf16, compute in fp32 and round
once where they store or feed a dot, so a kernel that computes in bf16 is a finding, not something to emulate.
Loads, stores, selects and tile copies move bits and were right already. Not refused: reductions and scans
(``tl.sum``, ``tl.cumsum``, ``tl.argmax``) of a bf16 tile still compute on the raw bits, silently wrong (no kernel
reduces a bf16 tile today; ``tl.max``/``tl.min`` happen to order the bits right).

What this does not emulate: the order of a GPU's fp32 accumulation, its approximate exp2/rsqrt, and anything about
threads, memory or tile copies; the GPU tests stay the judge of those.
"""
from typing import Optional

import numpy as np
import torch

_INSTALLED: list = []  # [None] once installed, [reason] if it could not be


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 values -> their bf16 bits (uint16), rounded to nearest even (torch's conversion)."""
    as_bf16 = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return as_bf16.view(torch.int16).numpy().view(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> their fp32 values (exact)."""
    return (np.ascontiguousarray(bits).astype(np.uint32) << 16).view(np.float32)


def _patch(interpreter) -> None:
    import triton.language as tl

    builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    bf16, fp32 = tl.bfloat16, tl.float32
    cast, fp_to_fp, dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot
    binary, unary, fma, clamp = builder.binary_op, builder.unary_op, builder.create_fma, builder.create_clampf

    def cast_impl(self, src, dst_type):
        source, target = src.dtype.scalar, dst_type.scalar
        if source != bf16 and target != bf16:
            return cast(self, src, dst_type)
        if source == target:
            return handle(src.data, target)
        if source == bf16:  # exact to fp32, then on to the target
            as_fp32 = handle(_bf16_values(src.data), fp32)
            return as_fp32 if target == fp32 else cast(self, as_fp32, dst_type)
        as_fp32 = src if source == fp32 else cast(self, src, fp32)
        return handle(_bf16_bits(as_fp32.data), bf16)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if bf16 in (src.dtype.scalar, dst_type.scalar):
            return self.cast_impl(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if bf16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        lhs, rhs = (_bf16_values(t.data) if t.dtype.scalar == bf16 else t.data.astype(np.float32) for t in (a, b))
        with np.errstate(invalid="ignore", over="ignore"):  # (inf and NaN operands, as on a GPU: no warning)
            return handle(np.matmul(lhs, rhs, dtype=np.float32) + d.data.astype(np.float32), d.dtype.scalar)

    def refusing(original, name):
        def op(self, *args, **kwargs):
            if any(getattr(getattr(a, "dtype", None), "scalar", None) == bf16 for a in args):
                raise TypeError(f"bf16 arithmetic in a kernel ({name}): the kernels compute in fp32")
            return original(self, *args, **kwargs)
        return op

    builder.cast_impl = cast_impl
    for name in ("create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui", "create_fp_ext",
                 "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder.create_int_cast = lambda self, src, dst_type, is_signed: self.cast_impl(src, dst_type)
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_dot = create_dot
    builder.binary_op = refusing(binary, "binary op")
    builder.unary_op = refusing(unary, "unary op")
    builder.create_fma = refusing(fma, "fma")
    builder.create_clampf = refusing(clamp, "clamp")


def _self_check() -> None:
    """One kernel through the patched interpreter: fp32 -> bf16 casts round to nearest even, a bf16 dot accumulates
    the values in fp32, and bf16 arithmetic raises."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_and_dot(X, OUT, PRODUCT, N: tl.constexpr):
        rows = tl.arange(0, N)
        offsets = rows[:, None] * N + rows[None, :]
        x = tl.load(X + offsets).to(tl.bfloat16)
        tl.store(OUT + offsets, x)
        tl.store(PRODUCT + offsets, tl.dot(x, x))

    @triton.jit
    def bf16_square(X, OUT, N: tl.constexpr):
        offsets = tl.arange(0, N)
        x = tl.load(X + offsets)
        tl.store(OUT + offsets, x * x)

    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    x[0, :4] = torch.tensor([1 + 2 ** -8 + 2 ** -10, 1 + 3 * 2 ** -9, -1 - 2 ** -8 - 2 ** -10, 1 + 2 ** -9])
    out, product = torch.empty(16, 16, dtype=torch.bfloat16), torch.empty(16, 16)
    cast_and_dot[(1,)](x, out, product, N=16)
    rounded = x.to(torch.bfloat16)
    if not torch.equal(out.view(torch.int16), rounded.view(torch.int16)):
        raise RuntimeError("fp32 -> bf16 casts do not round to nearest even")
    if not torch.allclose(product, rounded.float() @ rounded.float(), rtol=1e-5, atol=1e-5):
        raise RuntimeError("a bf16 dot does not multiply the values")
    try:
        bf16_square[(1,)](rounded[0], out[0], N=16)
    except Exception as error:  # the interpreter wraps the TypeError
        if "bf16 arithmetic" not in str(error):
            raise
    else:
        raise RuntimeError("bf16 arithmetic did not raise")


def install() -> Optional[str]:
    """Patches the interpreter once per process; None when it computes bf16 as described above, else why not (the
    tests that need it then skip with that reason). Only bf16 work changes: other dtypes take the original code."""
    if not _INSTALLED:
        try:
            from triton.runtime import interpreter

            _patch(interpreter)
            _self_check()
            _INSTALLED.append(None)
        except Exception as error:  # a Triton whose interpreter is built otherwise
            _INSTALLED.append(f"the Triton interpreter could not be patched for bf16 ({type(error).__name__}: "
                              f"{error})")
    return _INSTALLED[0]
