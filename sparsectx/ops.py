"""Public ops of sparsectx: validation, dispatch, autograd and torch.library registration.

Dispatch (``backend_for``): CUDA tensors run the Triton kernels; CPU tensors run the same Triton kernels through
the interpreter when ``TRITON_INTERPRET=1`` is set and was set when Triton and sparsectx's kernels were first
imported (bf16 excepted: the interpreter computes bf16 wrongly, so bf16 on the CPU takes the reference path);
anything else runs the plain-torch reference of ``sparsectx.reference``, with a warning when the variable was set
too late (after Triton was imported, e.g. by torch.compile: set it before importing torch or sparsectx). Every
path gives the same results within rounding.

Ops:
- ``sparse_attention``: flash_attn_varlen_func-style joint attention whose keys are each sample's own packed keys
  plus keys gathered by index from a reference K/V buffer (no copy of the kept references).
- ``masked_attention``: the same kernel for diffusers' dense layout ``[B, S, H, D]`` with a key keep-mask
  (training with random drop masks): work scales with the kept keys.
- ``compact_tokens`` / ``scatter_tokens``: keep-mask or scores+budget -> packed kept rows, and back.
- ``attention_key_mass``: the attention probability each key receives from a set of weighted queries (token
  selection's probes), without writing the scores.
- ``rms_norm_rope``: FLUX attention's QK RMS norm, text/image concatenation and rotary embedding in one pass.
- ``rope_tables``: FLUX's rotary tables (cos/sin of multi-axis positions) in one launch.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import sys
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses import fake_tensor as _fake_tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from ._warn import warn as _warn
from . import reference
# small tensors of host values on a device without a wait (plain torch; shared with the kernels' launchers)
from .kernels._launch import interpreter_requested
from .kernels._launch import autotune_all_configs  # noqa: F401  (SPARSECTX_AUTOTUNE as read: benchmarks, CLI)
from .kernels._launch import to_device as _device_values  # noqa: F401  (used by selection, integration, training)

__all__ = [  # the public ops and what describes them; the other names serve sparsectx's own modules
    "Compacted", "attention_key_mass", "backend_for", "compact_tokens", "kernel_configs", "masked_attention",
    "rms_norm_rope", "rope_tables", "scatter_tokens", "sparse_attention",
]

# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------
TRITON_GPU, TRITON_INTERPRETER, TORCH_REFERENCE = "triton-gpu", "triton-interpreter", "torch-reference"


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


_KERNEL_MODULES = ("sparsectx.kernels.attention", "sparsectx.kernels.compaction", "sparsectx.kernels.norm_rope")


def interpreter_enabled() -> bool:
    """Whether the environment asks for Triton's CPU interpreter (``TRITON_INTERPRET`` true as Triton reads it)."""
    return interpreter_requested()


def _kernels_built_as(interpreted: bool) -> bool:
    """Whether every kernel module imported so far, and Triton's own library of jitted functions (``tl.zeros`` and
    the like, which the kernels call), were built in that mode. ``triton.jit`` fixes it at import: setting
    ``TRITON_INTERPRET`` afterwards does not turn compiled kernels into interpreted ones, or back; and Triton is
    often imported early (by torch.compile and libraries built on it; ``import sparsectx`` does not import it)."""
    return _triton_library_interpreted() in (None, interpreted) and all(
        sys.modules[name].INTERPRETED == interpreted for name in _KERNEL_MODULES if name in sys.modules)


_LIBRARY_MODE: list = []  # [interpreted], once Triton's library is imported (its mode can not change after)


def _triton_library_interpreted() -> Optional[bool]:
    """Whether Triton's jitted library functions run in the interpreter; None before Triton imported them."""
    if not _LIBRARY_MODE:
        library = getattr(sys.modules.get("triton.language.standard"), "zeros", None)
        if library is None:
            return None
        from .kernels._launch import built_for_interpreter

        _LIBRARY_MODE.append(built_for_interpreter(library))
    return _LIBRARY_MODE[0]


@functools.lru_cache(maxsize=1)
def _warn_interpreter_set_late() -> None:
    _warn("TRITON_INTERPRET=1 was set after Triton or sparsectx's kernels were imported without it (e.g. "
          "by torch.compile): ops on CPU tensors run the plain-torch reference, not the Triton "
          "interpreter. Set TRITON_INTERPRET=1 before importing torch or sparsectx to run the kernels.",
          RuntimeWarning)


def backend_for(device: Union[torch.device, str], dtype: torch.dtype = torch.float16) -> str:
    """Which implementation an op takes for tensors on ``device`` of ``dtype``: the kernels when they can run there
    (the environment asks for their mode and the kernels imported so far were built in it), else the reference."""
    interpret = interpreter_enabled()
    key = (device, dtype, interpret, tuple(map(sys.modules.__contains__, _KERNEL_MODULES)))
    try:
        known = _BACKENDS.get(key)
    except TypeError:  # (an unhashable device or dtype, refused below with its name)
        known = None
    if known is not None:
        return known
    if not isinstance(dtype, torch.dtype):  # ("bfloat16" as a string was answered as another dtype)
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    device = _as_device(device)
    backend = TORCH_REFERENCE
    if device.type == "cuda" and not interpret and _triton_available() and _kernels_built_as(False):
        backend = TRITON_GPU
    elif device.type == "cpu" and interpret and dtype != torch.bfloat16 and _triton_available():
        if _kernels_built_as(True):
            backend = TRITON_INTERPRETER
        else:
            _warn_interpreter_set_late()
    if _LIBRARY_MODE:  # the modes of Triton's library and of the kernel modules imported so far can not change now
        _BACKENDS[key] = backend
    return backend


def _as_device(device, name: str = "device") -> torch.device:
    """``device`` (a torch.device, a string or a CUDA index) as a torch.device; a ``TypeError`` / ``ValueError``
    naming ``name`` otherwise (torch's errors name no argument)."""
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device, a string or a CUDA index, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{name} {device!r} is not a torch device ({exc})") from None


# (device, dtype, interpreter flag, which kernel modules are imported) -> backend_for's answer, once Triton's
# library is imported: every op call asks, once per tensor, and the checks above cost microseconds of host time
_BACKENDS: dict = {}


def _use_triton(t: torch.Tensor) -> bool:
    return backend_for(t.device, t.dtype) != TORCH_REFERENCE


def kernel_configs() -> dict:
    """The launch configurations the attention kernels' autotuner picked so far in this process, per kernel and
    tuning key, and the timings of every candidate for the key each kernel tuned last (see
    ``sparsectx.kernels.attention.tuned_configs``). Empty before the first GPU launch, without Triton and in the
    interpreter (one configuration there). Benchmarks record it with their results."""
    if not _triton_available():
        return {}
    from .kernels.attention import tuned_configs

    return tuned_configs()


# ----------------------------------------------------------------------------------------------------------------
# validation helpers: every message names the argument, and all run before any launch
# ----------------------------------------------------------------------------------------------------------------
_ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # the attention kernels pad their tiles to a power of two; above this they are not offered
MAX_GRID_SAMPLES = 65535  # the attention kernels launch (blocks, heads, samples): CUDA's grid y/z limit (both)
# the compaction's row kernels find each packed row's sample in a [rows, B] block (Triton caps a block at 2**20
# elements, and a block holds kernels.compaction.COPY_BLOCK_ROWS = 16 rows): a call takes at most this many samples,
# on every path alike (tests/test_dispatch.py checks both against the kernels)
MAX_COMPACT_SAMPLES = 65536
# ratios held in a narrow float dtype count as the decimals they were written as (float32's 0.7 is 0.69999998...,
# whose count of 5 tokens, half up, would be 3 where 0.7's is 4): see written_ratio
NARROW_RATIO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the kernels scale scores by softmax_scale·log2(e) in float32: larger magnitudes would overflow it
_MAX_SOFTMAX_SCALE = torch.finfo(torch.float32).max / 2.0


def _check_tensor(name: str, t, ndim: Optional[int] = None, dtypes=None, device=None, in_op: bool = False) -> None:
    """``in_op``: ``t`` is a registered op's argument, whose dispatch has unwrapped torch.func's tensors before the
    op's body runs (their probe, host time on every call, is skipped; a forward-AD tangent is still attached)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # (the kernels and the reference path read plain strided storage)
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "a quantized tensor" if t.is_quantized else "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided, not quantized or nested) tensor, got {kind}")
    if _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(t).tangent is not None:
        # the kernels would return outputs without a tangent: torch.func.jvp would see a zero derivative
        raise NotImplementedError(f"{name} carries a forward-mode AD tangent (torch.func.jvp, "
                                  "torch.autograd.forward_ad): sparsectx's ops have reverse-mode gradients only")
    # (while dynamo traces, its own checks)
    if not in_op and not torch.compiler.is_compiling() and torch._C._functorch.is_gradtrackingtensor(t):
        raise NotImplementedError(f"{name} is traced by a torch.func differentiation transform (grad, vjp, jacrev, "
                                  "jvp): sparsectx's ops have torch.autograd gradients only (backward, "
                                  "torch.autograd.grad)")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def _check_cu_seqlens(name: str, cu: torch.Tensor, batch: Optional[int], total: Optional[int], device,
                      at_most: Optional[int] = None) -> int:
    """Checks shape/dtype/monotonicity/total (or, with ``at_most``, an upper bound of the total: padding rows past
    it) of a cu_seqlens tensor (one small host read) and returns B."""
    _check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have B+1 >= 1 entries")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(f"{name} has {cu.numel()} entries but the batch has {batch} samples (need {batch + 1})")
    host = cu.tolist()
    if host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {host[0]}")
    if any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {host}")
    if total is not None and host[-1] != total:
        raise ValueError(f"{name}[-1] = {host[-1]} does not match the {total} packed rows of the tensor it indexes")
    if at_most is not None and host[-1] > at_most:
        raise ValueError(f"{name}[-1] = {host[-1]} exceeds the {at_most} packed rows")
    return cu.numel() - 1


def _max_len(cu: torch.Tensor) -> int:
    # (.item() alone: a traced symbol stays one, where int() would specialise it, which torch.export refuses)
    return (cu[1:] - cu[:-1]).max().item() if cu.numel() > 1 else 0


def _surely(condition) -> bool:
    """A comparison of ints, any of them maybe a torch symbol (dynamo shows its symbols to traced code as ints):
    its value where it is known; False where it depends on a tensor's data (a symbol read by ``.item()`` while
    tracing, e.g. a keep mask's ``max_seqlen``: a Python ``if`` on it fails the trace); a shape symbol's adds a
    guard, as the comparison itself would; a tensor's (torch.jit.trace) is read."""
    return bool(condition) if isinstance(condition, torch.Tensor) else guard_or_false(condition)


def _softmax_scale(softmax_scale, dim: int, symbolic: bool = False, traced: bool = False):
    """``softmax_scale`` checked (``None``: ``1 / sqrt(dim)``): a Python number (``symbolic``: or a torch symbol);
    finite and small enough for the kernels' fp32 scaling, unless ``traced`` and a symbol (no value to read: a Python
    number traced as a constant is checked)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(dim)
    softmax_scale = _python_number(softmax_scale)
    numbers = (int, float, torch.SymInt, torch.SymFloat) if symbolic else (int, float)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers):
        raise TypeError(f"softmax_scale must be a Python number or None, got {type(softmax_scale).__name__}")
    # NaN, inf, ints beyond any float, and scales whose fp32 product with log2(e) in the kernels overflows
    unread = traced and isinstance(softmax_scale, (torch.SymInt, torch.SymFloat))
    if not unread and not abs(softmax_scale) <= _MAX_SOFTMAX_SCALE:
        raise ValueError(f"softmax_scale must be a finite number of magnitude at most {_MAX_SOFTMAX_SCALE:.3g} "
                         f"(the kernels scale scores in float32), got {softmax_scale!r}")
    return softmax_scale


# ----------------------------------------------------------------------------------------------------------------
# sparse attention: torch.library custom ops (forward, backward) + autograd
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("sparsectx::sparse_attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, ref_k: Optional[torch.Tensor], ref_v: Optional[torch.Tensor],
    ref_index: Optional[torch.Tensor], cu_seqlens_ref: Optional[torch.Tensor], max_seqlen_ref: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward; ``max_seqlen_k``/``max_seqlen_ref`` are not needed here but saved for the backward's grid."""
    return _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ref_k, ref_v, ref_index,
                          cu_seqlens_ref, max_seqlen_ref, softmax_scale)


def _attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ref_k, ref_v, ref_index,
                   cu_seqlens_ref, max_seqlen_ref, softmax_scale):
    """The forward custom op's implementation (eager calls that record no graph call it directly)."""
    if _use_triton(q):
        from .kernels import attention as _k

        # (``sparse_attention`` passes them so; ``torch.ops.sparsectx.sparse_attention_fwd`` may be called directly)
        q, k, v, ref_k, ref_v = (_last_dim_contiguous(t) for t in (q, k, v, ref_k, ref_v))
        cu_seqlens_q, cu_seqlens_k, ref_index, cu_seqlens_ref = _contiguous(cu_seqlens_q, cu_seqlens_k, ref_index,
                                                                            cu_seqlens_ref)
        return _k.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    ref_k, ref_v, ref_index, cu_seqlens_ref, softmax_scale)
    # the reference in fp32 for half inputs, as the kernels accumulate (q.k of legal fp16 inputs can overflow fp16)
    q32, k32, v32, ref_k32, ref_v32 = (_float32(t) for t in (q, k, v, ref_k, ref_v))
    with _autocast_off(q):
        out, lse = reference.sparse_attention_ref(
            q32, k32, v32, cu_seqlens_q, cu_seqlens_k, ref_k=ref_k32, ref_v=ref_v32, ref_index=ref_index,
            cu_seqlens_ref=cu_seqlens_ref, softmax_scale=softmax_scale)
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def _autocast_off(t: torch.Tensor):
    """A context with ``torch.autocast`` off for ``t``'s device type where it is on (else a no-op context): the
    reference paths compute in fp32 as the kernels accumulate, also when called inside autocast (a direct call of
    a registered op, a backward run inside the autocast block)."""
    if _autocast_dtype(t) is not None:
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _contiguous(*tensors: Optional[torch.Tensor]) -> tuple:
    """Each tensor contiguous (None stays None): the kernels read index tensors, ``lse`` and ``dlse`` with unit
    strides (the public functions pass them so; the custom ops may be called directly with any strides)."""
    return tuple(t if t is None else t.contiguous() for t in tensors)


def _float32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Half-precision tensors upcast to fp32 (others, and None, unchanged)."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ref_k, ref_v, ref_index, cu_seqlens_ref,
      max_seqlen_ref, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("sparsectx::sparse_attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    ref_k: Optional[torch.Tensor], ref_v: Optional[torch.Tensor], ref_index: Optional[torch.Tensor],
    cu_seqlens_ref: Optional[torch.Tensor], max_seqlen_ref: int, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dref_k, dref_v); the last two are empty when there is no reference buffer."""
    return _attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          ref_k, ref_v, ref_index, cu_seqlens_ref, max_seqlen_ref, softmax_scale)


def _attention_bwd(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ref_k,
                   ref_v, ref_index, cu_seqlens_ref, max_seqlen_ref, softmax_scale):
    """The backward custom op's implementation (eager backward passes that record no graph call it directly)."""
    if _use_triton(q):
        from .kernels import attention as _k

        dout, q, k, v, out, ref_k, ref_v = (_last_dim_contiguous(t) for t in (dout, q, k, v, out, ref_k, ref_v))
        dlse, lse, cu_seqlens_q, cu_seqlens_k, ref_index, cu_seqlens_ref = _contiguous(
            dlse, lse, cu_seqlens_q, cu_seqlens_k, ref_index, cu_seqlens_ref)
        dq, dk, dv, dref_k, dref_v = _k.attention_backward(
            dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            ref_k, ref_v, ref_index, cu_seqlens_ref, max_seqlen_ref, softmax_scale)
    else:
        with _autocast_off(q):
            dq, dk, dv, dref_k, dref_v = reference.sparse_attention_bwd_ref(
                _float32(dout), dlse.masked_fill(~torch.isfinite(lse), 0.0), *(_float32(t) for t in (q, k, v)),
                cu_seqlens_q, cu_seqlens_k, ref_k=_float32(ref_k), ref_v=_float32(ref_v), ref_index=ref_index,
                cu_seqlens_ref=cu_seqlens_ref, softmax_scale=softmax_scale)
        if ref_k is None:
            dref_k, dref_v = q.new_empty(0), q.new_empty(0)
        dq, dk, dv, dref_k, dref_v = (g.to(q.dtype).contiguous() for g in (dq, dk, dv, dref_k, dref_v))
    return dq, dk, dv, dref_k, dref_v


@_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ref_k, ref_v,
      ref_index, cu_seqlens_ref, max_seqlen_ref, softmax_scale):
    # every result is contiguous, whatever the inputs' strides (as both implementations return them)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            ref_k.new_empty(ref_k.shape) if ref_k is not None else q.new_empty(0),
            ref_v.new_empty(ref_v.shape) if ref_v is not None else q.new_empty(0))


def _attention_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, ref_k, ref_v, ref_index, cu_ref, max_ref, scale) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, ref_k, ref_v, ref_index, cu_ref)
    ctx.max_q, ctx.max_k, ctx.max_ref, ctx.scale = max_q, max_k, max_ref, scale


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, ref_k, ref_v, ref_index, cu_ref = ctx.saved_tensors
    dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
    dlse = dlse if dlse is not None else torch.zeros_like(lse)  # (made contiguous where the kernels read it)
    backward = (_attention_bwd if _plain_eager(dout, dlse, q, k, v, out, ref_k, ref_v, cu_q, cu_k, ref_index, cu_ref)
                else _attention_bwd_op)
    dq, dk, dv, dref_k, dref_v = backward(
        dout, dlse, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ref_k, ref_v, ref_index, cu_ref,
        ctx.max_ref, ctx.scale)
    has_ref = ref_k is not None
    return (dq, dk, dv, None, None, None, None, dref_k if has_ref else None, dref_v if has_ref else None,
            None, None, None, None)


torch.library.register_autograd("sparsectx::sparse_attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


def _autograd_function(name: str, implementation, setup_context, backward):
    """A ``torch.autograd.Function`` twin of a custom op and its registered autograd, for eager calls that autograd
    records and nothing else must see (``_eager``): the same implementation, context and backward, without the
    custom op's dispatch and autograd wrapper (host time of a forward + backward with the kernel launches stubbed,
    on this project's CPU machine: ``rms_norm_rope`` 131 us through the custom op, 87 through the Function;
    ``sparse_attention`` 189 and 116).
    A backward that records a graph (``create_graph=True``) calls the backward custom op, whose second-order
    autograd raises, as it does after the custom op's forward."""

    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as the custom op passes it
        output = implementation(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


_AttentionFunction = _autograd_function("_AttentionFunction", _attention_fwd, _attention_setup_context,
                                        _attention_backward)


def _first_order_only(backward_op: str, what: str) -> None:
    """Registers, as the autograd of a backward custom op, an error: the op ``what`` has first-order gradients
    only."""
    def no_double_backward(ctx, *grads):
        raise NotImplementedError(f"sparsectx's {what} has first-order gradients only: a backward through its "
                                  "gradients (torch.autograd.grad(..., create_graph=True) and then a second "
                                  "backward, e.g. a gradient penalty) is not supported")

    torch.library.register_autograd(backward_op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


_first_order_only("sparsectx::sparse_attention_bwd", "attention")


# device type -> torch.amp.is_autocast_available(it), asked outside any trace: torch 2.11's dynamo can not trace that
# call (``torch.compile(fullgraph=True)`` of every attention op failed there, and drop training broke a graph per
# layer). The device types a tensor can have here are answered at import (meta too: fake tensors' shapes); another
# at its first call
_AUTOCAST_AVAILABLE: dict = {}
for _device_type in ("cpu", "cuda", "meta", "xpu", "mps", "hpu", "mtia", torch._C._get_privateuse1_backend_name()):
    try:
        _AUTOCAST_AVAILABLE[_device_type] = torch.amp.is_autocast_available(_device_type)
    except RuntimeError:  # (a device type this torch does not know: asked again, and refused, at a call)
        pass


def _autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` asks for on ``t``'s device type, or None when it is off there."""
    device_type = t.device.type if isinstance(t, torch.Tensor) else None
    if device_type is None:
        return None
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    if not available or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _casts_under_autocast(*names: str):
    """Decorator of an attention op whose first parameter is q: inside ``torch.autocast`` for q's device type, the
    named floating-point inputs (float64 excepted, as autocast does) are cast to the autocast dtype, as torch's SDPA
    does, and the op runs with autocast off, so that what it computes in fp32 (the torch reference path) stays fp32.
    Outside autocast: one check."""

    def decorate(op):
        signature = inspect.signature(op)

        @functools.wraps(op)
        def run(*args, **kwargs):
            dtype = _autocast_dtype(args[0] if args else kwargs.get("q"))
            if dtype is None:
                return op(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                value = bound.arguments.get(name)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                    bound.arguments[name] = value.to(dtype)  # (autocast leaves float64 alone, as here)
            with torch.autocast(bound.arguments["q"].device.type, enabled=False):
                return op(*bound.args, **bound.kwargs)

        return run

    return decorate


@_casts_under_autocast("q", "k", "v", "ref_k", "ref_v")
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    ref_k: Optional[torch.Tensor] = None,
    ref_v: Optional[torch.Tensor] = None,
    ref_index: Optional[torch.Tensor] = None,
    cu_seqlens_ref: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    max_seqlen_ref: Optional[int] = None,
    return_lse: bool = False,
    validate: bool = True,
):
    """Varlen joint attention with keys gathered from a reference buffer (flash_attn_varlen_func-style).

    q ``[Tq, H, D]``; k, v ``[Tk, H, D]``, packed over the batch by ``cu_seqlens_q``/``cu_seqlens_k`` (int32
    ``[B+1]``). Optional ``ref_k``/``ref_v`` ``[B, R, H, D]`` with ``ref_index`` int32 ``[Tref]`` packed by
    ``cu_seqlens_ref``: sample b's keys are its own packed keys followed by
    ``ref_k[b, ref_index[cu_seqlens_ref[b]:cu_seqlens_ref[b+1]]]`` (indices unique within a sample). Without
    ``ref_index``, ``ref_k``/``ref_v`` are packed ``[Tref, H, D]`` and sample b's further keys are their rows
    ``cu_seqlens_ref[b]:cu_seqlens_ref[b+1]`` (a second contiguous key segment per sample: e.g. the image tokens of
    a packed batch whose text tokens are the own keys). No causal mask. With fp16/bf16 inputs, head dims of 16, 32,
    64 or 128, a buffer whose heads are adjacent (``ref_k.stride(2) == D``) and at most 64 samples, the kernel
    forward first copies the kept rows into packed ``[Tref, H, D]`` keys and values (one launch; two tensors of
    ``ref_index.numel()`` rows, for the launch only), which it loads by tile copies (on an H200, gathered keys
    took 1.04-1.24x the time of the same keys loaded that way: bench/RESULTS.md, 2026-11-30); otherwise, and in
    the backward, it gathers them in place.

    Returns ``out [Tq, H, D]`` in q's dtype (and ``lse [H, Tq]`` fp32, natural log, when ``return_lse``). A query
    that sees no key outputs zeros with lse ``-inf`` (a key whose score is ``-inf`` weighs zero, but an inf or NaN in
    its value row still makes the output NaN, 0 * inf, as in SDPA). fp16/bf16 compute with fp32 accumulation; fp32
    inputs use full-precision (IEEE) dot products. Gradients flow to q, k, v, ref_k and ref_v. As in FlashAttention, the
    backward recomputes the probabilities from the stored fp32 lse (natural log, converted to base 2 with the
    scores scaled by ``scale * log2(e)``), whose rounding grows with its magnitude: fp32 gradients carry a relative
    error of about ``|lse| * 1e-7`` while that is well below 1 (measured: dv 1.1e-2 at |lse| 4.2e5; far beyond
    practice the error grows exponentially instead, 2.3 at |lse| 3.9e7 and 3.9e4 at 3.4e8, where the torch path
    stays near 1e-7). A plain fp32 softmax's can be smaller where its scale multiplies exactly: with
    ``softmax_scale=1`` on unit-variance q and k at D=64 (|lse| near 30) sparsectx's fp32 gradients had 1-6x its
    largest error over the cases measured (at most 2x up to |lse| 16); a randomized run over 2190 varlen cases
    found up to 7.9x (dk with ``softmax_scale=2`` at D=16, |lse| up to 26: 3.3e-6 of the largest gradient). A query
    that sees a single key is the sharpest case: its probability is 1, a plain softmax's backward cancels exactly
    there, FlashAttention's ``dP - rowsum(dout * out)`` only to rounding (fp32, D=64: dq 6-9e-7 against plain fp32's
    3-5e-8, about 1e-6 of dq's largest entry; the torch reference path, which specifies the same form, 1.7e-6). The
    fp32 forward rounds its scaled scores the same way: with ``softmax_scale=1`` and scores of -250 to -1000 its
    output error was 3.2x a plain fp32 softmax's in one measured case, and scaled scores above fp32's largest value
    over log2(e) (about 2.3e38) overflow there: NaN output and lse +inf (the torch path's fp32 scores overflow as
    well: NaN at ``softmax_scale=1e38`` on unit-variance inputs at D=16). In
    fp16/bf16 the inputs' rounding is far larger, and, as in FlashAttention, the backward's ``rowsum(dout * out)``
    takes the output as stored, rounded to q's dtype: every key of a query gets the same absolute error of about
    ``|scale| * |k| * |dout| * |out| * 2**-11`` (fp16; ``2**-8`` bf16), small against the largest gradients but not
    against a key's small one. At the default
    scale the gradients meet the flash-attention criterion (2x a plain fp16 softmax's error); with larger scales
    they may not: a randomized interpreter run found dref_k 13x torch fp16's largest error at ``softmax_scale=4``
    (6.2e-3, 0.9% of that gradient's largest entry; dq and dk there 4-6x below torch's) and dq up to 9.5x at
    ``softmax_scale=1`` (7.6e-3) in masked attention over two keys. The kernels' backward rounds dS to q's dtype
    before its products, as FlashAttention and torch's fp16 SDPA do: in fp16, dq and dk overflow to inf where
    ``|dout . v|`` passes fp16's range (65504), while the torch reference path, computing in fp32, stays finite.

    ``softmax_scale`` defaults to ``1 / sqrt(D)``.

    ``max_seqlen_q``, ``max_seqlen_k`` and ``max_seqlen_ref`` above the packed rows there are (a loose bound) are
    lowered to them: no sample can be longer, and the kernels' grids follow these bounds.

    ``max_seqlen_ref`` bounds the reference keys of one sample (default: the buffer length R, or Tref for packed
    references, which needs no host read); only the backward's grid uses it.

    Rows of q past ``cu_seqlens_q[-1]`` (a caller's padding, possible with ``validate=False``) belong to no sample:
    the kernels leave their output rows unwritten (as flash-attn's varlen kernels do; slice them off before using
    the output) and the torch reference fills them with zeros (lse ``-inf``). Their gradients, and those of k/v
    rows past ``cu_seqlens_k[-1]``, are zero on every path.

    ``validate=True`` checks cu_seqlens and indices with a few small host reads; pass False in a hot loop once the
    inputs are known to be well formed (then nothing synchronises with the host, but for the autotuner's first
    launch of each size class on a GPU, and nothing is checked: a ``max_seqlen_*`` below a sample's length leaves
    that sample's rows past it unwritten (output and dq rows for ``max_seqlen_q``, dk/dv or reference-gradient rows
    for the others), a position repeated in one sample's ``ref_index`` gives its reference-gradient row one of the
    writers' values). While ``torch.compile`` traces (no data to read) those checks are skipped, as are the
    finiteness check of a traced ``softmax_scale``.

    Inside ``torch.autocast`` (for q's device type) q, k, v, ref_k and ref_v are cast to the autocast dtype first,
    as torch's SDPA does: e.g. a model whose fp32 norms return fp32 q and k beside a bf16 v.
    """
    _check_tensor("q", q, ndim=3, dtypes=_ATTN_DTYPES)
    _check_flag("return_lse", return_lse)
    _check_flag("validate", validate)
    dev, dt = q.device, q.dtype
    _check_tensor("k", k, ndim=3, device=dev)
    _check_tensor("v", v, ndim=3, device=dev)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dt:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {dt}")
    tq, heads, dim = q.shape
    if k.shape[1:] != (heads, dim):
        gqa = (k.shape[2] == dim and 0 < k.shape[1] < heads and heads % k.shape[1] == 0)
        raise ValueError(f"k must be [Tk, {heads}, {dim}] like q's heads and head dim, got {tuple(k.shape)}" + (
            f" (k/v with fewer heads than q, GQA/MQA, are not supported: repeat them, e.g. "
            f"k.repeat_interleave({heads // k.shape[1]}, dim=1), which is flash-attn's grouping)" if gqa else ""))
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_head_dim(dim)
    max_seqlen_q, max_seqlen_k = _python_number(max_seqlen_q), _python_number(max_seqlen_k)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(value):
            raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
        if not isinstance(value, torch.SymInt) and _surely(value < 0):
            raise ValueError(f"{name} must be non-negative, got {value}")
    # traced (torch.compile, export, meta / fake tensors): no data to read, and the scale may be a symbol: the
    # checks that read the device or the scale's value are skipped there
    traced = _traced(q, cu_seqlens_q)
    softmax_scale = _softmax_scale(softmax_scale, dim, symbolic=True, traced=traced)
    # index tensors batched by torch.vmap hold no single value to read: their checks are skipped as when tracing
    vmapped = any(isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)
                  for t in (cu_seqlens_q, cu_seqlens_k, cu_seqlens_ref, ref_index))
    validate = validate and not traced and not vmapped
    has_ref = ref_k is not None or ref_v is not None or ref_index is not None or cu_seqlens_ref is not None
    if validate:
        batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, tq, dev)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch, k.shape[0], dev)
        if _max_len(cu_seqlens_q) > max_seqlen_q:
            raise ValueError(f"max_seqlen_q={max_seqlen_q} is smaller than the longest query sequence")
        if _max_len(cu_seqlens_k) > max_seqlen_k:
            raise ValueError(f"max_seqlen_k={max_seqlen_k} is smaller than the longest key sequence")
    else:  # no host read: types and entry counts only
        _check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=dev)
        _check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=(torch.int32,), device=dev)
        batch = cu_seqlens_q.numel() - 1
        if batch < 0:
            raise ValueError("cu_seqlens_q must have B+1 >= 1 entries, got none")
        _check_entry_count("cu_seqlens_k", cu_seqlens_k, batch)
    if batch > MAX_GRID_SAMPLES:
        raise ValueError(f"cu_seqlens_q holds {batch} samples; one call takes at most {MAX_GRID_SAMPLES} (the "
                         "kernels' grid has a program row per sample, and CUDA caps that grid dimension): split "
                         "the batch")
    _check_grid_heads("q", heads)
    # (the kernels read index tensors with unit stride: the op implementations make them so, ``_contiguous``)
    if has_ref:
        if ref_k is None or ref_v is None or cu_seqlens_ref is None:
            raise ValueError("ref_k, ref_v and cu_seqlens_ref must be given together (with ref_index for a "
                             "[B, R, H, D] buffer, without it for packed [Tref, H, D] references)")
        packed = ref_index is None
        _check_tensor("ref_k", ref_k, device=dev)
        _check_tensor("ref_v", ref_v, device=dev)
        if ref_k.dtype != dt or ref_v.dtype != dt:
            raise ValueError(f"ref_k/ref_v must have q's dtype {dt}, got {ref_k.dtype}/{ref_v.dtype}")
        if packed and (ref_k.ndim != 3 or ref_k.shape[1:] != (heads, dim)):
            raise ValueError(f"without ref_index, ref_k must hold packed references [Tref, H={heads}, D={dim}], got "
                             f"{tuple(ref_k.shape)}")
        if not packed and (ref_k.ndim != 4 or ref_k.shape[0] != batch or ref_k.shape[2:] != (heads, dim)):
            raise ValueError(f"ref_k must be [B={batch}, R, H={heads}, D={dim}] (with ref_index), got "
                             f"{tuple(ref_k.shape)}")
        if ref_v.shape != ref_k.shape:
            raise ValueError(f"ref_v must have ref_k's shape {tuple(ref_k.shape)}, got {tuple(ref_v.shape)}")
        if not packed:
            _check_tensor("ref_index", ref_index, ndim=1, dtypes=(torch.int32,), device=dev)
        if validate:
            _check_cu_seqlens("cu_seqlens_ref", cu_seqlens_ref, batch,
                              ref_k.shape[0] if packed else ref_index.numel(), dev)
            if not packed and ref_index.numel():
                _check_ref_index(ref_index, cu_seqlens_ref, ref_k.shape[1])
        else:
            _check_tensor("cu_seqlens_ref", cu_seqlens_ref, ndim=1, dtypes=(torch.int32,), device=dev)
            _check_entry_count("cu_seqlens_ref", cu_seqlens_ref, batch)
        ref_k, ref_v = _last_dim_contiguous(ref_k), _last_dim_contiguous(ref_v)
        max_seqlen_ref = _python_number(max_seqlen_ref)
        if max_seqlen_ref is None:
            max_seqlen_ref = ref_k.shape[-3]
        elif not _is_int(max_seqlen_ref):
            raise TypeError(f"max_seqlen_ref must be a Python int, got {max_seqlen_ref!r}")
        elif _surely(max_seqlen_ref < 0):
            raise ValueError(f"max_seqlen_ref must be non-negative, got {max_seqlen_ref}")
        elif validate and _max_len(cu_seqlens_ref) > max_seqlen_ref:
            raise ValueError(f"max_seqlen_ref={max_seqlen_ref} is smaller than a sample's kept reference count")
    elif max_seqlen_ref is not None:  # unused without references, but a wrong value is still the caller's error
        _check_count("max_seqlen_ref", max_seqlen_ref)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    # a sample holds at most all the packed rows: a larger max_seqlen_* would only widen the kernels' grids with
    # programs that find no row (their cost grew linearly: max_seqlen_q=10**5 over 10 rows)
    max_seqlen_q, max_seqlen_k = _at_most(max_seqlen_q, tq), _at_most(max_seqlen_k, k.shape[0])
    if has_ref:
        max_seqlen_ref = _at_most(max_seqlen_ref, ref_k.shape[0] if ref_index is None else ref_index.numel())
    # the lengths stay symbolic where they are (torch.export with dynamic shapes: int() would specialise them);
    # the index tensors count for the dispatch too: one batched by vmap alone must reach vmap's loop over the op
    forward = _dispatch(_attention_fwd, _AttentionFunction, _attention_fwd_op, q, k, v, ref_k, ref_v,
                        cu_seqlens_q, cu_seqlens_k, ref_index, cu_seqlens_ref)
    out, lse = forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       ref_k, ref_v, ref_index if has_ref else None, cu_seqlens_ref if has_ref else None,
                       max_seqlen_ref if has_ref else 0, float(softmax_scale))
    return (out, lse) if return_lse else out


def _check_flag(name: str, value) -> None:
    """A switch given as a Python bool (``return_lse="no"`` or ``validate=None`` read as truthy or falsy was taken
    silently)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_head_dim(dim: int) -> None:
    if dim > MAX_HEAD_DIM or dim < 1:
        raise ValueError(f"head dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {dim}")


def _at_most(value, bound):
    """``min(value, bound)``, or ``value`` when either is symbolic and their order is not known (a comparison would
    add a guard)."""
    if isinstance(value, torch.SymInt) or isinstance(bound, torch.SymInt):
        return value
    # (while dynamo traces, symbols come as ints: known without a guard, or left as they are: a guard on a shape
    # symbol fails a strict export with a dynamic token dimension and recompiles a compiled call)
    greater = value > bound  # (a tensor under torch.jit.trace, whose shapes are tensors: read as it is)
    return bound if (bool(greater) if isinstance(greater, torch.Tensor) else statically_known_true(greater)) else value


def _check_entry_count(name: str, cu_seqlens: torch.Tensor, batch: int) -> None:
    """``cu_seqlens`` has cu_seqlens_q's B+1 entries (metadata: no host read; the kernels index it by sample)."""
    if cu_seqlens.numel() != batch + 1:
        raise ValueError(f"{name} must have B+1 = {batch + 1} entries like cu_seqlens_q, got {cu_seqlens.numel()}")


def _is_int(value) -> bool:
    """A Python int, or the symbolic int torch.compile traces one as (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, torch.SymInt))


def _check_ref_index(ref_index: torch.Tensor, cu_seqlens_ref: torch.Tensor, n_ref: int) -> None:
    """Every index within the buffer's R rows and none twice within a sample (a repeated key would be attended
    twice and its gradient written once). A few host reads."""
    lo, hi = int(ref_index.min()), int(ref_index.max())
    if lo < 0 or hi >= n_ref:
        raise ValueError(f"ref_index must lie in [0, {n_ref}), got values in [{lo}, {hi}]")
    rows = torch.arange(ref_index.numel(), device=ref_index.device, dtype=torch.int32)
    sample = torch.searchsorted(cu_seqlens_ref[1:].contiguous(), rows, right=True)
    keys = sample.to(torch.int64) * n_ref + ref_index.to(torch.int64)
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError("ref_index repeats a position within a sample (indices must be unique per sample)")


def _last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels take any token/head strides but need unit stride along the head dim (None stays None)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def uniform_cu_seqlens(batch: int, seq: int, device) -> torch.Tensor:
    """int32 ``[B+1]`` offsets of B sequences of ``seq`` tokens each (``seq`` may be 0), built on the device: one
    launch (an arange of step ``seq``) for a positive int; a symbolic ``seq`` stays symbolic (an arange of step
    ``seq`` would specialise its length) and 0 is no step: there an arange times ``seq``."""
    if type(seq) is int and seq > 0 and not torch.compiler.is_compiling():  # (dynamo sees a symbol as an int)
        return torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seq


@_casts_under_autocast("q", "k", "v")
def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    query_mask: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    kept_prefix: int = 0,
) -> torch.Tensor:
    """Attention in diffusers' dense layout ``q, k, v [B, S, H, D]`` where sample b attends only to the keys with
    ``key_mask[b]`` True (bool ``[B, S]``). Dropped tokens stay in the tensors and the kernel's work scales with the
    kept count: the kept keys and values are gathered from ``k`` and ``v`` by index (``sparse_attention``'s
    forward copies them into contiguous blocks first where it reads those faster; the backward reads them in place,
    so no copy is kept for it).
    ``query_mask`` (bool ``[B, S]``, e.g. the same mask) skips the queries where it is False: their output is zero
    and they cost nothing (passed as the very ``key_mask`` object, without ``kept_prefix`` or autograd, one
    compaction packs the keys and values, and the kernel reads the kept queries and writes their outputs in place).
    Queries with no kept key output zero.

    ``kept_prefix``: the first ``kept_prefix`` tokens of every sample are keys whatever ``key_mask`` says there
    (e.g. the text and target tokens of a training drop mask). They are copied once into contiguous key blocks,
    which the kernel reads faster than gathered rows; ``key_mask`` chooses among the rest of the keys only.

    Gradients flow to q, k, v (zero at dropped keys and skipped queries). Nothing synchronises with the host on a GPU
    (on the CPU, each compaction checks ``max_total`` against the mask's kept total: one read; the torch reference
    path, without ``TRITON_INTERPRET=1``, reads twice more to build the index with ``nonzero``).
    Inside ``torch.autocast`` q, k and v are cast to the autocast dtype first, as in ``sparse_attention``.
    """
    _check_tensor("q", q, ndim=4, dtypes=_ATTN_DTYPES)
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4, device=dev)
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} must match q's shape {tuple(q.shape)} and dtype {q.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    batch, seq, heads, dim = q.shape
    _check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,), device=dev)
    if key_mask.shape != (batch, seq):
        raise ValueError(f"key_mask must be [B={batch}, S={seq}], got {tuple(key_mask.shape)}")
    # (the kept keys are compacted, and each mask keeps its own count: no batching rule)
    _refuse_vmap("masked_attention with a batched key_mask", key_mask=key_mask)
    if query_mask is not None:
        _check_tensor("query_mask", query_mask, ndim=2, dtypes=(torch.bool,), device=dev)
        if query_mask.shape != (batch, seq):
            raise ValueError(f"query_mask must be [B={batch}, S={seq}], got {tuple(query_mask.shape)}")
        # (the skipped queries are compacted, and each sample keeps its own count: no batching rule)
        _refuse_vmap("masked_attention with a query_mask", q=q, k=k, v=v, query_mask=query_mask)
    kept_prefix = _python_number(kept_prefix)
    if not _is_int(kept_prefix):  # (a symbolic int too: torch.export's dynamic text length, as the drop-in computes)
        raise TypeError(f"kept_prefix must be an int in [0, S={seq}], got {type(kept_prefix).__name__}")
    if not 0 <= kept_prefix <= seq:
        raise ValueError(f"kept_prefix must be an int in [0, S={seq}], got {kept_prefix!r}")
    # (checked here, before the compaction launches, as sparse_attention checks them again; the kept queries' path
    # launches the kernel itself)
    _check_head_dim(dim)
    softmax_scale = _softmax_scale(softmax_scale, dim, symbolic=True, traced=_traced(q))
    if batch > MAX_GRID_SAMPLES:
        raise ValueError(f"q holds {batch} samples; one call takes at most {MAX_GRID_SAMPLES} (the kernels' grid has "
                         "a program row per sample, and CUDA caps that grid dimension): split the batch")
    _check_grid_heads("q", heads)

    # without autograd or a tracer to see them, packed copies are made directly (see _pack_for_attention)
    queries_eager, keys_eager = _plain_eager(q), _plain_eager(k, v)
    if query_mask is key_mask and kept_prefix == 0 and queries_eager and keys_eager:
        # one mask for the queries and the keys, no autograd: one compaction packs k and v, whose kept keys are
        # then each sample's own contiguous keys
        kept = _pack_for_attention(key_mask, k, v)
        packed_k, packed_v = kept.tensors
        if _use_triton(q):  # the kernel reads the kept queries and writes their outputs in place (by kept.index)
            return _attend_kept_queries_in_place(q, packed_k, packed_v, kept, softmax_scale)
        packed_q = _gather_rows([q], kept.index, kept.cu_seqlens, False)[0]
        out = sparse_attention(packed_q, packed_k, packed_v, kept.cu_seqlens, kept.cu_seqlens, seq, seq,
                               softmax_scale=softmax_scale, validate=False)
        # (row counts spelt out, not -1: a tensor of zero heads has no elements to infer them from)
        return scatter_tokens(out.reshape(out.shape[0], heads * dim), kept.index, kept.cu_seqlens, seq).view(q.shape)

    # keys: the kept prefix as contiguous own keys; the rest by kept position, gathered from the dense tensors (the
    # forward's launcher packs them first where packed rows load faster; the backward reads them in place)
    own_k = k[:, :kept_prefix].reshape(batch * kept_prefix, heads, dim)
    own_v = v[:, :kept_prefix].reshape(batch * kept_prefix, heads, dim)
    cu_k = uniform_cu_seqlens(batch, kept_prefix, dev)
    refs = {}
    if kept_prefix < seq:
        rest_mask, rest_k, rest_v = key_mask[:, kept_prefix:], k[:, kept_prefix:], v[:, kept_prefix:]
        rest_rows = batch * (seq - kept_prefix)
        rest = compact_tokens(rest_mask, max_total=rest_rows)
        refs = dict(ref_k=rest_k, ref_v=rest_v, ref_index=rest.index, cu_seqlens_ref=rest.cu_seqlens)

    if query_mask is None:
        cu_q = uniform_cu_seqlens(batch, seq, dev)
        out = sparse_attention(q.reshape(batch * seq, heads, dim), own_k, own_v, cu_q, cu_k, seq, kept_prefix,
                               softmax_scale=softmax_scale, validate=False, **refs)
        return out.view(batch, seq, heads, dim)
    dense_q = q.reshape(batch, seq, heads * dim)
    queries = (_pack_for_attention(query_mask, dense_q) if queries_eager else
               compact_tokens(query_mask, dense_q, max_total=batch * seq))
    packed_q = queries.tensors[0].view(queries.tensors[0].shape[0], heads, dim)
    out = sparse_attention(packed_q, own_k, own_v, queries.cu_seqlens, cu_k, seq, kept_prefix,
                           softmax_scale=softmax_scale, validate=False, **refs)
    dense = scatter_tokens(out.reshape(out.shape[0], heads * dim), queries.index, queries.cu_seqlens, seq)
    return dense.view(batch, seq, heads, dim)


def _attend_kept_queries_in_place(q: torch.Tensor, packed_k: torch.Tensor, packed_v: torch.Tensor, kept: Compacted,
                                  softmax_scale) -> torch.Tensor:
    """``masked_attention``'s kept queries attending to the kept keys of their sample (``kept``: the mask's
    compaction, ``packed_k/v [B*S, H, D]`` its packed rows) in one forward launch that reads each kept query at its
    place in the dense ``q [B, S, H, D]`` and writes its output there, in a zero-filled ``[B, S, H, D]`` output:
    no packed copy of q, no scatter of the output (Triton only, no autograd; inputs checked by the caller)."""
    from .kernels import attention as _k

    seq = q.shape[1]
    out, _ = _k.attention_forward(_last_dim_contiguous(q), packed_k, packed_v, kept.cu_seqlens, kept.cu_seqlens, seq,
                                  None, None, None, None, float(softmax_scale), q_index=kept.index)
    return out


def _pack_for_attention(mask: torch.Tensor, *tensors: torch.Tensor) -> Compacted:
    """``compact_tokens(mask, *tensors, max_total=B * S)`` for ``masked_attention``'s plain eager calls (checked
    inputs, no autograd): the packed rows past the kept total are left unwritten (``sparse_attention`` reads no row
    past a sample's end; zeroing them would be one more write of every dropped row of every tensor)."""
    index, cu_seqlens = _compact_index(mask, None, mask.numel())
    return Compacted(index, cu_seqlens, None, tuple(_gather_rows(list(tensors), index, cu_seqlens, False)))


_KEY_MASS_DTYPES = _ATTN_DTYPES + (torch.float64,)  # float64: the reference path (an exact check)


@torch.library.custom_op("sparsectx::attention_key_mass", mutates_args=())
def _key_mass_op(q: torch.Tensor, k: torch.Tensor, query_weights: torch.Tensor,
                 softmax_scale: float) -> torch.Tensor:
    return _key_mass(q, k, query_weights, softmax_scale)


def _key_mass(q, k, query_weights, softmax_scale):
    """The key-mass custom op's implementation (eager calls that record no graph call it directly)."""
    if q.dtype != torch.float64 and _use_triton(q):
        from .kernels.attention import attention_key_mass as launch

        weights = query_weights.to(torch.float32).contiguous()
        return launch(_last_dim_contiguous(q), _last_dim_contiguous(k), weights, softmax_scale)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    with _autocast_off(q):
        return reference.attention_key_mass_ref(q.to(wide), k.to(wide), query_weights.to(wide), softmax_scale)


@_key_mass_op.register_fake
def _(q, k, query_weights, softmax_scale):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((q.shape[0], q.shape[2], k.shape[1]), dtype=dtype)


def attention_key_mass(q: torch.Tensor, k: torch.Tensor, query_weights: Optional[torch.Tensor] = None, *,
                       softmax_scale: Optional[float] = None) -> torch.Tensor:
    """How much attention each key receives: float32 ``[B, H, N]`` (float64 for float64 inputs) with
    ``mass[b, h, n] = sum_q query_weights[b, q] · softmax_n(softmax_scale · q[b, q, h]·k[b, n, h])``, the softmax
    running over the given keys only (a query whose scores are all -inf gives nothing; NaN or +inf scores give NaN,
    as torch's softmax does).

    ``q [B, Q, H, D]``, ``k [B, N, H, D]`` in diffusers' dense layout, one dtype (fp16, bf16, fp32; float64 on the
    reference path), head dim 1..256; ``query_weights`` float ``[B, Q]`` (None: ``1/Q`` each, the mean over the
    queries), e.g. a mask of the valid queries divided by their count; ``softmax_scale`` defaults to ``1/sqrt(D)``.
    Token selection's probes use it (``sparsectx.selection.attention_mass``).

    On a GPU (or the interpreter): two Triton passes, each query's max score and sum of exponentials, then each key
    block's weighted sum of probabilities; no score is written to memory; scores accumulate in fp32 from the
    inputs' products (fp32 inputs: full IEEE products). The torch reference computes in fp32 (float64 inputs:
    float64), in chunks of at most ``reference.KEY_MASS_CHUNK_ELEMENTS`` scores. A ``torch.library`` custom op
    (``torch.ops.sparsectx.attention_key_mass``, with a fake implementation): ``torch.compile`` traces it. No
    gradient: inputs that require one are refused while autograd records (detach them). Nothing synchronises with
    the host.
    """
    _check_tensor("q", q, ndim=4, dtypes=_KEY_MASS_DTYPES)
    _check_tensor("k", k, ndim=4, device=q.device)
    if k.dtype != q.dtype:
        raise ValueError(f"k has dtype {k.dtype} but q has {q.dtype}")
    batch, n_queries, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must be [B={batch}, N, H={heads}, D={dim}] like q, got {tuple(k.shape)}")
    _check_head_dim(dim)
    if q.dtype != torch.float64 and max(batch, heads) > MAX_GRID_SAMPLES:  # kernels launch (blocks, heads, samples)
        raise ValueError(f"q has {batch} samples and {heads} heads; one call takes at most {MAX_GRID_SAMPLES} of "
                         "each (CUDA's grid limit): split the batch")
    if query_weights is None:
        query_weights = torch.full((batch, n_queries), 1.0 / max(n_queries, 1), device=q.device,
                                   dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    _check_tensor("query_weights", query_weights, ndim=2, device=q.device)
    if not query_weights.is_floating_point() or tuple(query_weights.shape) != (batch, n_queries):
        raise ValueError(f"query_weights must be a float [B={batch}, Q={n_queries}] tensor, got "
                         f"{query_weights.dtype} {tuple(query_weights.shape)}")
    softmax_scale = _softmax_scale(softmax_scale, dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or query_weights.requires_grad):
        raise ValueError("attention_key_mass has no gradient: pass detached q, k and query_weights (or call it "
                         "under torch.no_grad())")
    key_mass = _key_mass if _plain_eager(q, k, query_weights) else _key_mass_op
    return key_mass(q, k, query_weights, float(softmax_scale))


# ----------------------------------------------------------------------------------------------------------------
# QK norm and rotary embedding
# ----------------------------------------------------------------------------------------------------------------
_NORM_ROPE_DTYPES = _ATTN_DTYPES + (torch.float64,)  # float64: the reference path (an exact check)
_NORM_ROPE_MAX_HEAD_DIM = 256


@torch.library.custom_op("sparsectx::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: Optional[torch.Tensor],
                      eps: float, prefix: Optional[torch.Tensor], prefix_weight: Optional[torch.Tensor],
                      round_before_weight: bool) -> torch.Tensor:
    return _rms_norm_rope(x, cos, sin, weight, eps, prefix, prefix_weight, round_before_weight)


def _rms_norm_rope(x, cos, sin, weight, eps, prefix, prefix_weight, round_before_weight):
    """The custom op's implementation (eager calls that record no graph call it directly)."""
    if x.dtype != torch.float64 and _use_triton(x):
        from .kernels.norm_rope import rms_norm_rope as launch

        return launch(_norm_rope_segments(x, weight, prefix, prefix_weight), cos, sin, eps, round_before_weight)
    return reference.rms_norm_rope_ref(x, cos, sin, weight, eps, prefix, prefix_weight, round_before_weight)


def _norm_rope_segments(x, weight, prefix, prefix_weight) -> list:
    """The launchers' segments in sequence order, ``(head vectors with a contiguous last dim, contiguous weight or
    None)``."""
    segments = [(x, weight)] if prefix is None else [(prefix, prefix_weight), (x, weight)]
    return [(_last_dim_contiguous(t), None if w is None else w.contiguous()) for t, w in segments]


@_rms_norm_rope_op.register_fake
def _(x, cos, sin, weight, eps, prefix, prefix_weight, round_before_weight):
    return x.new_empty((x.shape[0], cos.shape[0], *x.shape[2:]))


@torch.library.custom_op("sparsectx::rms_norm_rope_bwd", mutates_args=())
def _rms_norm_rope_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: Optional[torch.Tensor],
    eps: float, prefix: Optional[torch.Tensor], prefix_weight: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dprefix, dprefix_weight); empty tensors for the ones whose input is None."""
    return _rms_norm_rope_bwd(dy, x, cos, sin, weight, eps, prefix, prefix_weight)


def _rms_norm_rope_bwd(dy, x, cos, sin, weight, eps, prefix, prefix_weight):
    """The backward custom op's implementation (eager backward passes that record no graph call it directly)."""
    if x.dtype != torch.float64 and _use_triton(x):
        from .kernels.norm_rope import rms_norm_rope_backward as launch

        grads = launch(_last_dim_contiguous(dy), _norm_rope_segments(x, weight, prefix, prefix_weight), cos, sin, eps)
        (dx, dweight), (dprefix, dprefix_weight) = grads[-1], (grads[0] if prefix is not None else (None, None))
    else:
        dx, dweight, dprefix, dprefix_weight = reference.rms_norm_rope_bwd_ref(
            dy, x, cos, sin, weight, eps, prefix, prefix_weight)
        dx, dprefix = dx.contiguous(), None if dprefix is None else dprefix.contiguous()
    return tuple(g if g is not None else x.new_empty(0) for g in (dx, dweight, dprefix, dprefix_weight))


@_rms_norm_rope_bwd_op.register_fake
def _(dy, x, cos, sin, weight, eps, prefix, prefix_weight):
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (x, weight, prefix, prefix_weight))


def _rms_norm_rope_setup_context(ctx, inputs, output):
    x, cos, sin, weight, eps, prefix, prefix_weight, _ = inputs
    ctx.save_for_backward(x, cos, sin, weight, prefix, prefix_weight)
    ctx.eps = eps


def _rms_norm_rope_backward(ctx, dy):
    if dy is None:  # the output did not reach the loss (an undefined gradient: every gradient is zero)
        return (None,) * 8
    x, cos, sin, weight, prefix, prefix_weight = ctx.saved_tensors
    backward = _rms_norm_rope_bwd if _plain_eager(dy, x, weight, prefix, prefix_weight) else _rms_norm_rope_bwd_op
    dx, dweight, dprefix, dprefix_weight = backward(dy, x, cos, sin, weight, ctx.eps, prefix, prefix_weight)
    return (dx, None, None, dweight if weight is not None else None, None, dprefix if prefix is not None else None,
            dprefix_weight if prefix_weight is not None else None, None)


torch.library.register_autograd("sparsectx::rms_norm_rope", _rms_norm_rope_backward,
                                setup_context=_rms_norm_rope_setup_context)


_first_order_only("sparsectx::rms_norm_rope_bwd", "rms_norm_rope")
_RmsNormRopeFunction = _autograd_function("_RmsNormRopeFunction", _rms_norm_rope, _rms_norm_rope_setup_context,
                                          _rms_norm_rope_backward)


def rms_norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  eps: Optional[float] = None, *, prefix: Optional[torch.Tensor] = None,
                  prefix_weight: Optional[torch.Tensor] = None, round_before_weight: bool = False) -> torch.Tensor:
    """FLUX.1/FLUX.2 attention's queries (or keys) from their projections, in one pass: every head vector of
    ``x [B, S, H, D]`` through ``torch.nn.RMSNorm(D, eps)`` with ``weight [D]`` (None: no affine weight), the
    text stream ``prefix [B, S0, H, D]`` (normalised with ``prefix_weight``) joined before it along the sequence,
    then diffusers' ``apply_rotary_emb(..., use_real=True, use_real_unbind_dim=-1)`` with the joint sequence's
    tables ``cos, sin [S0 + S, D]`` (pairs of adjacent features rotated), or ``[S0 + S, D/2]`` tables of one value
    per pair (Qwen-Image's complex frequencies as ``freqs.real, freqs.imag``: views, read in place). Returns a new
    contiguous ``[B, S0 + S, H, D]`` in x's dtype. Spec: ``sparsectx.reference.rms_norm_rope_ref``.
    ``round_before_weight``: the norm of diffusers' own ``RMSNorm`` class (Qwen-Image's QK norms) with a weight of
    x's dtype instead, which rounds the normalised vector to that dtype before the weight multiplies it.

    Rounding as in diffusers: the norm computes in fp32 and its output is rounded to x's dtype, the rotation
    computes in fp32 from it and is rounded again. ``eps`` None: the epsilon of the compute dtype (fp32's for
    fp16/bf16/fp32 inputs), as ``torch.nn.RMSNorm`` computes (its documentation says x's dtype's). dtypes fp16,
    bf16, fp32 (float64 on the reference path); head dim even, at most 256; strided x and prefix are read in place
    when their last dim is contiguous (e.g. the q/k thirds of a fused QKV projection), tables of any strides. The
    tables are read as fp32 for fp16/bf16/fp32 x (fp64 tables rounded first: diffusers' ``apply_rotary_emb``
    computes fp32 x with fp64 tables in fp64: in one measured fp32 case 1.2e-7 from the exact result, this 2.8e-7 on
    the reference path and 6e-7 on the kernel's; FLUX's tables are fp32 there).

    On a GPU (or the interpreter): one Triton launch for the prefix and x, forward and backward. Differentiable
    in x, prefix and the weights (first order: the backward kernel's gradients, the weights' summed per program,
    no atomics); tables that require a gradient take the plain-torch reference instead. A ``torch.library``
    custom op (``torch.ops.sparsectx.rms_norm_rope``, with its backward op): ``torch.compile`` traces it. Nothing
    synchronises with the host.
    """
    _check_tensor("x", x, ndim=4, dtypes=_NORM_ROPE_DTYPES)
    batch, seq, heads, dim = x.shape
    if dim % 2 or not 2 <= dim <= _NORM_ROPE_MAX_HEAD_DIM:
        raise ValueError(f"head dim (x.shape[-1]) must be even and in 2..{_NORM_ROPE_MAX_HEAD_DIM}, got {dim}")
    if x.dtype != torch.float64 and batch > MAX_GRID_SAMPLES:
        raise ValueError(f"x has {batch} samples; one call takes at most {MAX_GRID_SAMPLES} (CUDA's grid limit)")
    n_prefix = 0
    if prefix is not None:
        _check_tensor("prefix", prefix, ndim=4, device=x.device)
        if prefix.dtype != x.dtype:
            raise ValueError(f"prefix has dtype {prefix.dtype} but x has {x.dtype}")
        if prefix.shape[0] != batch or prefix.shape[2:] != x.shape[2:]:
            raise ValueError(f"prefix must be [B={batch}, S0, H={heads}, D={dim}] like x, got {tuple(prefix.shape)}")
        n_prefix = prefix.shape[1]
    elif prefix_weight is not None:
        raise ValueError("prefix_weight is given without a prefix")
    for name, w in (("weight", weight), ("prefix_weight", prefix_weight)):
        if w is not None:
            _check_tensor(name, w, ndim=1, device=x.device)
            if w.dtype not in _NORM_ROPE_DTYPES or w.shape[0] != dim:
                raise ValueError(f"{name} must be a float16, bfloat16, float32 or float64 [D={dim}] tensor, got "
                                 f"{w.dtype} {tuple(w.shape)}")
    rows = n_prefix + seq
    for name, table in (("cos", cos), ("sin", sin)):
        _check_tensor(name, table, ndim=2, device=x.device)
        if not table.is_floating_point() or tuple(table.shape) not in ((rows, dim), (rows, dim // 2)):
            raise ValueError(f"{name} must be a float [S0 + S={rows}, D={dim}] table (a row per token of "
                             f"the joint sequence), or [S0 + S, D/2={dim // 2}] (a value per pair of features), got "
                             f"{table.dtype} {tuple(table.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if not isinstance(round_before_weight, bool):
        raise TypeError(f"round_before_weight must be a bool, got {type(round_before_weight).__name__}")
    for name, w in (("weight", weight), ("prefix_weight", prefix_weight)):
        if round_before_weight and w is not None and w.dtype != x.dtype:  # (diffusers' RMSNorm rounds to its weight's
            # dtype, fp16/bf16 only: with another weight the form rounds where that module does not)
            raise ValueError(f"round_before_weight=True takes a {name} of x's dtype ({x.dtype}), got {w.dtype}")
    if eps is None:  # what torch.nn.RMSNorm's implementation takes: the epsilon of its compute dtype
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    eps = _python_number(eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a Python number or None, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf or eps > sys.float_info.max:  # (an int past fp's range: no float to pass)
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    tensors = (x, cos, sin, weight, prefix, prefix_weight)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):  # the kernels give no table gradient
        return reference.rms_norm_rope_ref(x, cos, sin, weight, eps, prefix, prefix_weight, round_before_weight)
    norm_rope = _dispatch(_rms_norm_rope, _RmsNormRopeFunction, _rms_norm_rope_op, *tensors)
    return norm_rope(x, cos, sin, weight, float(eps), prefix, prefix_weight, round_before_weight)


_ROPE_FREQ_DTYPES = (torch.float32, torch.float64)
ROPE_MAX_AXES = 4  # the tables kernel's (kernels.norm_rope.MAX_TABLE_AXES)


@torch.library.custom_op("sparsectx::rope_tables", mutates_args=())
def _rope_tables_op(ids: torch.Tensor, freqs: torch.Tensor, axes_dim: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_tables(ids, freqs, axes_dim)


def _rope_tables(ids, freqs, axes_dim):
    """The tables custom op's implementation (eager calls that record no graph call it directly)."""
    if freqs.dtype == torch.float64 and _use_triton(freqs):
        from .kernels.norm_rope import rope_tables as launch

        return launch(ids, freqs.contiguous(), tuple(axes_dim))
    return reference.rope_tables_ref(ids, freqs, axes_dim)


@_rope_tables_op.register_fake
def _(ids, freqs, axes_dim):
    shape = (ids.shape[0], freqs.shape[0])
    return ids.new_empty(shape, dtype=torch.float32), ids.new_empty(shape, dtype=torch.float32)


def rope_tables(ids: torch.Tensor, freqs: torch.Tensor, axes_dim) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's rotary tables (what ``rms_norm_rope`` and diffusers' ``apply_rotary_emb`` read): fp32 ``(cos, sin)``
    ``[S, D]`` of the positions ``ids [S, n]`` (integer or float; any strides) on the axes ``axes_dim`` (1 to 4
    sizes summing to D, at most n: the first ``axes_dim[0]`` features take the position in column 0, the next
    ``axes_dim[1]`` column 1, ...), feature f's angle ``float32(ids[s, axis]) * freqs[f]`` computed in the dtype of
    ``freqs [D]`` (fp32 or fp64), its cosine and sine rounded to fp32. Spec: ``sparsectx.reference.rope_tables_ref``.
    The kernel takes fp64 frequencies (diffusers' on every device with fp64): the cosine of an fp64 angle rounded to
    fp32 is the same from every math library; fp32 ones (diffusers' on MPS) take the reference, whose fp32 cosine
    is torch's.

    With the frequencies diffusers computes (fp64, each pair's repeated for its two features) these are the tables
    of FLUX.1's ``FluxPosEmbed`` and FLUX.2's ``Flux2PosEmbed``, which take about thirteen launches per axis; here
    one Triton launch (the reference: a few torch ops). Positions or frequencies that require a gradient take the
    (differentiable) reference instead, as diffusers' module gives them one. Nothing synchronises with the host. A
    ``torch.library`` custom op (``torch.ops.sparsectx.rope_tables``): ``torch.compile`` traces it.
    """
    _check_tensor("ids", ids, ndim=2)
    if ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"ids must hold integer or real positions, got {ids.dtype}")
    _check_tensor("freqs", freqs, ndim=1, dtypes=_ROPE_FREQ_DTYPES, device=ids.device)
    if not isinstance(axes_dim, (list, tuple)) or any(
            isinstance(d, bool) or not isinstance(_python_number(d), int) for d in axes_dim):
        raise TypeError(f"axes_dim must be a non-empty list of sizes (ints >= 0), got {axes_dim!r}")
    if not axes_dim or any(d < 0 for d in axes_dim):
        raise ValueError(f"axes_dim must be a non-empty list of sizes (ints >= 0), got {axes_dim!r}")
    axes_dim = [int(d) for d in axes_dim]
    if len(axes_dim) > ROPE_MAX_AXES or len(axes_dim) > ids.shape[1]:
        raise ValueError(f"axes_dim has {len(axes_dim)} axes: at most {ROPE_MAX_AXES}, and at most the "
                         f"{ids.shape[1]} columns of ids")
    if sum(axes_dim) != freqs.shape[0]:
        raise ValueError(f"axes_dim {axes_dim} sums to {sum(axes_dim)}, but freqs has {freqs.shape[0]} features")
    if ids.is_floating_point() and ids.dtype.itemsize == 1:
        ids = ids.float()  # fp8 positions (the kernel loads no fp8): fp32 holds them exactly, as the angle reads them
    if torch.is_grad_enabled() and (ids.requires_grad or freqs.requires_grad):  # the kernel gives no gradient
        return reference.rope_tables_ref(ids, freqs, axes_dim)
    tables = _rope_tables if _plain_eager(ids, freqs) else _rope_tables_op
    return tables(ids, freqs, axes_dim)


# ----------------------------------------------------------------------------------------------------------------
# token compaction
# ----------------------------------------------------------------------------------------------------------------
class Compacted(NamedTuple):
    """Result of ``compact_tokens``: positions of the kept tokens within their sample (int32 ``[total]``, original
    order), ``cu_seqlens`` (int32 ``[B+1]``), ``max_seqlen`` (int, or None unless asked for), and the packed
    ``tensors`` (``[total, ...]``, in the order given)."""

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: Optional[int]
    tensors: tuple


def _check_budget(budget, batch: int, n_tokens: int) -> list[int]:
    if budget is None:
        raise ValueError("budget is required when selection holds scores (pass a keep mask to select directly)")
    if torch.compiler.is_compiling() and (isinstance(budget, torch.Tensor) or _is_numpy(budget) or (
            isinstance(budget, (list, tuple)) and any(_is_numpy(b) for b in budget))):
        # (dynamo traces numpy values as tensors: an ndarray, never a number, reaches the checks below)
        raise TypeError(f"compact_tokens: a budget {'tensor' if isinstance(budget, torch.Tensor) else 'numpy value'} "
                        "can not be traced by torch.compile (its values size the outputs); pass the budget as "
                        "Python numbers (an int, a float or a list)")
    if isinstance(budget, torch.Tensor):
        if budget.ndim > 1 or (budget.ndim == 1 and budget.numel() != batch):
            raise ValueError(f"budget tensor must be a scalar or have one entry per sample ({batch}), "
                             f"got shape {tuple(budget.shape)}")
        if budget.device.type == "meta":
            raise ValueError("budget tensor is on the meta device: it has no values to read")
        values = budget.tolist() if budget.ndim else [budget.item()] * batch  # the one host read (NaN: below)
        if budget.dtype in NARROW_RATIO_DTYPES:
            values = [written_ratio(v, budget.dtype) for v in values]
    elif _is_numpy_array(budget):  # as the tensor or the list it could be: 0-d one value, 1-d one per sample
        if budget.ndim > 1 or (budget.ndim == 1 and budget.size != batch):
            raise ValueError(f"budget array must be a scalar or have one entry per sample ({batch}), "
                             f"got shape {tuple(budget.shape)}")
        values = list(budget) if budget.ndim else [budget[()]] * batch  # numpy scalars, read as below
    elif isinstance(budget, (list, tuple)):
        if len(budget) != batch:
            raise ValueError(f"budget must have one entry per sample ({batch}), got {len(budget)}")
        values = list(budget)
    elif type(budget) is int and 0 <= budget <= n_tokens:  # the common case, without the general checks below
        return [budget] * batch
    elif type(budget) is float and 0.0 <= budget <= 1.0:  # likewise, a ratio (NaN fails the range)
        return reference.budget_to_counts(budget, batch, n_tokens)
    else:
        values = [budget] * batch
    values = [budget_number(b) for b in values]
    for b in values:
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"budget entries must be int (count) or float (ratio), got {type(b).__name__}")
        if isinstance(b, float):
            if not (0.0 <= b <= 1.0):  # NaN fails this too
                raise ValueError(f"budget ratio must be in [0, 1], got {b}")
        elif not (0 <= b <= n_tokens):
            raise ValueError(f"budget count must be in [0, N={n_tokens}], got {b}")
    return reference.budget_to_counts(values, batch, n_tokens)


def _is_numpy(value) -> bool:
    """Whether ``value`` is a numpy scalar or array (told without importing numpy)."""
    return type(value).__module__ == "numpy"


def _is_numpy_array(value) -> bool:
    """Whether ``value`` is exactly a ``numpy.ndarray`` (told without importing numpy; subclasses such as
    ``numpy.matrix``, whose rows are matrices again, are not read as lists)."""
    kind = type(value)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy"


def written_ratio(value: float, dtype: torch.dtype) -> float:
    """A ratio read from a narrow float ``dtype`` as the shortest decimal that ``dtype`` stores as ``value`` (the
    decimal it was written as: float32's 0.69999998807907 is 0.7), so that its count, rounded half up, is the one
    the Python float keeps; a value no shorter decimal gives (an exact binary ratio such as 2**-12) stays as it is."""
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if torch.tensor(candidate, dtype=dtype, device="cpu").item() == value:
            return candidate
    return value


_PYTHON_NUMBERS = (int, float)


def _python_number(value):
    """A numpy (or other ``numbers.Real``) scalar as the Python int or float it holds; anything else unchanged."""
    if type(value) in _PYTHON_NUMBERS:  # (the common case, without the abstract base class's slower check)
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


_NUMPY_NARROW_FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def budget_number(value):
    """A budget entry (count or ratio) as a Python number (``_python_number``), a narrow numpy float (``np.float32``)
    read as the decimal it was written as (``written_ratio``), as a narrow float tensor's entries are: 0.7 keeps
    the same count as a Python float, a float32 tensor and a numpy float32 alike."""
    number = _python_number(value)
    if isinstance(number, float) and not isinstance(value, float):
        narrow = _NUMPY_NARROW_FLOATS.get(str(getattr(value, "dtype", "")))
        if narrow is not None:
            return written_ratio(number, narrow)
    return number


def _check_compaction_inputs(selection, tensors, traced: bool):
    _check_tensor("selection", selection, ndim=2)
    if selection.dtype != torch.bool and not selection.is_floating_point():
        raise ValueError(f"selection must be a bool keep mask or floating-point scores, got {selection.dtype}")
    batch, n_tokens = selection.shape
    _check_compact_batch("selection", batch)
    for i, t in enumerate(tensors):
        _check_tensor(f"tensors[{i}]", t, device=selection.device)
        if t.ndim < 2 or tuple(t.shape[:2]) != (batch, n_tokens):
            raise ValueError(f"tensors[{i}] must be [B={batch}, N={n_tokens}, ...], got {tuple(t.shape)}")
    # off CUDA the check is free; on CUDA it would wait for the device, and the kernel ranks NaN like torch.sort
    if (selection.is_floating_point() and selection.device.type != "cuda" and not traced
            and torch.isnan(selection).any()):
        raise ValueError("selection scores contain NaN")
    return batch, n_tokens


def _check_compact_batch(name: str, batch: int) -> None:
    if batch > MAX_COMPACT_SAMPLES:
        raise ValueError(f"{name} holds {batch} samples; the compaction takes at most {MAX_COMPACT_SAMPLES} per call "
                         "(its row kernels place each row in a block over the samples): split the batch")


def _check_grid_heads(name: str, heads) -> None:
    """``ValueError`` for more heads than the attention kernels' grid takes (a program column per head, in a grid
    dimension CUDA caps as it caps the samples')."""
    if heads > MAX_GRID_SAMPLES:
        raise ValueError(f"{name} has {heads} heads; one call takes at most {MAX_GRID_SAMPLES} (the kernels' grid has "
                         "a program column per head, and CUDA caps that grid dimension): split the heads")


def _refuse_vmap(op: str, **inputs) -> None:
    """``NotImplementedError`` for an input batched by ``torch.vmap``: the kept counts differ per sample, so the
    compaction has no batching rule (its inputs already carry the batch as their first dimension)."""
    if torch.compiler.is_compiling():  # dynamo handles torch.func transforms itself
        return
    for name, value in inputs.items():
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t):
                raise NotImplementedError(f"{op} does not run under torch.vmap ({name} is batched by it): call it on "
                                          "the whole batch, whose samples may keep different numbers of tokens")


def _check_count(name: str, value, minimum: int = 0) -> int:
    """``value`` as a Python int (a numpy integer converted), checked to be at least ``minimum``; a symbolic int
    (torch.compile / torch.export with dynamic shapes) passes unchecked (a check would specialise it)."""
    value = _python_number(value)
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, int) and _surely(value < minimum):
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# the kernel reads these score dtypes exactly as fp32; others (fp64) get their keep mask from the reference
_KERNEL_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SORTED_SCORE_DTYPES = _KERNEL_SCORE_DTYPES + (torch.float64,)  # the reference's torch.sort takes these


# Compaction as torch.library custom ops: autograd and torch.compile go through them (their fake implementations
# give every output shape without reading the device). Eager calls that record no graph take the launchers directly:
# a custom op's dispatch costs about 10 us of host time, a large share of the compaction's GPU budget.
def _compact_index(selection: torch.Tensor, counts: Optional[list], n_rows: Optional[int]):
    """``(index, cu_seqlens)`` of the kept tokens (``compact_index``'s contract): the Triton kernel, or the
    reference."""
    if _use_triton(selection):
        from .kernels import compaction as _k

        if counts is not None and selection.dtype not in _KERNEL_SCORE_DTYPES:  # (fp64: the kernel reads fp32)
            # the reference's keep mask, whose kept total is known here: no host read to size the index
            selection, n_rows, counts = reference.topk_keep_mask(selection, counts), (
                sum(counts) if n_rows is None else n_rows), None
        return _k.compact_index(selection, counts, n_rows)
    keep = selection if counts is None else reference.topk_keep_mask(selection, counts)
    index, cu_seqlens, _ = reference.compact_ref(keep)
    if n_rows is not None:  # the kernel's contract: n_rows rows, zero past the kept total, rows past n_rows dropped
        index = torch.cat([index[:n_rows], index.new_zeros(max(n_rows - index.numel(), 0))])
    return index, cu_seqlens


def _gather_rows(payloads: list, index: torch.Tensor, cu_seqlens: torch.Tensor, zero_padding: bool = True) -> list:
    """The packed rows of each payload (``gather_rows``'s contract, ``index.numel()`` rows; without
    ``zero_padding`` the rows past the kept total are unspecified)."""
    if payloads and all(_use_triton(p) for p in payloads):
        from .kernels import compaction as _k

        return _k.gather_rows(payloads, *_contiguous(index, cu_seqlens), index.numel(), zero_padding)
    return [reference.gather_rows_ref(p, index, cu_seqlens) for p in payloads]


def _scatter_rows(packed: Optional[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor,
                  base: Optional[torch.Tensor], n_tokens: int, fill_value) -> torch.Tensor:
    """A new ``[B, N, ...]`` tensor: ``base`` (or ``fill_value``) with the valid packed rows (zeros when ``packed``
    is None) written at their positions."""
    if base is not None:
        out = base.clone(memory_format=torch.contiguous_format)
    else:
        out = packed.new_full((cu_seqlens.numel() - 1, n_tokens, *packed.shape[1:]), fill_value)
    if _use_triton(out):
        from .kernels import compaction as _k

        return _k.scatter_rows(packed, *_contiguous(index, cu_seqlens), out)
    return reference.scatter_rows_ref(packed, index, cu_seqlens, out)


# The row ops below are registered for torch.compile and for other stacks to call. compact_tokens and scatter_tokens
# check their inputs before calling them; called directly, each checks what it can without reading the device: the
# shapes, dtypes and devices of its arguments. The values of index and cu_seqlens are data: they must be what
# compact_index returned for these tensors (an index outside [0, N) reads zeros and writes nothing). Sizes that are
# symbolic (torch.compile, torch.export) are not compared: a comparison would add a guard on a dynamic dimension.
def _differ(a, b) -> bool:
    """Whether two sizes are concrete ints that differ."""
    return type(a) is int and type(b) is int and a != b


def _shapes_differ(a, b) -> bool:
    return len(a) != len(b) or any(_differ(x, y) for x, y in zip(a, b))


def _check_compact_index_op(selection, counts, n_rows) -> None:
    _check_tensor("compact_index: selection", selection, ndim=2, in_op=True)
    batch, n_tokens = selection.shape
    if selection.dtype == torch.bool and counts is not None:
        raise ValueError("compact_index: counts must be None when selection is a keep mask (its row sums are the "
                         "counts)")
    if selection.dtype != torch.bool and counts is None:
        raise ValueError("compact_index: counts (one per sample) is required when selection holds scores")
    if counts is not None and (_differ(len(counts), batch) or any(
            type(c) is int and type(n_tokens) is int and not 0 <= c <= n_tokens for c in counts)):
        raise ValueError(f"compact_index: counts must give one count in [0, N={n_tokens}] per sample ({batch}), "
                         f"got {list(counts)}")
    if type(n_rows) is int and n_rows < 0:
        raise ValueError(f"compact_index: n_rows must be >= 0, got {n_rows}")


def _check_row_op_index(op: str, index, cu_seqlens, batch, device) -> None:
    """``index`` int32 ``[rows]`` and ``cu_seqlens`` int32 ``[B + 1]`` on ``device`` (B: the ``[B, N, ...]``
    tensor's, when the op has one)."""
    _check_tensor(f"{op}: index", index, ndim=1, dtypes=(torch.int32,), device=device, in_op=True)
    _check_tensor(f"{op}: cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device, in_op=True)
    entries = cu_seqlens.numel()
    if (type(entries) is int and entries < 1) or (batch is not None and _differ(entries, batch + 1)):
        raise ValueError(f"{op}: cu_seqlens has {entries} entries but must have B+1"
                         + (f" = {batch + 1} (B = {batch} samples)" if batch is not None else " >= 1"))


def _check_gather_rows_op(payloads, index, cu_seqlens) -> None:
    if not isinstance(payloads, (list, tuple)) or not payloads:
        raise ValueError("gather_rows: payloads must be a non-empty list of [B, N, ...] tensors")
    for i, p in enumerate(payloads):
        _check_tensor(f"gather_rows: payloads[{i}]", p, device=payloads[0].device, in_op=True)
        if p.ndim < 2 or _shapes_differ(p.shape[:2], payloads[0].shape[:2]):
            raise ValueError(f"gather_rows: payloads[{i}] must be [B, N, ...] with payloads[0]'s B, N "
                             f"{tuple(payloads[0].shape[:2])}, got shape {tuple(p.shape)}")
    _check_row_op_index("gather_rows", index, cu_seqlens, payloads[0].shape[0], payloads[0].device)


def _check_scatter_rows_op(packed, index, cu_seqlens, base, n_tokens) -> None:
    if packed is None and base is None:
        raise ValueError("scatter_rows: packed and base can not both be None")
    if type(n_tokens) is int and n_tokens < 0:
        raise ValueError(f"scatter_rows: n_tokens must be >= 0, got {n_tokens}")
    first = base if base is not None else packed
    for name, t in (("packed", packed), ("base", base)):
        if t is not None:
            _check_tensor(f"scatter_rows: {name}", t, device=first.device, in_op=True)
    if packed is not None and base is not None and packed.dtype != base.dtype:
        raise ValueError(f"scatter_rows: packed ({packed.dtype}) and base ({base.dtype}) must share a dtype")
    if base is not None and (base.ndim < 2 or _differ(base.shape[1], n_tokens)):
        raise ValueError(f"scatter_rows: base must be [B, N={n_tokens}, ...], got shape {tuple(base.shape)}")
    if packed is not None and (packed.ndim < 1 or _differ(packed.shape[0], index.numel())
                               or (base is not None and _shapes_differ(packed.shape[1:], base.shape[2:]))):
        raise ValueError(f"scatter_rows: packed must be [rows={index.numel()}, ...] with base's trailing shape, "
                         f"got shape {tuple(packed.shape)}")
    _check_row_op_index("scatter_rows", index, cu_seqlens, None if base is None else base.shape[0], first.device)


@torch.library.custom_op("sparsectx::compact_index", mutates_args=())
def _compact_index_op(selection: torch.Tensor, counts: Optional[list[int]],
                      n_rows: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    _check_compact_index_op(selection, counts, n_rows)
    return _compact_index(selection, counts, n_rows)


@_compact_index_op.register_fake
def _(selection, counts, n_rows):
    _check_compact_index_op(selection, counts, n_rows)
    if n_rows is None:  # a mask without a row bound: the kept total is data
        n_rows = sum(counts) if counts is not None else torch.library.get_ctx().new_dynamic_size()
    return (selection.new_empty(n_rows, dtype=torch.int32),
            selection.new_empty(selection.shape[0] + 1, dtype=torch.int32))


@torch.library.custom_op("sparsectx::gather_rows", mutates_args=())
def _gather_rows_op(payloads: list[torch.Tensor], index: torch.Tensor,
                    cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    _check_gather_rows_op(payloads, index, cu_seqlens)
    return _gather_rows(payloads, index, cu_seqlens)


@_gather_rows_op.register_fake
def _(payloads, index, cu_seqlens):
    _check_gather_rows_op(payloads, index, cu_seqlens)
    return [p.new_empty((index.shape[0], *p.shape[2:])) for p in payloads]


@torch.library.custom_op("sparsectx::scatter_rows", mutates_args=())
def _scatter_rows_op(packed: Optional[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor,
                     base: Optional[torch.Tensor], n_tokens: int,
                     fill_value: Union[int, float, bool]) -> torch.Tensor:  # a Scalar: an int64 fill stays exact
    _check_scatter_rows_op(packed, index, cu_seqlens, base, n_tokens)
    return _scatter_rows(packed, index, cu_seqlens, base, n_tokens, fill_value)


@_scatter_rows_op.register_fake
def _(packed, index, cu_seqlens, base, n_tokens, fill_value):
    _check_scatter_rows_op(packed, index, cu_seqlens, base, n_tokens)
    if base is not None:
        return torch.empty_like(base, memory_format=torch.contiguous_format)
    return packed.new_empty((cu_seqlens.shape[0] - 1, n_tokens, *packed.shape[1:]))


def _gather_setup_context(ctx, inputs, output):
    payloads, index, cu_seqlens = inputs
    ctx.save_for_backward(index, cu_seqlens)
    ctx.payloads = [(p.shape[1], p.is_floating_point() or p.is_complex()) for p in payloads]  # (N, differentiable)


def _gather_backward(ctx, grads):
    """Each packed gradient scattered back to ``[B, N, ...]``, zero at tokens that were not kept."""
    index, cu_seqlens = ctx.saved_tensors
    payload_grads = [None if grad is None or not differentiable else
                     _scatter_rows_op(grad, index, cu_seqlens, None, n_tokens, 0.0)
                     for grad, (n_tokens, differentiable) in zip(grads, ctx.payloads)]
    return payload_grads, None, None


def _scatter_setup_context(ctx, inputs, output):
    packed, index, cu_seqlens, base, n_tokens, fill_value = inputs
    ctx.save_for_backward(index, cu_seqlens)


def _scatter_backward(ctx, grad):
    """The packed rows' gradient gathered from the upstream gradient; ``base``'s is the upstream gradient with the
    written positions zeroed."""
    index, cu_seqlens = ctx.saved_tensors
    d_packed = d_base = None
    if ctx.needs_input_grad[0]:
        d_packed = _gather_rows_op([grad], index, cu_seqlens)[0]
    if ctx.needs_input_grad[3]:
        d_base = _scatter_rows_op(None, index, cu_seqlens, grad, grad.shape[1], 0.0)
    return d_packed, None, None, d_base, None, None


torch.library.register_autograd("sparsectx::gather_rows", _gather_backward, setup_context=_gather_setup_context)
torch.library.register_autograd("sparsectx::scatter_rows", _scatter_backward, setup_context=_scatter_setup_context)


def _traced(*tensors) -> bool:
    """Whether this call is traced: by torch.compile / torch.export, or with tensors that hold no data (the meta
    device, FakeTensors): no host read of values then, and the custom ops' fake implementations give the shapes."""
    return torch.compiler.is_compiling() or any(t is not None and _holds_no_data(t) for t in tensors)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _unwrapped(t: torch.Tensor) -> bool:
    """A tensor of a plain type that neither functionalization nor a torch.func transform (vmap, grad) wraps."""
    return (type(t) in _PLAIN_TENSOR_TYPES and not torch._is_functional_tensor(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _holds_no_data(t: torch.Tensor) -> bool:
    """A meta tensor or a FakeTensor (also wrapped by functionalization or functorch). Plain tensors are answered
    without ``is_fake`` (2.5 us of host time per tensor, several tensors per op call)."""
    if not isinstance(t, torch.Tensor):  # (a wrong type is reported by the argument checks)
        return False
    if t.is_meta:
        return True
    if _unwrapped(t):
        return False
    return _fake_tensor.is_fake(t)


def _eager_under_compile(fn):
    """``torch.compiler.disable(fn)`` (host work that torch.compile must not trace) without importing
    ``torch._dynamo`` when sparsectx is imported (about 2 s on this project's CPU machines, half of the import):
    while nothing has imported it, nothing can be compiling and ``fn`` runs as is; after, the disabled function,
    made at its first call, runs."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
            _skip_under_dynamo(call)
        return disabled[0](*args, **kwargs)

    return call


def _skip_under_dynamo(function) -> None:
    """Tells dynamo never to compile ``function``'s own frame (the frames it calls still may): a frame of host work
    that calls a disabled function was otherwise compiled around it, guarded on its arguments, and recompiled at
    each new value until dynamo's recompile limit, with a warning. Without the (private) hook, nothing changes."""
    skip_code = getattr(sys.modules.get("torch._dynamo.eval_frame"), "skip_code", None)
    if skip_code is not None:
        skip_code(function.__code__)


def _eager(*tensors) -> bool:
    """Plain tensors (or None) in eager mode, with nothing but autograd that must see an op: no torch.compile,
    meta or fake tensors, functionalization, torch.func transforms such as vmap (whose fallback loops over the custom
    op), ``torch.jit.trace``, dispatch or torch-function mode (``diagnostics.count_host_reads`` included: it then sees
    each op as one call on its inputs, and so tracks its outputs as device data, which a Triton launch it does not
    see would leave as host data)."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(t is None or (_unwrapped(t) and not t.is_meta) for t in tensors)


def _autograd_records(tensors) -> bool:
    """Whether autograd records a call on these tensors (or None): grad mode on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_eager(*tensors) -> bool:
    """Whether an op may call its custom op's implementation directly: ``_eager`` and nothing for autograd to
    record. The custom op's dispatch costs tens of microseconds of host time per call."""
    return _eager(*tensors) and not _autograd_records(tensors)


def _dispatch(implementation, function, custom_op, *tensors):
    """What an op with autograd calls for these inputs: its implementation (``_plain_eager``), its
    ``torch.autograd.Function`` twin (``_eager`` with inputs autograd records), else its custom op."""
    if not _eager(*tensors):
        return custom_op
    return function.apply if _autograd_records(tensors) else implementation


def _records_graph(tensors) -> bool:
    """Whether autograd or a tracer must see this call (then it goes through the custom ops)."""
    return _traced(*tensors) or _autograd_records(tensors)


def compact_tokens(selection: torch.Tensor, *tensors: torch.Tensor, budget=None, max_total: Optional[int] = None,
                   return_max_seqlen: bool = False) -> Compacted:
    """Select tokens per sample and pack the selected rows of ``tensors`` (each ``[B, N, ...]``), no padding.

    ``selection`` is a keep mask bool ``[B, N]``, or scores float ``[B, N]`` with ``budget``: an int count in [0, N], a
    float ratio in [0, 1] (count = round-half-up(ratio * N)), or one of either per sample (list, tensor or numpy array
    ``[B]``). The top-budget tokens by score are kept, ties to the lower index, and returned in original token
    order.

    Host synchronisation: the scores+budget path never waits for the device (the counts are known on the host;
    a budget given as a CUDA tensor is read once). The mask path reads the kept total once to size the outputs,
    unless ``max_total`` is given: then outputs have ``max_total`` rows, of which ``cu_seqlens[-1]`` are valid (the
    rest are zero). ``return_max_seqlen=True`` costs one host read on the mask path (none with scores).
    NaN scores raise ``ValueError`` off CUDA; on CUDA the check would synchronise, so it is skipped and NaN ranks
    above +inf (torch.sort's order). Likewise a ``max_total`` below the kept total of a CUDA mask is not detected
    (rows past ``max_total`` are dropped). While ``torch.compile`` traces, both checks are skipped on every device
    (they read data). Gradients flow from the packed tensors to the inputs.
    """
    _refuse_vmap("compact_tokens", selection=selection, tensors=tensors, budget=budget)
    _check_flag("return_max_seqlen", return_max_seqlen)
    traced = _traced(selection)  # (False for a non-tensor, which the checks report)
    batch, n_tokens = _check_compaction_inputs(selection, tensors, traced)
    if max_total is not None:
        max_total = _check_count("max_total", max_total)
    if selection.dtype == torch.bool:
        if budget is not None:
            raise ValueError("budget must be None when selection is a keep mask")
        if selection.is_meta and (max_total is None or return_max_seqlen):  # (FakeTensors: symbols stand in)
            raise ValueError("a keep mask on the meta device holds no values: its kept total and lengths are "
                             "unknown, so give max_total (the packed rows' shape) and return_max_seqlen=False")
        counts = None
    else:
        counts = _check_budget(budget, batch, n_tokens)
        if max_total is not None and max_total < sum(counts):
            raise ValueError(f"max_total={max_total} is smaller than the {sum(counts)} kept tokens")
    if counts is None and max_total is not None and selection.device.type != "cuda" and not traced:
        kept = int(selection.sum())  # free off CUDA
        if max_total < kept:
            raise ValueError(f"max_total={max_total} is smaller than the {kept} kept tokens")
    if selection.dtype not in _SORTED_SCORE_DTYPES and selection.is_floating_point():
        selection = selection.float()  # fp8 scores (torch sorts no narrower float): fp32 holds them exactly
    compact = _compact_index_op if traced else _compact_index
    index, cu_seqlens = compact(selection, counts, max_total)
    gather = _gather_rows_op if _records_graph(tensors) and tensors else _gather_rows
    packed = gather(list(tensors), index, cu_seqlens)
    max_seqlen = None
    if return_max_seqlen:
        # (not max(counts, default=0): dynamo refuses the keyword when the counts are symbolic ints)
        max_seqlen = (max(counts) if counts else 0) if counts is not None else _max_len(cu_seqlens)
    return Compacted(index, cu_seqlens, max_seqlen, tuple(packed))


def _check_scatter_index(index: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """``ValueError`` unless the rows ``cu_seqlens`` counts have positions in ``[0, n_tokens)``, none twice in a
    sample (read on the host: call it off the GPU only)."""
    total = cu_seqlens.tolist()[-1]  # (two reads in all: this and the summary below)
    if total == 0:
        return
    rows = index[:total].long()
    sample = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=rows.device),
                                     torch.diff(cu_seqlens.long()), output_size=total)
    keys = torch.sort(sample * n_tokens + rows).values  # (one sample's positions, in a range of their own)
    low, high, repeated = torch.stack([rows.min(), rows.max(), (keys[1:] == keys[:-1]).any().long()]).tolist()
    if low < 0 or high >= n_tokens:
        raise ValueError(f"index must lie in [0, n_tokens={n_tokens}) for the rows cu_seqlens counts, got values in "
                         f"[{low}, {high}]")
    if repeated:
        raise ValueError("index repeats a position within a sample: each kept token is scattered back once")


def scatter_tokens(packed: torch.Tensor, index: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int,
                   fill: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """Inverse of ``compact_tokens``: packed rows ``[total, ...]`` back to ``[B, N, ...]``. Positions that were not
    kept get ``fill``: a scalar, or a ``[B, N, ...]`` tensor whose values are kept there. Differentiable.

    ``packed`` and ``index`` have the same number of rows; rows past ``cu_seqlens[-1]`` (``max_total`` padding)
    are ignored. ``cu_seqlens`` (as ``compact_tokens`` returns it: starts at 0, non-decreasing, at most the packed
    rows) and the index of the rows it counts (each in ``[0, n_tokens)``, none twice in a sample) are checked off
    the GPU, where reading them costs no device wait (``ValueError``), except while traced (``torch.compile``,
    ``torch.export``: they hold no data then); on a GPU they are trusted, as the Triton path never waits for the
    device; unchecked, a row whose index lies outside ``[0, n_tokens)`` is then ignored (nothing written,
    gradient zero), and of two rows with one index either may be written. A scalar ``fill`` (complex for complex
    ``packed``) must be representable in ``packed``'s dtype.
    """
    _refuse_vmap("scatter_tokens", packed=packed, index=index, cu_seqlens=cu_seqlens, fill=fill)
    _check_tensor("packed", packed)
    if packed.ndim < 1:
        raise ValueError("packed must have a row dimension, got a 0-d tensor")
    _check_tensor("index", index, ndim=1, dtypes=(torch.int32,), device=packed.device)
    _check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=packed.device)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B+1 >= 1 entries")
    _check_compact_batch("cu_seqlens", cu_seqlens.numel() - 1)
    if index.numel() != packed.shape[0]:
        raise ValueError(f"index has {index.numel()} rows but packed has {packed.shape[0]}")
    checked_here = cu_seqlens.device.type != "cuda" and not _traced(cu_seqlens) and not _traced(index)
    if checked_here:
        _check_cu_seqlens("cu_seqlens", cu_seqlens, None, None, packed.device, at_most=packed.shape[0])
    n_tokens = _check_count("n_tokens", n_tokens)
    if checked_here:
        _check_scatter_index(index, cu_seqlens, n_tokens)
    base = None
    if isinstance(fill, torch.Tensor):
        _check_tensor("fill", fill, device=packed.device)
        expected = (cu_seqlens.numel() - 1, n_tokens, *packed.shape[1:])
        if tuple(fill.shape) != expected or fill.dtype != packed.dtype:
            raise ValueError(f"fill tensor must be {list(expected)} of dtype {packed.dtype}, "
                             f"got {list(fill.shape)} {fill.dtype}")
        base = fill
    else:
        fill = _python_number(fill)
        if not isinstance(fill, (int, float, complex)):
            raise TypeError(f"fill must be a number or a tensor, got {type(fill).__name__}")
        if isinstance(fill, complex) and not packed.is_complex():
            raise ValueError(f"fill={fill!r} can not be stored in packed's dtype {packed.dtype}: a complex fill needs "
                             "a complex packed tensor")
        try:
            torch.empty(2, dtype=packed.dtype).fill_(fill)  # on the host, the output fill's conversion and checks
        except (RuntimeError, OverflowError) as e:
            raise ValueError(f"fill={fill!r} can not be stored in packed's dtype {packed.dtype}: {e}") from None
        if not (packed.is_floating_point() or packed.is_complex()):  # (floats round, as usual; integers must fit)
            low, high = (0, 1) if packed.dtype == torch.bool else (torch.iinfo(packed.dtype).min,
                                                                  torch.iinfo(packed.dtype).max)
            if not (float(fill).is_integer() and low <= fill <= high):
                raise ValueError(f"fill={fill!r} can not be stored in packed's dtype {packed.dtype} (integers in "
                                 f"[{low}, {high}])")
    fill_value = 0.0 if base is not None else fill
    if _records_graph((packed, base)):
        if base is None and fill_value and (isinstance(fill_value, complex)
                                            or not (packed.is_floating_point() or packed.is_complex())):
            # inductor passes a Scalar argument as a double: an integer fill beyond 2**53 would change, and the
            # op's Scalar takes no complex value: the fill then comes as a base tensor
            base, fill_value = packed.new_full((cu_seqlens.numel() - 1, n_tokens, *packed.shape[1:]), fill), 0.0
        return _scatter_rows_op(packed, index, cu_seqlens, base, n_tokens, fill_value)
    return _scatter_rows(packed, index, cu_seqlens, base, n_tokens, fill_value)


# ----------------------------------------------------------------------------------------------------------------
# ranked keep masks (the selection budgets' last step; serves sparsectx.selection, not in __all__)
# ----------------------------------------------------------------------------------------------------------------
def ranked_keep_mask(scores: torch.Tensor, ref_lengths: Sequence[int], counts: Optional[torch.Tensor] = None, *,
                     coverage: Union[float, torch.Tensor, None] = None, low: Optional[torch.Tensor] = None,
                     high: Optional[torch.Tensor] = None,
                     tolerance: float = reference.COVERAGE_TOLERANCE, mass: str = "linear") -> tuple:
    """``(keep bool [B, N], counts int64 [B, n_refs])``: in each reference image of each sample (the images lie one
    after another in the N tokens: ``ref_lengths``), its ``count`` highest ``scores`` kept, ties to the lower index;
    ``count`` is ``counts[b, i]`` or, without ``counts``, adaptive: the fewest top-ranked tokens whose score mass
    (``reference.score_mass``: ``mass`` "linear", "softmax" or "auto") reaches ``coverage - tolerance`` of the
    image's, within ``[low, high]`` (``reference.ranked_keep_mask_ref`` is the specification;
    ``sparsectx.selection``'s fixed and adaptive budgets). +inf and NaN scores have no mass: an adaptive count
    of them is unspecified (the budgets refuse them).

    ``scores`` float ``[B, N]``; ``counts`` / ``low`` / ``high`` integer tensors ``[B, n_refs]`` on its device;
    ``coverage`` a float in [0, 1] or a float64 ``[B, n_refs]`` tensor on its device (its values unchecked here).
    On a GPU: one stable sort of the images' rows and one kernel, whatever the number of images; nothing is read
    back to the host. A ``torch.library`` custom op (``torch.ops.sparsectx.ranked_keep_mask``) where a tracer or a
    dispatch mode must see the call (``diagnostics.count_host_reads``: its outputs are then device data). The
    masses are summed in another order than the reference's: a count may differ where an image's mass ranked above
    a token lies within rounding of the threshold. The default ``tolerance`` (``reference.COVERAGE_TOLERANCE``,
    1e-9, the selection budgets') keeps such ties away from real inputs: with 0, ten equal scores at coverage 0.8
    kept 8 tokens on the kernel and 9 on the reference (whose running sum of ten shares of 0.1 reaches 0.7999...)."""
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.dtype not in _SORTED_SCORE_DTYPES:
        raise ValueError(f"scores must be a [B, N] tensor of float16, bfloat16, float32 or float64, got "
                         f"{_described_tensor(scores)}")
    batch, n_tokens = scores.shape
    if not isinstance(ref_lengths, (list, tuple)) or not ref_lengths or not all(
            _is_int(n) and n >= 0 for n in ref_lengths) or sum(ref_lengths) != n_tokens:
        raise ValueError(f"ref_lengths must be ints >= 0 summing to N={n_tokens}, got {ref_lengths!r}")
    per_image = (batch, len(ref_lengths))
    if (counts is None) == (coverage is None):
        raise ValueError("ranked_keep_mask takes either counts or coverage (with low and high)")
    for name, t in (("counts", counts), ("low", low), ("high", high)):
        if (t is not None or (name != "counts" and coverage is not None)) and not (
                isinstance(t, torch.Tensor) and not t.dtype.is_floating_point and t.dtype != torch.bool
                and tuple(t.shape) == per_image and t.device == scores.device):
            raise ValueError(f"{name} must be an integer tensor {list(per_image)} on {scores.device}, got "
                             f"{_described_tensor(t)}")
    if isinstance(coverage, torch.Tensor):
        if coverage.dtype != torch.float64 or tuple(coverage.shape) != per_image or coverage.device != scores.device:
            raise ValueError(f"coverage must be a float or a float64 tensor {list(per_image)} on {scores.device}, got "
                             f"{_described_tensor(coverage)}")
    elif coverage is not None and not (isinstance(coverage, float) and 0.0 <= coverage <= 1.0):
        raise ValueError(f"coverage must be a float in [0, 1] or a tensor, got {coverage!r}")
    if not isinstance(tolerance, float) or not tolerance >= 0.0:
        raise ValueError(f"tolerance must be a float >= 0, got {tolerance!r}")
    if mass not in reference.MASS_MODES:
        raise ValueError(f"mass must be one of {reference.MASS_MODES}, got {mass!r}")
    per_image = coverage if isinstance(coverage, torch.Tensor) else None
    if not _eager(scores, counts, low, high, per_image):  # (a tracer, or a dispatch mode: it sees one call)
        return _ranked_keep_mask_op(scores, [int(n) for n in ref_lengths], counts,
                                    None if per_image is not None else coverage, per_image, low, high, tolerance, mass)
    return _ranked_keep_mask(scores, ref_lengths, counts, coverage, low, high, tolerance, mass)


def _ranked_keep_mask(scores, ref_lengths, counts, coverage, low, high, tolerance: float, mass: str) -> tuple:
    """``ranked_keep_mask``'s contract, of checked arguments: the Triton kernel after one sort, or the reference."""
    if not _use_triton(scores):
        return reference.ranked_keep_mask_ref(scores, ref_lengths, counts, coverage, low, high, tolerance, mass)
    from .kernels import compaction as _k

    values, order = torch.sort(_image_score_rows(scores, tuple(ref_lengths)), dim=1, descending=True, stable=True)
    flat = [None if t is None else (t if t.dtype == torch.int64 else t.long()).contiguous()
            for t in (counts, low, high)]  # (int64 rows of B · n_refs entries)
    coverage = coverage.contiguous() if isinstance(coverage, torch.Tensor) else coverage
    return _k.ranked_keep_mask(values, order, ref_lengths, n_tokens=scores.shape[1], counts=flat[0],
                               coverage=coverage, low=flat[1], high=flat[2], tolerance=tolerance, mass=mass)


@torch.library.custom_op("sparsectx::ranked_keep_mask", mutates_args=())
def _ranked_keep_mask_op(scores: torch.Tensor, ref_lengths: list[int], counts: Optional[torch.Tensor],
                         coverage: Optional[float], coverage_per_image: Optional[torch.Tensor],
                         low: Optional[torch.Tensor], high: Optional[torch.Tensor], tolerance: float,
                         mass: str) -> tuple[torch.Tensor, torch.Tensor]:
    keep, kept = _ranked_keep_mask(scores, ref_lengths, counts,
                                   coverage_per_image if coverage_per_image is not None else coverage, low, high,
                                   tolerance, mass)
    return keep, kept.clone() if counts is not None else kept  # (a custom op returns no view of its inputs)


@_ranked_keep_mask_op.register_fake
def _(scores, ref_lengths, counts, coverage, coverage_per_image, low, high, tolerance, mass):
    return (scores.new_empty(scores.shape, dtype=torch.bool),
            scores.new_empty((scores.shape[0], len(ref_lengths)), dtype=torch.int64))


def _image_score_rows(scores: torch.Tensor, ref_lengths: tuple) -> torch.Tensor:
    """``scores [B, N]`` as ``[B · n_refs, longest]``: each image's scores in a row, -inf past its end (a view when
    the images have one length, else one gather: a -inf column appended, read past each image's end)."""
    n_refs, longest = len(ref_lengths), max(ref_lengths)
    if min(ref_lengths) == longest:
        return scores.reshape(scores.shape[0] * n_refs, longest)
    padded = torch.cat([scores, scores.new_full((scores.shape[0], 1), -math.inf)], dim=1)
    return padded.index_select(1, _padded_rows_index(ref_lengths, scores.device)).view(-1, longest)


@functools.lru_cache(maxsize=64)
def _padded_rows_index(ref_lengths: tuple, device: torch.device) -> torch.Tensor:
    """``_image_score_rows``' gather index, long ``[n_refs · longest]`` (shared: never modified)."""
    with torch.inference_mode(False):  # (a plain tensor even when first made under inference mode)
        slot = torch.arange(max(ref_lengths), device="cpu")
        lengths = torch.tensor(ref_lengths, device="cpu")[:, None]
        index = torch.where(slot < lengths, torch.cumsum(lengths, 0) - lengths + slot, sum(ref_lengths))
        return index.flatten().to(device)


def _described_tensor(t) -> str:
    return f"{t.dtype} of shape {list(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
