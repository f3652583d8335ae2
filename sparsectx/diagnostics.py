"""Host reads: the operations whose result the host must wait for (on a GPU, each one synchronises the stream and
lets the GPU idle while Python catches up).

``count_host_reads()`` watches the aten operations of a block (a ``TorchDispatchMode``) on any device, CPU
included, and records every one that reads device data on the host:

- a scalar read: ``.item()``, ``bool(t)``, ``int(t)``, ``torch.equal`` (``aten._local_scalar_dense``,
  ``aten.is_nonzero``, ``aten.equal``), and ``Tensor.tolist()`` (not an aten operation: it is watched by wrapping
  the method while the block runs);
- an output whose size depends on the data: ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing
  (``aten.index`` / ``index_put`` with a bool index; not ``x[mask] = 0.0`` or a one-element value the block made
  from host data (``torch.tensor(0.0)``), which ATen runs as ``masked_fill_``; any other value, one made before
  the block included, is taken for device data), ``repeat_interleave`` without ``output_size``,
  ``bincount``, and ``histc`` without a range (both read the data's range); ``allclose`` (a Python bool);
- a copy between a device and the host (``.cpu()``, also of a tensor already on the CPU, ``.to("cuda")`` of a
  host tensor), except a ``non_blocking`` copy from pinned host memory to the device (it is queued like a kernel
  and waits for nothing). ``.to("cpu")`` of a CPU tensor is not counted: here it can not be told from a move to
  the model's device (the CPU too). A copy between the CPU and ``meta`` counts as one with a device (tests on the
  CPU use meta to stand for a GPU), though no data moves.

Not seen: a tensor built from host data directly on the device (``torch.tensor(list, device="cuda")``): its copy
happens below the dispatcher. On CUDA that copy also waits for the stream; ``set_sync_debug_mode`` reports it.
Nor ``torch.tensor`` / ``torch.as_tensor`` of a list holding device tensors (each element is read below the
dispatcher), nor reads inside an aten kernel (``multinomial``, ``linalg.cholesky``'s error check), nor reads on
other threads than the block's (the counter is per thread). Printing a tensor (``str``, ``repr``, ``print``) is not
counted reliably: torch's formatting runs with the dispatch modes off, so only its ``tolist()`` calls are seen (none
for a 0-d tensor, one per row of a matrix).

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports the synchronisations themselves; this counter runs on the CPU
too, so tests without a GPU can assert that a code path reads nothing back (the same code runs on the GPU). There
every tensor is on the CPU, and host-side work (e.g. on a host copy of small index tensors) counts like a read of
the device unless ``count_host_reads(device_data=[model, *inputs])`` says which tensors stand for device data.
``Tensor.numpy()`` is not watched.
Kernels launched outside aten (Triton launchers) are not seen. Inside the block sparsectx's ops run as their custom
ops (the mode sees one call on their inputs, so outputs computed from device data are device data), and some take
another branch than an eager call's: ``masked_attention`` given its key mask as ``query_mask`` without autograd
takes its general path there, whose two ``max_total`` checks read the mask on the CPU (skipped on CUDA).

```python
with sparsectx.diagnostics.count_host_reads() as reads:
    model(**inputs)
print(reads.count, reads.ops)   # e.g. 1 ['aten._local_scalar_dense.default']
```
"""
from __future__ import annotations

import contextlib
import threading
import traceback
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# operations that always read device data on the host
_ALWAYS = {
    _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
    _aten.nonzero.default, _aten.nonzero.out, _aten.masked_select.default, _aten.masked_select.out,
    _aten._unique.default, _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
    _aten.unique_dim_consecutive.default,
    # a Python bool, and outputs sized (or binned) by the data's range: read inside the kernel on CUDA
    _aten.allclose.default, _aten.bincount.default,
}
# what wraps a tensor made from host data below the dispatcher (``torch.tensor(...)``, Python's scalar of
# ``x[mask] = 0.0``): its result is host data
_HOST_MADE = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
# operations that read the host only with a boolean index
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _masked_fill_value(func, args, kwargs) -> Optional[torch.Tensor]:
    """The value of an ``index_put`` that ATen runs as ``masked_fill_`` when that value is on the host (its
    ``canDispatchToMaskedFill``: one bool index on self's device, a one-element value on the host, no accumulation),
    which reads nothing: ``x[mask] = 0.0`` (on CUDA, Python's scalar becomes a host tensor); else None. On this
    machine every tensor is on the CPU: the caller tells whether the value would be on a GPU."""
    if func is _aten.index.Tensor:
        return None
    self, indices, value = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("values")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    given = [i for i in indices if i is not None]
    if (not accumulate and isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type == "cpu"
            and len(given) == 1 and given[0].device == self.device):
        return value
    return None


def _histc_range(args, kwargs) -> tuple:
    """``(min, max)`` of an ``aten.histc`` call (both 0, their defaults: the data's own range, read on the host)."""
    names = ("bins", "min", "max")
    given = dict(zip(names, args[1:]), **kwargs)
    return given.get("min", 0), given.get("max", 0)


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


def _storage_refs(t: torch.Tensor) -> list:
    """Weak references to the storages holding ``t``'s data: its own (a strided tensor), those of its indices and
    values (a sparse tensor: COO, CSR, CSC, BSR, BSC), or none (a tensor whose storage can not be read)."""
    if t.layout is torch.strided:
        try:
            return [StorageWeakRef(t.untyped_storage())]
        except (NotImplementedError, RuntimeError):  # (a tensor subclass or nested tensor without one storage)
            return []
    if t.layout is torch.sparse_coo:
        parts = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        return []
    return [ref for part in parts for ref in _storage_refs(part)]


class HostReads(TorchDispatchMode):
    """The host reads of a block: ``ops`` (names, in order) and ``count``. Use ``count_host_reads()``, which also
    watches ``Tensor.tolist`` and ``Tensor.cpu``."""

    def __init__(self, device_data=None):
        super().__init__()
        self.ops: list[str] = []
        # the storages holding device data, by address -> weak reference (None: every tensor is device data). By
        # storage: a view of device data is device data, and so is a tensor written through one of its views.
        self._device: Optional[dict] = None
        # the storages of the one-element tensors the block made from host data (``lift_fresh``: Python's scalar of
        # ``x[mask] = 0.0``, ``torch.tensor(0.0)``), by address -> weak reference: host data on a GPU too, where
        # every other value (``y.amin()``, one made before the block) is taken for device data
        self._host_made: dict = {}
        if device_data is not None:
            self._device = {}
            for t in device_data:
                self.mark(t)

    @property
    def count(self) -> int:
        return len(self.ops)

    def mark(self, t) -> None:
        if self._device is not None and isinstance(t, torch.Tensor):
            for ref in _storage_refs(t):
                self._device[ref.cdata] = ref

    def holds_device_data(self, t) -> bool:
        if self._device is None:
            return True
        refs = _storage_refs(t)
        if not refs:
            return True  # (a tensor whose storage can not be read: taken for device data)
        return any(not ref.expired() for ref in (self._device.get(r.cdata) for r in refs) if ref is not None)

    def made_on_the_device(self, t) -> bool:
        """Whether ``t`` is device data on a GPU: device data given (``device_data``), or, without, any tensor but
        one the block made from host data."""
        if self._device is not None:
            return self.holds_device_data(t)
        refs = _storage_refs(t)
        return not any(ref is not None and not ref.expired() for ref in (self._host_made.get(r.cdata) for r in refs))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._device is None and func in _HOST_MADE and out.numel() == 1:  # (only such values are asked about)
            for ref in _storage_refs(out):
                self._host_made[ref.cdata] = ref
        if self._device is not None:
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if not any(self.holds_device_data(t) for t in inputs):
                return out  # host work: reads nothing from the device
            # results of device data are device data, and so are the tensors an operation writes into
            for t in pytree.tree_leaves(out):
                self.mark(t)
            for arg, value in zip(func._schema.arguments, args):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    for t in pytree.tree_leaves(value):  # (a list of tensors for the _foreach_*_ ops)
                        self.mark(t)
        if func in _ALWAYS:
            self.ops.append(str(func))
        elif func in _INDEXING and _has_bool_index(args):
            value = _masked_fill_value(func, args, kwargs)
            # (a host value on a GPU run is host data, wherever it was made; only on the CPU must it be told apart)
            if value is None or (args[0].device.type == "cpu" and self.made_on_the_device(value)):
                self.ops.append(f"{func} (bool index)")
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.ops.append(str(func))
        elif func in (_aten.histc.default, _aten.histc.out) and _histc_range(args, kwargs) == (0, 0):
            # (the range read from the data)
            self.ops.append(str(func))
        elif _crosses_host(func, args, kwargs, out):
            self.ops.append(f"{func} ({args[0].device if func is _aten._to_copy.default else args[1].device} -> "
                            f"{out.device if func is _aten._to_copy.default else args[0].device})")
        return out


# Tensor methods watched outside aten while any count_host_reads block runs (installed once for all threads; each
# thread's blocks are found through a thread-local stack, so blocks of different threads may overlap)
_WATCHED = threading.local()
_PATCH_LOCK = threading.Lock()
_patch_users = 0
_ORIGINALS = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu")}


def _modes() -> list:
    if not hasattr(_WATCHED, "modes"):
        _WATCHED.modes = []
    return _WATCHED.modes


def _watched_tolist(tensor):
    for mode in _modes():
        if mode.holds_device_data(tensor):
            mode.ops.append("Tensor.tolist")
    return _ORIGINALS["tolist"](tensor)


def _watched_cpu(tensor, *args, **kwargs):
    """``tensor.cpu()``: one read of device data. In a block given ``device_data``, of such data, with a result that is
    host data (a new tensor even where the data already is on the CPU); in a block without, of a CPU tensor (where
    no aten copy runs: on a GPU the same call is one), its result staying device data as every tensor there is."""
    original = _ORIGINALS["cpu"]
    on_cpu = tensor.device.type == "cpu"
    for mode in _modes():
        if mode._device is None and on_cpu:
            mode.ops.append("Tensor.cpu")
    readers = [mode for mode in _modes() if mode._device is not None and mode.holds_device_data(tensor)]
    if not readers:
        return original(tensor, *args, **kwargs)
    for mode in readers:
        mode.ops.append("Tensor.cpu")
    with torch.utils._python_dispatch._disable_current_modes():
        host = original(tensor, *args, **kwargs)
        return host.clone() if host is tensor else host


def _watch_methods(on: bool) -> None:
    global _patch_users
    with _PATCH_LOCK:
        _patch_users += 1 if on else -1
        if on and _patch_users == 1:
            torch.Tensor.tolist, torch.Tensor.cpu = _watched_tolist, _watched_cpu
        elif not on and _patch_users == 0:
            for name, method in _ORIGINALS.items():
                setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def count_host_reads(device_data: Optional[Iterable] = None) -> Iterator[HostReads]:
    """``with count_host_reads() as reads: ...`` records the host reads of the block in ``reads.ops``.

    ``device_data`` (tensors, or modules for their parameters and buffers) tells device data from host data on a
    machine where both are on the CPU: only reads of those tensors and of what the block computes from them count
    (tracked by storage: views and tensors written through views included), and ``.cpu()`` of such data counts as
    one read whose result is host data (on a GPU it is one copy; here it returns a new tensor). Not modelled:
    tensors the block creates from nothing (``torch.ones(..., device=x.device)``) count as host data, so a read of
    one made on a GPU is missed; ``.to("cpu")`` and a copy into an existing host tensor (``host.copy_(x)``) can not
    be told here from a move to the model's device (the CPU too), so their results stay device data and their later
    reads count instead of the copy. A read inside a custom op's own implementation (sparsectx's compaction ops under
    autograd or torch.compile) is seen only through ``.tolist()`` or ``.cpu()`` (patched on ``torch.Tensor``): the
    dispatch mode sees the op as one operation."""
    tensors = None
    if isinstance(device_data, (torch.Tensor, torch.nn.Module)):  # one of them (a tensor is no list of its rows)
        device_data = [device_data]
    if device_data is not None:
        if not isinstance(device_data, Iterable):
            raise TypeError(f"device_data must be a list of tensors or modules, got {type(device_data).__name__}")
        tensors = []
        for item in device_data:
            if isinstance(item, torch.nn.Module):
                tensors += [*item.parameters(), *item.buffers()]
            elif isinstance(item, torch.Tensor):
                tensors.append(item)
            else:
                raise TypeError(f"device_data must hold tensors or modules, got {type(item).__name__}")
    mode = HostReads(tensors)
    _watch_methods(True)
    _modes().append(mode)
    try:
        with mode:
            yield mode
    finally:
        _modes().remove(mode)
        _watch_methods(False)


# the warning torch's CUDA sync debug mode ("warn") gives at each synchronisation (c10's warn_or_error_on_sync)
_SYNC_REPORT = "called a synchronizing CUDA operation"
# the notice set_sync_debug_mode gives once per process (torch/csrc/cuda/Module.cpp)
_DEBUG_MODE_NOTICE = "Synchronization debug mode is a prototype feature"


def count_cuda_syncs(fn: Callable[[], Any]) -> int:
    """Host synchronisations during one call of ``fn()``, as torch's CUDA sync debug mode ("warn") reports them
    (CUDA only: the real synchronisations, including those of launchers outside aten). ``cuda_syncs`` says where."""
    return len(cuda_syncs(fn))


def cuda_syncs(fn: Callable[[], Any]) -> list[str]:
    """The host synchronisations during one call of ``fn()`` that torch's CUDA sync debug mode ("warn") reports,
    each as its message after the Python stack that made it (innermost call last): where a path synchronises,
    also when an exception handler would swallow the error of the "error" mode (CUDA only). ``fn``'s other warnings
    reach the caller under the caller's filters."""
    found: list[str] = []
    shown = warnings.showwarning  # the caller's: every other warning goes there, under the caller's filters

    def record(message, category, filename, lineno, file=None, line=None):
        # torch's own sync report only: the notice set_sync_debug_mode gives once per process ("Synchronization
        # debug mode is a prototype feature and does not yet detect all synchronizing operations") is no sync
        if _SYNC_REPORT in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__]
            found.append("".join(traceback.format_list(stack)) + f"{category.__name__}: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        # every sync report, even one a filter of the caller's ignores, turns to an error or shows once per line;
        # the notice the debug mode itself gives (_DEBUG_MODE_NOTICE) is ours to silence, not fn's
        warnings.filterwarnings("always", message=f".*{_SYNC_REPORT}")
        warnings.filterwarnings("ignore", message=_DEBUG_MODE_NOTICE)
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return found
