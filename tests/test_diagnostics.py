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
    ("bool index put", lambda x: x.clone().__setitem__(x > 0, 0.0)),
    ("masked_select", lambda x: torch.masked_select(x, x > 0)),
    ("unique", lambda x: torch.unique(x)),
    ("unique_consecutive", lambda x: torch.unique_consecutive(x)),
    ("repeat_interleave", lambda x: torch.repeat_interleave(torch.tensor([1, 2]))),
    ("tolist", lambda x: x.tolist()),
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
])
def test_device_only_operations_are_not_counted(name, fn):
    x = _x()
    with count_host_reads() as reads:
        fn(x)
    assert reads.count == 0, (name, reads.ops)


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
