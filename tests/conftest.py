"""Test setup: without a CUDA device, the Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (sparsectx imports its kernels lazily).
"""
import contextlib
import importlib
import importlib.util
import os
import sys
import threading
import types
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# triton.jit fixes a kernel's mode (compiled or interpreted) when it decorates: import the kernels now, in the
# suite's mode, rather than in the mode of whichever test first sets TRITON_INTERPRET
from sparsectx.ops import _KERNEL_MODULES, interpreter_enabled  # noqa: E402 (importing the ops imports no kernel)

try:
    for _name in _KERNEL_MODULES:
        importlib.import_module(_name)
except ImportError:  # no triton: every op takes the reference
    pass


def _interpreter_needs_older_numpy() -> bool:
    """The interpreters of Triton 3.4-3.6 turn a scalar kernel argument into an int with ``int(array_of_shape_1)``,
    which numpy >= 2.4 refuses (3.9's squeezes it first): every kernel looping over a runtime length fails."""
    if not interpreter_enabled():
        return False
    try:
        import inspect

        import numpy
        from triton.runtime import interpreter
    except Exception:
        return False
    try:
        with warnings.catch_warnings():  # (numpy < 2.4 warns here, before pytest captures warnings)
            warnings.simplefilter("ignore", DeprecationWarning)
            int(numpy.zeros(1))
    except TypeError:
        return "int(self.handle.data)" in inspect.getsource(interpreter)
    return False


def pytest_configure(config):
    if _interpreter_needs_older_numpy():
        import numpy
        import triton

        raise pytest.UsageError(f"the Triton interpreter of triton {triton.__version__} cannot run these kernels "
                                f"with numpy {numpy.__version__}: install numpy<2.4 or a newer Triton (3.9 works)")
    if os.environ.get("SPARSECTX_REPORT_AS_RUN") == "1":
        _dump_stacks_on_sigterm(config)


def _dump_stacks_on_sigterm(config) -> None:
    """A run killed by its timeout (SIGTERM, the GPU check's steps) first writes every thread's Python stack to the
    real stderr: where the test it cut was (pytest's output capture would swallow it, and the test's name is
    all a -v line says)."""
    import faulthandler
    import signal

    capture = config.pluginmanager.getplugin("capturemanager")
    uncaptured = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    with uncaptured:
        stderr = os.fdopen(os.dup(2), "w")
    faulthandler.register(signal.SIGTERM, file=stderr, all_threads=True, chain=True)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def past_int32_batch():
    """``make(shape, generator)``: a random fp16 ``[B, ...]`` view on DEVICE whose sample stride is just above 2**30
    elements, so that sample 2 lies past 2**31 (the kernels' int64 offsets), in a buffer of up to 6 GiB of which only
    the view's rows are touched; the test is skipped where the buffer can not be reserved."""
    def make(shape, generator):
        stride, rows = 2 ** 30 + 2 ** 20, torch.empty(shape[1:], device="meta")
        try:
            buffer = torch.empty((shape[0] - 1) * stride + rows.numel(), dtype=torch.float16, device=DEVICE)
        except (RuntimeError, MemoryError) as e:  # pragma: no cover - a machine without the address space
            pytest.skip(f"can not reserve the buffer: {e}")
        view = buffer.as_strided(shape, (stride, *rows.stride()))
        view.copy_(torch.randn(shape, generator=generator).to(DEVICE, torch.float16))
        assert view.stride(0) < 2 ** 31 < (shape[0] - 1) * view.stride(0)
        return view

    return make


def _run_in_threads(targets, switch_interval: float) -> None:
    """Runs each callable of ``targets`` in its own thread, the interpreter switching threads every
    ``switch_interval`` seconds (often, as under load), and waits for them all."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(saved)


@pytest.fixture
def run_in_threads():
    """``run_in_threads(targets, switch_interval)``: each callable in its own thread, all joined."""
    return _run_in_threads


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _diffusers_backend_unchanged():
    """diffusers' ``set_attention_backend`` also sets a process-wide active backend that ``reset_attention_backend``
    leaves alone: a test that sets one and does not put it back changes every later test's attention."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except Exception:
        yield
        return
    before = _AttentionBackendRegistry._active_backend
    yield
    after = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(before)
    assert after == before, f"the test left diffusers' active attention backend at {after} (was {before})"


_POISONING_TORCH = []  # the proxy, built once


def _poisoning_torch():
    """``torch`` as the kernel launchers see it in tests: ``empty``/``empty_like`` return buffers full of NaN (ints
    and bools: -7 / True), so an element a kernel should write and does not can never pass for a right value."""
    if not _POISONING_TORCH:
        def poison(t):
            return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

        proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
        proxy.empty = lambda *args, **kwargs: poison(torch.empty(*args, **kwargs))
        proxy.empty_like = lambda *args, **kwargs: poison(torch.empty_like(*args, **kwargs))
        _POISONING_TORCH.append(proxy)
    return _POISONING_TORCH[0]


@pytest.fixture(autouse=True)
def _kernel_buffers_start_poisoned(monkeypatch):
    """Every test: buffers the kernel launchers allocate uninitialised start poisoned (see ``_poisoning_torch``)."""
    for name in _KERNEL_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            monkeypatch.setattr(module, "torch", _poisoning_torch())
    yield


def _bf16_interpreter() -> types.ModuleType:
    """``tests/bf16_interpreter.py`` (the suite imports its files by path: importlib mode)."""
    module = sys.modules.get("sparsectx_tests_bf16_interpreter")
    if module is None:
        spec = importlib.util.spec_from_file_location("sparsectx_tests_bf16_interpreter",
                                                      os.path.join(os.path.dirname(__file__), "bf16_interpreter.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
    return module


@pytest.fixture(autouse=True)
def _bf16_kernels_on_the_cpu(request, monkeypatch):
    """Tests marked ``bf16_kernels`` run the kernels in bf16 on the CPU too: the interpreter patched to compute bf16
    as a GPU does (``tests/bf16_interpreter.py``), and bf16 on the CPU dispatched to the kernels (the package sends
    it to the torch reference, the interpreter's own bf16 being wrong). On a GPU the mark changes nothing."""
    if request.node.get_closest_marker("bf16_kernels") is None or DEVICE != "cpu":
        yield
        return
    from sparsectx import ops

    if ops.backend_for("cpu", torch.float16) != ops.TRITON_INTERPRETER:
        pytest.skip("bf16 kernels on the CPU run through the Triton interpreter (TRITON_INTERPRET=1)")
    reason = _bf16_interpreter().install()
    if reason is not None:
        pytest.skip(reason)
    dispatch = ops.backend_for

    def bf16_to_the_kernels(device, dtype=torch.float16):
        on_cpu = torch.device(device).type == "cpu"
        return dispatch(device, torch.float16 if on_cpu and dtype == torch.bfloat16 else dtype)

    monkeypatch.setattr(ops, "backend_for", bf16_to_the_kernels)
    yield


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state: inputs a test draws without its own generator (and
    selections or drop masks drawn from torch's global generator) are the same at every run, so a failure
    reproduces."""
    torch.manual_seed(0)
    yield


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """With SPARSECTX_REPORT_AS_RUN=1 (the GPU check sets it): each test's time, and a failure's traceback, written
    as the test finishes. pytest prints tracebacks only at the end of the session, which a run killed by its
    timeout never reaches."""
    if os.environ.get("SPARSECTX_REPORT_AS_RUN") != "1" or not (report.failed or report.when == "call"):
        return
    lines = [f"[{report.nodeid} {report.when}: {report.outcome}, {report.duration:.1f} s]"]
    if report.failed:
        lines.append(report.longreprtext)
    print("\n" + "\n".join(lines), flush=True)
