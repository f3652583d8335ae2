"""sparsectx.diagnostics.count_host_reads: flags the operations that read device data on the host, and only them."""
import pytest
import torch

from sparsectx.diagnostics import count_host_reads


def _x():
    return torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.0


@pytest.mark.parametrize("name, fn", [
    ("item", lambda x: x.sum().item()),
    ("bool", lambda x: bool((x > 0).any())),
    ("int", lambda x: int(x.max())),
    ("equal", lambda x: torch.equal(x, x)),
    ("nonzero", lambda x: torch.nonzero(x > 0)),
    ("bool index", lambda x: x[x > 0]),
    # (a value of several elements, or accumulated: ATen compacts the mask; ``x[mask] = scalar`` reads nothing)
    ("bool index put", lambda x: x.clone().index_put_((x > 0,), torch.zeros(6))),  # (x holds 6 positives)
    ("bool index put, accumulated", lambda x: x.clone().index_put_((x > 0,), torch.tensor(1.0), accumulate=True)),
    # a one-element value made on the device: ATen compacts the mask there (only a host value becomes masked_fill_)
    ("bool index put of a device value", lambda x: x.clone().__setitem__(x > 0, x.amin())),
    ("bool index put of a new device scalar", lambda x: x.clone().__setitem__(x > 0, x.new_zeros(()))),
    ("masked_select", lambda x: torch.masked_select(x, x > 0)),
    ("masked_select into out=", lambda x: torch.masked_select(x, x > 0, out=torch.empty(0))),  # (missed before)
    ("unique", lambda x: torch.unique(x)),
    ("unique_consecutive", lambda x: torch.unique_consecutive(x)),
    ("repeat_interleave", lambda x: torch.repeat_interleave(torch.tensor([1, 2]))),
    ("tolist", lambda x: x.tolist()),
    # (a CPU tensor's .cpu() runs no aten op, and these read inside their kernels on CUDA: missed before)
    ("cpu", lambda x: x.cpu()),
    ("allclose", lambda x: torch.allclose(x, x)),
    ("bincount", lambda x: torch.bincount((x > 0).long().flatten())),
    ("histc without a range", lambda x: torch.histc(x, bins=4)),
    ("histc without a range, into out=", lambda x: torch.histc(x, bins=4, out=torch.empty(4))),  # (missed before)
])
def test_host_reads_are_counted(name, fn):
    x = _x()
    with count_host_reads() as reads:
        fn(x)
    assert reads.count >= 1, name


@pytest.mark.parametrize("name, fn", [
    ("arithmetic", lambda x: (x * 2 + 1).exp()),
    ("reductions on the device", lambda x: (x.sum(1), x.max(dim=0).values, (x > 0).all())),
    ("index_select", lambda x: x.index_select(1, torch.tensor([0, 2]))),
    ("long index", lambda x: x[:, torch.tensor([1, 3])]),
    ("index_copy", lambda x: x.clone().index_copy_(0, torch.tensor([2]), x[:1])),
    ("where", lambda x: torch.where(x > 0, x, 0.0)),
    ("repeat_interleave with output_size", lambda x: torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)),
    ("histc with a range", lambda x: torch.histc(x, bins=4, min=-3.0, max=3.0)),
    # ATen runs ``x[mask] = scalar`` as masked_fill_ (one bool index, a one-element host value, no accumulation)
    ("bool index put of a scalar", lambda x: x.clone().__setitem__(x > 0, 0.0)),
    ("bool index put of a host scalar tensor", lambda x: x.clone().index_put_((x > 0,), torch.tensor(0.0))),
])
def test_device_only_operations_are_not_counted(name, fn):
    x = _x()
    with count_host_reads() as reads:
        fn(x)
    assert reads.count == 0, (name, reads.ops)


def test_a_bool_index_put_of_a_value_made_before_the_block_is_counted():
    """A one-element value made before the block (a device scalar on a GPU, where ATen then compacts the mask on the
    host) counts as a read, as a value made inside by an aten op does (before: only values made inside counted)."""
    x = _x()
    before = x.amin()
    with count_host_reads() as reads:
        x.clone()[x > 0] = before
    assert reads.count == 1, reads.ops


def test_tolist_is_restored_after_the_block():
    original = torch.Tensor.tolist
    with count_host_reads():
        pass
    assert torch.Tensor.tolist is original
    with pytest.raises(RuntimeError):
        with count_host_reads():
            raise RuntimeError("inside")
    assert torch.Tensor.tolist is original


def test_copies_across_the_host_boundary_are_counted():
    x = _x()
    with count_host_reads() as reads:
        x.to("meta")  # host -> another device (meta stands in for a GPU on this machine)
        x.to("meta", non_blocking=True)  # not pinned: still waits for the copy
        torch.empty(3, 4, device="meta").copy_(x)
    assert reads.count == 3, reads.ops
    with count_host_reads() as reads:
        x.to("meta").to(torch.float64)  # the second copy stays on the device
        x.clone()
    assert reads.count == 1, reads.ops


@pytest.mark.gpu
def test_an_asynchronous_upload_from_pinned_memory_is_not_counted():
    pinned = torch.arange(4, dtype=torch.int32).pin_memory()
    with count_host_reads() as reads:
        pinned.to("cuda", non_blocking=True)
    assert reads.count == 0, reads.ops
    with count_host_reads() as reads:
        pinned.to("cuda")  # blocking
        torch.arange(4).to("cuda", non_blocking=True)  # pageable
    assert reads.count == 2, reads.ops


def test_device_values_build_what_torch_tensor_builds():
    """ops._device_values (small tensors of Python values, built on CUDA from pinned memory without waiting) gives
    torch.tensor's values, dtype and errors on the CPU."""
    import pytest
    import torch

    from sparsectx.ops import _device_values

    for values, dtype in (([3, 1, 4], None), ([0.5, 2.0], torch.float64), ([True, False], torch.bool),
                          ([[1, 2], [3, 4]], torch.int32)):
        got, want = _device_values(values, dtype, "cpu"), torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError):
        _device_values([[1, 2], [3]], None, "cpu")
    host = torch.tensor([[2, 7], [1, 8]])  # a host tensor: its values, in its dtype or the one asked for
    for dtype in (None, torch.int32, torch.float64):
        got = _device_values(host, dtype, "cpu")
        assert got.dtype == (dtype or host.dtype) and torch.equal(got, host.to(got.dtype))
    with pytest.raises(ValueError, match="host values"):
        _device_values(torch.zeros(2, device="meta"), None, "cpu")


@pytest.mark.gpu
def test_device_values_from_a_host_tensor_wait_for_nothing_on_cuda():
    from sparsectx.diagnostics import count_cuda_syncs
    from sparsectx.ops import _device_values

    host = torch.arange(1000).reshape(10, 100)
    out = []
    assert count_cuda_syncs(lambda: out.append(_device_values(host, torch.int32, "cuda"))) == 0
    assert out[0].device.type == "cuda" and torch.equal(out[0].cpu(), host.int())


def test_cuda_syncs_say_where_each_sync_happened(monkeypatch):
    """``cuda_syncs``: each warning of torch's sync debug mode ("warn" while ``fn`` runs, the previous mode after)
    with the Python stack that made it; other warnings are not syncs (the sync debug mode itself is stood in for,
    as there is no CUDA here: torch reports a sync as this warning, from C++ like ``torch.range``'s)."""
    import warnings

    from sparsectx.diagnostics import count_cuda_syncs, cuda_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def planted_sync():
        warnings.warn("called a synchronizing CUDA operation")

    def fn():
        assert modes[-1] == "warn"
        torch.range(0, 1)  # a deprecation warning from C++, not a sync
        planted_sync()

    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        syncs = cuda_syncs(fn)
        assert count_cuda_syncs(fn) == 1
        warnings.warn("after the block")
    assert len(syncs) == 1 and "in planted_sync" in syncs[0] and "in fn" in syncs[0]
    assert syncs[0].rstrip().endswith("UserWarning: called a synchronizing CUDA operation")
    assert modes == ["warn", 0, "warn", 0]
    # fn's other warnings reach the caller (dropped before), under its filters; its warning handling is back after
    messages = [str(w.message) for w in outside]
    assert messages[-1] == "after the block" and "called a synchronizing" not in " ".join(messages), messages
    assert sum("torch.range is deprecated" in m for m in messages) == 2, messages  # (fn ran twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the caller's: fn's deprecation warning raises, its sync reports do not
        with pytest.raises(UserWarning, match="torch.range is deprecated"):
            cuda_syncs(fn)
        assert len(cuda_syncs(planted_sync)) == 1

    def twice():  # two syncs from one line: two (Python's default filter would show the second one no more)
        for _ in range(2):
            planted_sync()

    assert count_cuda_syncs(twice) == 2 and len(cuda_syncs(twice)) == 2
    modes.clear()

    def raising():
        planted_sync()
        raise KeyError("planted")

    with pytest.raises(KeyError, match="planted"):
        cuda_syncs(raising)
    assert modes == ["warn", 0]  # the previous mode is back after an exception


def test_cuda_syncs_do_not_count_the_debug_modes_own_notice(monkeypatch):
    """torch's ``set_sync_debug_mode`` warns once per process that the mode "is a prototype feature and does not yet
    detect all synchronizing operations" (torch/csrc/cuda/Module.cpp, TORCH_WARN_ONCE): that notice is no sync. Every
    H200 run to 2026-11-30 counted it as one on the first row each bench process counted (stood in for here, with
    the same warn-once behaviour, as there is no CUDA)."""
    import warnings

    from sparsectx.diagnostics import count_cuda_syncs, cuda_syncs

    state = {"mode": 0, "warned": False}

    def set_mode(mode):
        if not state["warned"]:
            state["warned"] = True
            warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                          "synchronizing operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp)")
        state["mode"] = mode

    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        assert cuda_syncs(lambda: None) == [] and state["warned"]  # the first call of the process: the notice came
    assert outside == []  # (cuda_syncs' own doing: not passed on as fn's)
    assert count_cuda_syncs(lambda: warnings.warn("called a synchronizing CUDA operation")) == 1


def test_device_data_tells_device_reads_from_host_work():
    """count_host_reads(device_data=...): on a machine where everything is on the CPU, only reads of the given
    tensors and of what is computed from them count; a .cpu() of such data counts once and gives host data."""
    device = _x()
    host = torch.arange(6)
    with count_host_reads(device_data=[device]) as reads:
        int(host.sum())  # host work
        torch.nonzero(host > 2)
        host.tolist()
        derived = device[1:] * 2  # a view, then a product: device data
        copy = derived.cpu()
        int(copy.max()), copy.tolist(), torch.nonzero(copy)  # host work on the copy
        written = torch.zeros(2, 4)
        written.copy_(device[:2])  # an operation writes device data into it
        bool(written.any())
        derived.tolist()
    assert reads.ops == ["Tensor.cpu", "aten._local_scalar_dense.default", "Tensor.tolist"], reads.ops
    assert copy is not derived and torch.equal(copy, derived)
    assert derived.cpu() is derived  # restored: a CPU tensor's own
    with count_host_reads(device_data=[device]) as reads:
        base = torch.zeros(3, 4)
        base[0] = device[0]  # written through a view: the base holds device data
        int(base.sum())
        moved = device.to(device.device)  # here the model's device is the CPU: still device data
        int(moved[0, 0])
        device.to(torch.float64).tolist()  # a copy on the device
    assert reads.ops == ["aten._local_scalar_dense.default"] * 2 + ["Tensor.tolist"], reads.ops
    with count_host_reads(device_data=[device]) as reads:
        accumulators = [torch.zeros(2, 4), torch.zeros(2, 4)]
        torch._foreach_add_(accumulators, [device[:2], device[1:]])  # writes device data into a list of tensors
        bool(accumulators[1].any())
    assert reads.ops == ["aten._local_scalar_dense.default"], reads.ops


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_device_data_of_sparse_tensors_is_followed(layout):
    """count_host_reads(device_data=...) around operations on sparse tensors (an nn.Embedding(sparse=True) backward,
    a sparse matmul): their data is followed through their indices' and values' storages (before: every such
    operation raised NotImplementedError, "Cannot access storage of SparseTensorImpl", only inside the block)."""
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    ids = torch.tensor([[1, 2, 3]])
    with count_host_reads(device_data=[embedding, ids]) as reads:
        embedding(ids).sum().backward()
    assert reads.count == 0, reads.ops
    grad = embedding.weight.grad
    assert grad.layout is torch.sparse_coo
    sparse = torch.randn(3, 3).to_sparse() if layout == "coo" else torch.randn(3, 3).to_sparse_csr()
    weight = torch.randn(3, 3)
    with count_host_reads(device_data=[weight]) as reads:
        product = torch.sparse.mm(sparse, weight) if layout == "coo" else sparse @ weight  # device data
        int(sparse.values().sum())  # host work: a sparse tensor made outside the device data
        int(product.sum())  # a read of device data
        device_sparse = weight.to_sparse() if layout == "coo" else weight.to_sparse_csr()
        int(device_sparse.values().sum())  # the values of a sparse tensor made from device data: a read
    assert reads.ops == ["aten._local_scalar_dense.default"] * 2, reads.ops
    torch.testing.assert_close(product, sparse.to_dense() @ weight)


def test_blocks_of_two_threads_may_overlap():
    import threading

    entered, leave_first = threading.Event(), threading.Event()
    seen = {}

    def first():
        with count_host_reads(device_data=[]) as reads:
            entered.set()
            leave_first.wait()
        seen["first"] = reads.ops

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait()
    x = _x()
    with count_host_reads(device_data=[x]) as reads:  # enters after the other thread's block, leaves after it
        leave_first.set()
        thread.join()
        x.cpu()
    assert reads.ops == ["Tensor.cpu"] and seen["first"] == []
    from sparsectx import diagnostics

    assert x.cpu() is x and all(  # methods restored once both blocks ended
        getattr(torch.Tensor, name) is method for name, method in diagnostics._ORIGINALS.items())


def test_device_data_of_a_module_and_bad_items():
    layer = torch.nn.Linear(3, 2)
    with count_host_reads(device_data=[layer]) as reads:
        float(layer.weight.detach().sum())
        y = layer(torch.ones(1, 3)).detach()  # computed from the parameters
        y.tolist()
        float(torch.ones(3).sum())  # host work
    assert reads.count == 2, reads.ops
    with pytest.raises(TypeError, match="device_data"):
        with count_host_reads(device_data=[3]):
            pass
    with pytest.raises(TypeError, match="device_data must be a list of tensors or modules, got int"):
        with count_host_reads(device_data=3):  # (before: "'int' object is not iterable")
            pass
    # one tensor or module given bare: taken as one item (a 0-d tensor failed in torch's iteration, a matrix was
    # walked row by row)
    for bare in (torch.tensor(2.0), torch.ones(3, 2), layer):
        with count_host_reads(device_data=bare) as reads:
            data = bare.weight.detach() if isinstance(bare, torch.nn.Module) else bare
            float(data.sum())
            float(torch.ones(3).sum())  # host work
        assert reads.count == 1, (bare, reads.ops)


def test_a_byte_mask_index_is_a_host_read():
    """A uint8 mask indexes like a bool one (deprecated, still accepted): its output size depends on the data."""
    import warnings

    x = _x()
    mask = (x > 0).to(torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning for uint8 indices
        with count_host_reads() as reads:
            x[mask]
    assert reads.count == 1, reads.ops


def test_reads_of_what_sparsectx_ops_compute_from_device_data_are_counted():
    """Inside the block sparsectx's ops run as their custom ops: the mode sees one call on device data, so the
    outputs are device data and a later read of them counts (their eager path fills outputs made from nothing by
    Triton launches the mode does not see: such a read went uncounted). The branch differs from an eager call's
    for ``masked_attention`` with its key mask as ``query_mask`` (documented): its CPU-only ``max_total`` checks
    read the mask twice, and nothing else reads."""
    import sparsectx

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 2, 16, generator=gen) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    cos, sin, weight = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen), torch.randn(16)
    cases = {"masked_attention": (lambda: sparsectx.masked_attention(q, k, v, mask, query_mask=mask), [q, k, v, mask]),
             "rms_norm_rope": (lambda: sparsectx.rms_norm_rope(q, cos, sin, weight), [q, cos, sin, weight])}
    for name, (op, data) in cases.items():
        expected = op()
        with count_host_reads(device_data=data) as reads:
            out = op()
            by_op = list(reads.ops)
            bool(torch.isnan(out).any())  # one read of the op's output
        assert torch.equal(out, expected), name
        assert len(reads.ops) - len(by_op) == 1, (name, reads.ops)
        # (the torch reference builds each of the two compactions' index with nonzero: two reads more each)
        mask_reads = 2 if sparsectx.ops.backend_for(q.device, q.dtype) != sparsectx.ops.TORCH_REFERENCE else 6
        assert len(by_op) == (mask_reads if name == "masked_attention" else 0), (name, by_op)


def test_bool_index_put_of_a_several_element_host_value_counts_with_device_data():
    """D02 (diagnostics.py:87 ``value.numel() == 1`` -> ``>= 1``): ATen runs ``index_put_`` with a bool index as
    masked_fill_ only for a one-element value; a value of several elements (host data here) makes it compact the
    mask (nonzero: a host read on a GPU). With ``device_data``, the host value must not hide that read."""
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.0  # 6 positives
    values = torch.zeros(6)  # host data (not in device_data)
    with count_host_reads(device_data=[x]) as reads:
        x.clone().index_put_((x > 0,), values)
    assert reads.count == 1, reads.ops


def test_an_asynchronous_upload_from_pinned_memory_is_not_counted_on_the_cpu(monkeypatch):
    """D03 (diagnostics.py:114 ``return not (non_blocking and ... src.is_pinned())`` -> ``return True``): the only
    test of the pinned-upload exemption is GPU-marked. Here ``meta`` stands in for the GPU (as in
    test_copies_across_the_host_boundary_are_counted) and the source reports itself pinned."""
    x = torch.arange(4, dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args, **kwargs: True)
    with count_host_reads() as reads:
        x.to("meta", non_blocking=True)
    assert reads.count == 0, reads.ops
    with count_host_reads() as reads:
        x.to("meta")  # blocking: still a wait
    assert reads.count == 1, reads.ops


def test_a_bool_index_after_a_slice_is_a_host_read():
    """``x[:, mask]`` (``aten.index`` with indices ``[None, mask]``) and its index_put: their output sizes depend on
    the mask as much as ``x[mask]``'s, a host read each."""
    x = _x()
    with count_host_reads() as reads:
        x[:, x[0] > -3.5]
    assert reads.count == 1, reads.ops
    with count_host_reads() as reads:
        x.clone()[:, x[0] > -3.5] = torch.zeros(3, 2)  # index_put_ of a several-element value: compacts the mask
    assert reads.count == 1, reads.ops


def test_cuda_syncs_restores_the_callers_own_mode(monkeypatch):
    """``cuda_syncs`` gives the caller its own sync debug mode back (here "error", 2), not the default 0."""
    from sparsectx.diagnostics import cuda_syncs

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    assert cuda_syncs(lambda: None) == []
    assert modes == ["warn", 2]
