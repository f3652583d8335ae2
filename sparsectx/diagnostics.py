"""Host reads: the operations whose result the host must wait for (on a GPU, each one synchronises the stream and
lets the GPU idle while Python catches up).

``count_host_reads()`` watches the aten operations of a block (a ``TorchDispatchMode``) on any device, CPU
included, and records every one that reads device data on the host:

- a scalar read: ``.item()``, ``bool(t)``, ``int(t)``, ``torch.equal`` (``aten._local_scalar_dense``,
  ``aten.is_nonzero``, ``aten.equal``), and ``Tensor.tolist()`` (not an aten operation: it is watched by wrapping
  the method while the block runs);
- an output whose size depends on the data: ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing
  (``aten.index`` / ``index_put`` with a bool index), ``repeat_interleave`` without ``output_size``;
- a copy between a device and the host (``.cpu()``, ``.to("cuda")`` of a host tensor), except a ``non_blocking``
  copy from pinned host memory to the device (it is queued like a kernel and waits for nothing).

Not seen: a tensor built from host data directly on the device (``torch.tensor(list, device="cuda")``): its copy
happens below the dispatcher. On CUDA that copy also waits for the stream; ``set_sync_debug_mode`` reports it.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports the synchronisations themselves; this counter runs on the CPU
too, so tests without a GPU can assert that a code path reads nothing back (the same code runs on the GPU).
Kernels launched outside aten (Triton launchers) are not seen.

```python
with sparsectx.diagnostics.count_host_reads() as reads:
    model(**inputs)
print(reads.count, reads.ops)   # e.g. 1, ['aten.eq... all -> _local_scalar_dense']
```
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# operations that always read device data on the host
_ALWAYS = {
    _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
    _aten.nonzero.default, _aten.nonzero.out, _aten.masked_select.default,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
}
# operations that read the host only with a boolean index
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _crosses_host(func, args, kwargs, out) -> bool:
    """A copy whose source and destination lie on different sides of the host/device boundary, other than an
    asynchronous upload (``non_blocking`` from pinned host memory)."""
    if func not in (_aten._to_copy.default, _aten.copy_.default):
        return False
    to_copy = func is _aten._to_copy.default
    src = args[0] if to_copy else args[1]
    dst = out if to_copy else args[0]
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return False
    if (src.device.type == "cpu") == (dst.device.type == "cpu"):
        return False
    non_blocking = kwargs.get("non_blocking", False) if to_copy else (
        args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return not (non_blocking and src.device.type == "cpu" and src.is_pinned())


class HostReads(TorchDispatchMode):
    """The host reads of a block: ``ops`` (names, in order) and ``count``. Use ``count_host_reads()``, which also
    watches ``Tensor.tolist``."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _ALWAYS:
            self.ops.append(str(func))
        elif func in _INDEXING and _has_bool_index(args):
            self.ops.append(f"{func} (bool index)")
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.ops.append(str(func))
        elif _crosses_host(func, args, kwargs, out):
            self.ops.append(f"{func} ({args[0].device if func is _aten._to_copy.default else args[1].device} -> "
                            f"{out.device if func is _aten._to_copy.default else args[0].device})")
        return out


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """``with count_host_reads() as reads: ...`` records the host reads of the block in ``reads.ops``."""
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def watched_tolist(tensor):
        mode.ops.append("Tensor.tolist")
        return tolist(tensor)

    torch.Tensor.tolist = watched_tolist
    try:
        with mode:
            yield mode
    finally:
        torch.Tensor.tolist = tolist


def count_cuda_syncs(fn: Callable[[], Any]) -> int:
    """Host synchronisations during one call of ``fn()``, as torch's CUDA sync debug mode ("warn") reports them
    (CUDA only: the real synchronisations, including those of launchers outside aten)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)
