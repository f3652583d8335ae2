"""Host-side launch helpers in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton releases: each
call from the host costs microseconds of argument unwrapping, which adds up to a noticeable share of a small op's
launch work (token compaction runs several launches of a few microseconds each). These are the same functions for
Python ints.

``on_device_of``: Triton launches a kernel on the *current* CUDA device (and that device's current stream), not on
the device of the tensors it is given. A model split over GPUs (diffusers/accelerate ``device_map``) calls ops
with tensors on ``cuda:1`` while ``cuda:0`` is current: without a guard the kernel would run on the wrong GPU with
pointers it can not address (an error, or silently wrong results). Every launcher enters its tensors' device.

``to_device``: ``torch.tensor(values, device="cuda")`` waits for the stream (a pageable host-to-device copy); small
tensors of host values (per-sample counts, budgets) are copied from pinned memory with a queued copy instead.

On the CPU (Triton's interpreter, which keeps global state while it runs a kernel: two threads launching at once
failed inside it) launches run one at a time, whichever thread makes them.

``built_for_interpreter``: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so a kernel module keeps the
mode it was imported in, whatever the variable says later; dispatch asks the kernels, not the environment.
"""
import functools
import inspect
import os
import sys
import threading
from typing import Optional

import torch


# Compile options every launch passes explicitly. FMA contraction (a multiply and an add fused, one rounding): the
# setting every GPU figure here was measured with, Triton's default up to 3.9; Triton 3.9 warns at a kernel's first
# compile when it is left to the default, which Triton 3.10 turns off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

_INTERPRETER_LOCK = threading.RLock()  # one interpreted launch at a time (see on_device_of)


def _new_interpreter_lock() -> None:
    """A forked child's own lock: one that another thread of the parent held at the fork is never released there."""
    global _INTERPRETER_LOCK
    _INTERPRETER_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_interpreter_lock)


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, for n >= 1."""
    return 1 << max(n - 1, 0).bit_length()


def to_device(values, dtype: Optional[torch.dtype], device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` (or a host tensor ``values`` in ``dtype``, None: its own) on ``device``
    without waiting for it: on CUDA the copy is queued from pinned host memory (``non_blocking``). Ragged lists
    raise ``ValueError`` as ``torch.tensor`` does."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"to_device copies host values, got a tensor on {values.device}")
        host = values.to(dtype) if dtype is not None else values
        if device.type != "cuda":
            return host.to(device)
        return host.pin_memory().to(device, non_blocking=True)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, device="cpu", pin_memory=True).to(device, non_blocking=True)


def on_device_of(arg: str):
    """Decorator for a launcher: its kernels launch on the CUDA device of its tensor argument ``arg`` (made the
    current device for the call when it is not already); with CPU tensors (the interpreter) one launcher runs at a
    time across threads."""

    def decorate(launcher):
        position = list(inspect.signature(launcher).parameters).index(arg)

        @functools.wraps(launcher)
        def launch(*args, **kwargs):
            device = (args[position] if position < len(args) else kwargs[arg]).device
            if device.type != "cuda":
                with _INTERPRETER_LOCK:
                    return launcher(*args, **kwargs)
            if device.index == torch.cuda.current_device():
                return launcher(*args, **kwargs)
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)

        launch.launch_device_arg = arg
        return launch

    return decorate


# how Triton reads a boolean environment variable (triton.knobs' getenv_bool): these values, in any case, are true;
# any other value, or none, is false
_TRUE_WORDS = ("1", "true", "yes", "on", "y")
_FALSE_WORDS = ("0", "false", "no", "off", "n")


def interpreter_requested() -> bool:
    """Whether the environment asks for Triton's CPU interpreter now (``TRITON_INTERPRET`` read as Triton reads it:
    ``1``, ``true``, ``yes``, ``on`` or ``y``, in any case; by Triton's own reader once Triton is imported, as
    releases differ on surrounding spaces)."""
    triton = sys.modules.get("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_WORDS


def autotune_all_configs() -> bool:
    """Whether the attention kernels' autotuner measures all its candidates (``SPARSECTX_AUTOTUNE`` unset, empty or
    true, the default) or nothing is timed (``SPARSECTX_AUTOTUNE=0``, or another false word: each launch takes the
    first candidate the GPU can run, kernels/attention.py's ``_FirstThatLaunches``). Any other value is refused: a
    misspelt setting would otherwise tune (or not) silently."""
    value = os.environ.get("SPARSECTX_AUTOTUNE") or "1"  # (set empty: as unset)
    if value.lower() in _TRUE_WORDS:
        return True
    if value.lower() in _FALSE_WORDS:
        return False
    raise ValueError(f"SPARSECTX_AUTOTUNE={value!r}: expected 1 (tune over every candidate, the default) or 0 "
                     "(no timing: the first candidate the GPU can run)")


def hash_in_definition_order(namespace: dict) -> None:
    """Computes the cache key of every jitted function defined in a kernel module (its ``globals()``), in the order
    they are defined: each helper before the kernels and helpers that call it. Triton 3.4 and 3.6 (the GPU image's)
    compute a function's key at its first compile and add to it the constexpr globals its callees read only for the
    callees whose keys were computed before (3.9 computes the callee's key first). So a kernel whose helper another
    kernel had compiled first got another key than in a process that compiled it first: its binary on disk, built by
    another process (another benchmark step, ``sparsectx compile-check``), was compiled again (the selection kernel
    and the block counts, which share the score keys). Keys computed callees first are the complete ones, the same in
    every process whatever its launches (checked over all three kernel modules against keys recomputed to a fixed
    point in random orders)."""
    from triton.runtime.jit import JITFunction

    functions = [f for f in namespace.values() if isinstance(f, JITFunction) and f.__module__ == namespace["__name__"]]
    for function in sorted(functions, key=lambda f: f.starting_line_number):
        function.cache_key  # noqa: B018 (computed and kept by Triton)


def built_for_interpreter(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function, autotuned or not) runs through Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn  # an Autotuner (or heuristics) wraps the jitted function
    return isinstance(kernel, InterpretedFunction)
