"""Benchmark cases: sparsectx against what users would otherwise run, every peer measured in the same run.

Used by ``sparsectx bench`` (table, JSON, optional plot) and by ``bench/test_*.py`` (pytest-benchmark).

A *case* (``CASES``) has *configs* (one shape each); building a config gives a ``Workload``: named implementations,
the first being sparsectx's. Each implementation is run once and its result compared with sparsectx's (relative
L2 error within the bound of the dtype, or exact equality for data movement), then timed: the median of CUDA-event
timings (``triton.testing.do_bench``) on a GPU, the median of ``time.perf_counter`` on the CPU. Rows report the
median time, useful TFLOP/s or GB/s, and ``ratio`` = implementation time / sparsectx time (> 1: sparsectx is faster).

Sizes: ``full`` is the real shape (FACTS §1; bf16 on a GPU); ``tiny`` runs on the CPU in seconds (the torch
reference path, or the Triton interpreter when TRITON_INTERPRET=1 was exported). ``quick`` keeps fewer shapes and
repetitions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import ops

SEED = 0
SIZES = ("tiny", "full")
CASE_ORDER = ("attention", "compaction", "batch", "masked", "training", "e2e")
# relative L2 error bound between two implementations computing the same function in one dtype
REL_ERR_BOUND = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# timing: do_bench warm-up / measuring windows (ms) on a GPU; repetitions and time budget (s) on the CPU
GPU_WARMUP_MS, GPU_REP_MS, GPU_QUICK_REP_MS = 25, 100, 40
CPU_REPS, CPU_QUICK_REPS, CPU_BUDGET_S = 7, 3, 1.0
# FACTS §1 counts a forward+backward as 3.5x the forward's flops
FWD_BWD_FLOP_FACTOR = 3.5
RATIO_MEANING = "ratio = implementation time / sparsectx time (> 1: sparsectx is faster)"


# ----------------------------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------------------------
def _identity(x):
    return x


@dataclass
class Impl:
    """One implementation of a workload. ``fn`` runs it; ``output`` maps fn's return value to what is compared
    (outside the timed region). ``comparable=False`` marks a reference point that computes a different function by
    design (e.g. keeping all reference tokens); ``skip`` says why an implementation is unavailable here."""

    name: str
    fn: Optional[Callable[[], Any]] = None
    output: Callable[[Any], Any] = _identity
    comparable: bool = True
    note: str = ""
    skip: str = ""
    shared_key: Optional[tuple] = None  # workloads that share this key share one timing (e.g. the keep-all step)


@dataclass
class Workload:
    case: str
    shape: str
    impls: list
    dtype: torch.dtype
    flops: float = 0.0  # useful floating-point operations (TFLOP/s column)
    bytes_moved: float = 0.0  # fewest bytes read + written (GB/s column, bytes-moved floor row)
    exact: bool = False  # data movement: results must be equal, not close
    reps: Optional[int] = None  # fixed repetitions for slow steps (else do_bench / the CPU budget)
    track_memory: bool = False

    def impl(self, name: str) -> Optional[Impl]:
        return next((i for i in self.impls if i.name == name), None)


def relative_error(actual, expected) -> float:
    """max over the tensors of ||actual - expected|| / ||expected|| (in float64); inf for NaN or a shape change."""
    pairs = list(zip(actual, expected)) if isinstance(actual, (tuple, list)) else [(actual, expected)]
    if isinstance(actual, (tuple, list)) and len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, e in pairs:
        if a.shape != e.shape:
            return math.inf
        a64, e64 = a.detach().double(), e.detach().double()
        if not torch.isfinite(a64).all():
            return math.inf
        denom = e64.norm().item()
        diff = (a64 - e64).norm().item()
        worst = max(worst, diff / denom if denom > 0 else diff)
    return worst


def results_match(actual, expected, workload: Workload) -> tuple[bool, float]:
    """(match, relative error): exact equality for data movement, the dtype's error bound otherwise."""
    if workload.exact:
        if isinstance(actual, (tuple, list)):
            pairs = list(zip(actual, expected)) if len(actual) == len(expected) else []
        else:
            pairs = [(actual, expected)]
        same = bool(pairs) and all(a.shape == e.shape and torch.equal(a, e) for a, e in pairs)
        return same, 0.0 if same else math.inf
    err = relative_error(actual, expected)
    return err <= REL_ERR_BOUND[workload.dtype], err


def _first_line(exc: BaseException, limit: int = 110) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:limit]


# ----------------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, reps: Optional[int] = None, quick: bool = False) -> float:
    """Median time of ``fn`` in ms. ``fn`` was already run once (the correctness check), so compilation and
    first-call allocations are out of the numbers; ``reps`` fixes the count of timed calls for slow steps."""
    if device.type == "cuda":
        if reps is None:
            import triton.testing

            rep = GPU_QUICK_REP_MS if quick else GPU_REP_MS
            return float(triton.testing.do_bench(fn, warmup=GPU_WARMUP_MS, rep=rep, return_mode="median"))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
    count = reps or (CPU_QUICK_REPS if quick else CPU_REPS)
    samples = []
    budget_end = time.perf_counter() + CPU_BUDGET_S
    for i in range(count):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if i >= CPU_QUICK_REPS - 1 and time.perf_counter() > budget_end:
            break
    return statistics.median(samples)


def measure_ceilings(device: torch.device) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and matmul rate, measured in this run."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    copy_elems = (512 if gpu else 8) * 2**20
    n = 8192 if gpu else 512
    src = torch.randn(copy_elems, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    dst.copy_(src), torch.mm(a, b)
    _sync(device)
    t_copy = time_ms(lambda: dst.copy_(src), device)
    t_mm = time_ms(lambda: torch.mm(a, b), device)
    return {
        "copy_GBps": 2 * src.numel() * src.element_size() / (t_copy * 1e-3) / 1e9,
        "matmul_TFLOPs": 2 * n**3 / (t_mm * 1e-3) / 1e12,
        "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
    }


# ----------------------------------------------------------------------------------------------------------------
# shared builders
# ----------------------------------------------------------------------------------------------------------------
def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _generator(device: torch.device, seed: int = SEED) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(gen, *shape, device, dtype):
    return torch.randn(*shape, generator=gen, device=device, dtype=dtype)


def _random_subset(gen, n: int, count: int, device) -> torch.Tensor:
    """``count`` distinct positions of ``range(n)`` in increasing order (int64)."""
    perm = torch.randperm(n, generator=gen, device=device)
    return perm[:count].sort().values


def _cu(lengths: Sequence[int], device) -> torch.Tensor:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _sdpa_backend(name: Optional[str]):
    from torch.nn.attention import SDPBackend

    return None if name is None else {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa(q, k, v, backend: Optional[str] = None, attn_mask=None):
    """SDPA on ``[B, H, L, D]`` tensors with one backend forced (None: PyTorch's own choice)."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _best_sdpa(device: torch.device) -> Optional[str]:
    """The fastest SDPA backend for plain attention on the device (cuDNN on a GPU; PyTorch's choice elsewhere)."""
    return "cudnn" if device.type == "cuda" else None


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """Packed ``[L, H, D]`` -> SDPA's ``[1, H, L, D]`` (a view, as diffusers passes it)."""
    return t.unsqueeze(0).transpose(1, 2)


def _flex_attention(device: torch.device):
    """FlexAttention, compiled on a GPU (the way it is meant to run), eager on the CPU (compiling there is slow)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention, "eager (CPU)"
    if not hasattr(_flex_attention, "compiled"):
        _flex_attention.compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_attention.compiled, "compiled"


def _block_mask(mask_mod, q_len: int, kv_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device)


def _sdpa_impls(names: Sequence[str], q4, k4, v4, device, output, *, attn_mask=None, label="sdpa {}") -> list:
    impls = []
    for name in names:
        skip = "math backend not timed on CUDA (materialises the scores)" if name == "math" and \
            device.type == "cuda" else ""
        impls.append(Impl(label.format(name),
                          lambda b=name: _sdpa(q4, k4, v4, b, attn_mask=attn_mask), output=output, skip=skip))
    return impls


class _Varlen:
    """A batch of samples: own tokens (text + target) followed by kept reference tokens, packed without padding.

    Holds the packed q/k/v (keys of the kept references copied in), the reference K/V buffer with the kept
    indices (for the gather path), and per-sample lengths.
    """

    def __init__(self, heads, dim, own, ref_tokens, kept_counts, device, dtype, gen):
        self.batch = len(kept_counts)
        self.heads, self.dim = heads, dim
        self.lengths = [own + k for k in kept_counts]
        self.own_lengths = [own] * self.batch
        self.kept_counts = list(kept_counts)
        total = sum(self.lengths)
        self.q = _randn(gen, total, heads, dim, device=device, dtype=dtype)
        self.ref_k = _randn(gen, self.batch, max(ref_tokens, 1), heads, dim, device=device, dtype=dtype)
        self.ref_v = _randn(gen, self.batch, max(ref_tokens, 1), heads, dim, device=device, dtype=dtype)
        own_k = _randn(gen, own * self.batch, heads, dim, device=device, dtype=dtype)
        own_v = _randn(gen, own * self.batch, heads, dim, device=device, dtype=dtype)
        picks = [_random_subset(gen, ref_tokens, k, device) for k in kept_counts]
        self.ref_index = (torch.cat(picks) if picks else torch.zeros(0, device=device)).to(torch.int32)
        # packed keys: each sample's own keys, then its kept reference keys in index order
        ks, vs = [], []
        for b, pick in enumerate(picks):
            ks += [own_k[b * own:(b + 1) * own], self.ref_k[b, pick]]
            vs += [own_v[b * own:(b + 1) * own], self.ref_v[b, pick]]
        self.k, self.v = torch.cat(ks).contiguous(), torch.cat(vs).contiguous()
        self.own_k, self.own_v = own_k, own_v
        self.cu = _cu(self.lengths, device)
        self.cu_own = _cu(self.own_lengths, device)
        self.cu_ref = _cu(self.kept_counts, device)
        self.max_len = max(self.lengths)

    def flops(self) -> float:
        return sum(4.0 * self.heads * length * length * self.dim for length in self.lengths)

    def sparsectx_packed(self, q=None, k=None, v=None):
        q, k, v = (self.q, self.k, self.v) if q is None else (q, k, v)
        return ops.sparse_attention(q, k, v, self.cu, self.cu, self.max_len, self.max_len, validate=False)

    def sparsectx_gather(self):
        return ops.sparse_attention(self.q, self.own_k, self.own_v, self.cu, self.cu_own, self.max_len,
                                    max(self.own_lengths), ref_k=self.ref_k, ref_v=self.ref_v,
                                    ref_index=self.ref_index, cu_seqlens_ref=self.cu_ref, validate=False)

    def slices(self):
        return [(int(a), int(b)) for a, b in zip(self.cu.tolist(), self.cu.tolist()[1:])]

    def padded(self, packed: torch.Tensor, gen) -> torch.Tensor:
        """``[B, Lmax, H, D]``: each sample's rows, then random rows (masked out as keys, ignored as queries)."""
        out = _randn(gen, self.batch, self.max_len, self.heads, self.dim, device=packed.device, dtype=packed.dtype)
        for b, (lo, hi) in enumerate(self.slices()):
            out[b, :hi - lo] = packed[lo:hi]
        return out

    def valid_rows(self) -> torch.Tensor:
        """Flat row indices of the real tokens in a ``[B * Lmax, ...]`` view of a padded tensor."""
        return torch.cat([torch.arange(length, device=self.cu.device) + b * self.max_len
                          for b, length in enumerate(self.lengths)])

    def key_mask(self) -> torch.Tensor:
        positions = torch.arange(self.max_len, device=self.cu.device)
        lengths = torch.tensor(self.lengths, device=self.cu.device)
        return positions[None, :] < lengths[:, None]


def _unpad(padded_bhld: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, H, Lmax, D]`` -> packed ``[T, H, D]`` real rows."""
    b, h, lmax, d = padded_bhld.shape
    return padded_bhld.transpose(1, 2).reshape(b * lmax, h, d).index_select(0, rows)


def _kept(fraction: float, n: int) -> int:
    """Kept reference tokens at a keep fraction (FACTS §1's shapes: L = 4812 at 5% of 4096)."""
    return int(fraction * n)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


# ----------------------------------------------------------------------------------------------------------------
# case: single-sample sparse attention forward (compacted and gather paths) vs SDPA backends on the compacted copy
# ----------------------------------------------------------------------------------------------------------------
class AttentionCase:
    name = "attention"
    title = "sparse attention forward, one sample: L = text + target + kept reference tokens"
    impl_names = ("sparsectx (compacted)", "sparsectx (gather)", "sdpa cudnn", "sdpa flash", "sdpa efficient",
                  "sdpa math")
    sizes = {
        "full": dict(heads=24, dim=128, text=512, target=4096, ref_tokens=4096,
                     configs=[(0, 1.0), (1, 0.05), (1, 0.25), (1, 1.0), (3, 0.25), (3, 1.0)],
                     quick=[(1, 0.25), (3, 0.25)]),
        "tiny": dict(heads=2, dim=64, text=16, target=64, ref_tokens=64,
                     configs=[(1, 0.25), (3, 0.25)], quick=[(1, 0.25)]),
    }

    def configs(self, size: str, quick: bool = False):
        return self.sizes[size]["quick" if quick else "configs"]

    def label(self, config) -> str:
        refs, keep = config
        return f"{refs}ref-{_pct(keep)}"

    def build(self, config, size: str, device: torch.device) -> Workload:
        refs, keep = config
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        own = s["text"] + s["target"]
        kept = refs * _kept(keep, s["ref_tokens"])
        data = _Varlen(s["heads"], s["dim"], own, refs * s["ref_tokens"], [kept], device, dtype, gen)
        q4, k4, v4 = (_heads_first(t) for t in (data.q, data.k, data.v))
        sdpa_out = lambda o: o.transpose(1, 2)[0]  # noqa: E731 - [1, H, L, D] -> [L, H, D]
        impls = [
            Impl("sparsectx (compacted)", data.sparsectx_packed, note="keys pre-compacted, contiguous"),
            Impl("sparsectx (gather)", data.sparsectx_gather, note="kept reference keys gathered by index",
                 skip="" if refs else "no reference tokens"),
            *_sdpa_impls(["cudnn", "flash", "efficient", "math"], q4, k4, v4, device, sdpa_out),
        ]
        length = data.lengths[0]
        shape = (f"L={length} ({refs} ref x {_pct(keep)}), H={s['heads']}, D={s['dim']}, "
                 f"{str(dtype).replace('torch.', '')}")
        return Workload(self.name, shape, impls, dtype, flops=data.flops())


# ----------------------------------------------------------------------------------------------------------------
# case: batch of 4 samples with different budgets, forward, one launch vs the ways to batch with SDPA
# ----------------------------------------------------------------------------------------------------------------
class BatchCase:
    name = "batch"
    title = "mixed-budget batch, forward: each sample text + target + 1 reference kept at its own budget"
    impl_names = ("sparsectx (packed varlen)", "sparsectx (gather)", "sdpa per-sample loop", "sdpa padded + key mask",
                  "nested jagged sdpa", "flash_attn varlen", "flex_attention document mask")
    sizes = {
        "full": dict(heads=24, dim=128, own=512 + 4096, ref_tokens=4096, keeps=(0.05, 0.10, 0.25, 0.50)),
        "tiny": dict(heads=2, dim=64, own=16 + 64, ref_tokens=64, keeps=(0.05, 0.10, 0.25, 0.50)),
    }

    def configs(self, size: str, quick: bool = False):
        return [self.sizes[size]["keeps"]]

    def label(self, config) -> str:
        return "keep-" + "-".join(_pct(k) for k in config)

    def build(self, config, size: str, device: torch.device) -> Workload:
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        data = _Varlen(s["heads"], s["dim"], s["own"], s["ref_tokens"], [_kept(k, s["ref_tokens"]) for k in config],
                       device, dtype, gen)
        best = _best_sdpa(device)
        views = [tuple(_heads_first(t[lo:hi]) for t in (data.q, data.k, data.v)) for lo, hi in data.slices()]

        def loop():
            return torch.cat([_sdpa(q, k, v, best).transpose(1, 2)[0] for q, k, v in views])

        padded = [data.padded(t, gen).transpose(1, 2) for t in (data.q, data.k, data.v)]
        key_mask = data.key_mask()[:, None, None, :]
        rows = data.valid_rows()

        flex, flex_mode = _flex_attention(device)
        doc = torch.repeat_interleave(torch.arange(data.batch, device=device),
                                      torch.tensor(data.lengths, device=device))
        block_mask = _block_mask(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], doc.numel(), doc.numel(),
                                 device)
        packed4 = [_heads_first(t) for t in (data.q, data.k, data.v)]

        offsets = data.cu.long()
        # on the CPU, SDPA on jagged tensors runs through a strided nested fallback that warns about its API
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
                  for t in (data.q, data.k, data.v)]
        impls = [
            Impl("sparsectx (packed varlen)", data.sparsectx_packed, note="one launch, no host sync"),
            Impl("sparsectx (gather)", data.sparsectx_gather, note="kept reference keys gathered by index"),
            Impl("sdpa per-sample loop", loop, note=f"backend {best or 'default'}"),
            Impl("sdpa padded + key mask", lambda: _sdpa(*padded, attn_mask=key_mask),
                 output=lambda o: _unpad(o, rows), note="padded to the longest sample"),
            Impl("nested jagged sdpa", lambda: F.scaled_dot_product_attention(*nested),
                 output=lambda o: o.transpose(1, 2).values()),
            _flash_attn_varlen_impl(data),
            # last: its compilation is the slowest step of the case
            Impl("flex_attention document mask", lambda: flex(*packed4, block_mask=block_mask),
                 output=lambda o: o.transpose(1, 2)[0], note=flex_mode),
        ]
        shape = (f"B=4, L={'/'.join(map(str, data.lengths))} (1 ref kept at "
                 f"{'/'.join(_pct(k) for k in config)}), H={s['heads']}, D={s['dim']}, "
                 f"{str(dtype).replace('torch.', '')}")
        return Workload(self.name, shape, impls, dtype, flops=data.flops())


def _flash_attn_varlen_impl(data: _Varlen) -> Impl:
    name = "flash_attn varlen"
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception as exc:  # the flash-attn package is optional
        return Impl(name, skip=f"flash-attn not importable ({type(exc).__name__})")
    return Impl(name, lambda: flash_attn_varlen_func(data.q, data.k, data.v, data.cu, data.cu, data.max_len,
                                                     data.max_len))


# ----------------------------------------------------------------------------------------------------------------
# case: training, forward + backward, batch of 4 with different budgets
# ----------------------------------------------------------------------------------------------------------------
class TrainingCase:
    name = "training"
    title = "training step of attention (forward + backward), batch of 4 with different budgets of 1 reference"
    impl_names = ("sparsectx (packed varlen)", "sdpa padded + key mask", "sdpa per-sample loop")
    sizes = {
        "full": dict(heads=32, dim=128, own=512 + 4096, ref_tokens=4096, keeps=(0.05, 0.30, 0.60, 1.0)),
        "tiny": dict(heads=2, dim=64, own=16 + 64, ref_tokens=64, keeps=(0.05, 0.30, 0.60, 1.0)),
    }

    def configs(self, size: str, quick: bool = False):
        return [self.sizes[size]["keeps"]]

    def label(self, config) -> str:
        return "keep-" + "-".join(_pct(k) for k in config)

    def build(self, config, size: str, device: torch.device) -> Workload:
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        data = _Varlen(s["heads"], s["dim"], s["own"], s["ref_tokens"], [_kept(k, s["ref_tokens"]) for k in config],
                       device, dtype, gen)
        leaves = [t.detach().clone().requires_grad_(True) for t in (data.q, data.k, data.v)]
        dout = _randn(gen, *data.q.shape, device=device, dtype=dtype)

        def sparse_step():
            out = data.sparsectx_packed(*leaves)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

        best = _best_sdpa(device)
        spans = data.slices()

        def loop_step():
            outs = [_sdpa(*(_heads_first(t[lo:hi]) for t in leaves), best).transpose(1, 2)[0] for lo, hi in spans]
            out = torch.cat(outs)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

        padded_leaves = [data.padded(t, gen).transpose(1, 2).detach().requires_grad_(True)
                         for t in (data.q, data.k, data.v)]
        dout_padded = torch.zeros_like(padded_leaves[0])
        rows = data.valid_rows()
        b, h, lmax, d = dout_padded.shape
        dout_padded.transpose(1, 2).reshape(b * lmax, h, d).index_copy_(0, rows, dout)
        key_mask = data.key_mask()[:, None, None, :]

        def padded_step():
            out = _sdpa(*padded_leaves, attn_mask=key_mask)
            return (out.detach(), *torch.autograd.grad(out, padded_leaves, dout_padded))

        impls = [
            Impl("sparsectx (packed varlen)", sparse_step),
            Impl("sdpa padded + key mask", padded_step, output=lambda r: tuple(_unpad(t, rows) for t in r),
                 note="padded to the longest sample"),
            Impl("sdpa per-sample loop", loop_step, note=f"backend {best or 'default'}"),
        ]
        shape = (f"B=4, L={'/'.join(map(str, data.lengths))} (1 ref kept at "
                 f"{'/'.join(_pct(k) for k in config)}), H={s['heads']}, D={s['dim']}, fwd+bwd, "
                 f"{str(dtype).replace('torch.', '')}")
        return Workload(self.name, shape, impls, dtype, flops=FWD_BWD_FLOP_FACTOR * data.flops())


# ----------------------------------------------------------------------------------------------------------------
# case: diffusers' dense layout + key keep-mask (the training form: dropped tokens stay in the tensors)
# ----------------------------------------------------------------------------------------------------------------
class MaskedCase:
    name = "masked"
    title = "dense layout [B, S, H, D] + key keep-mask: 3 references with 5% of their tokens kept"
    impl_names = ("sparsectx masked_attention", "sdpa bool key mask (cudnn)", "sdpa bool key mask (default)",
                  "sdpa bool key mask (efficient)", "ideal: sdpa on compacted keys", "flex_attention mask_mod",
                  "sparsectx masked_attention (query_mask)", "ideal: sdpa on compacted queries and keys")
    sizes = {
        "full": dict(heads=24, dim=128, own=512 + 4096, refs=3, ref_tokens=4096, keep=0.05),
        "tiny": dict(heads=2, dim=64, own=16 + 64, refs=3, ref_tokens=64, keep=0.05),
    }

    def configs(self, size: str, quick: bool = False):
        return ["all-queries", "kept-queries"]

    def label(self, config) -> str:
        return config

    def impl_names_for(self, config) -> tuple:
        split = self.impl_names.index("sparsectx masked_attention (query_mask)")
        return self.impl_names[:split] if config == "all-queries" else self.impl_names[split:]

    def build(self, config, size: str, device: torch.device) -> Workload:
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        seq = s["own"] + s["refs"] * s["ref_tokens"]
        heads, dim = s["heads"], s["dim"]
        q, k, v = (_randn(gen, 1, seq, heads, dim, device=device, dtype=dtype) for _ in range(3))
        key_mask = torch.zeros(1, seq, dtype=torch.bool, device=device)
        key_mask[0, :s["own"]] = True
        for r in range(s["refs"]):
            start = s["own"] + r * s["ref_tokens"]
            key_mask[0, start + _random_subset(gen, s["ref_tokens"], _kept(s["keep"], s["ref_tokens"]), device)] = True
        kept_rows = key_mask[0].nonzero().flatten()
        kept = kept_rows.numel()
        best = _best_sdpa(device)
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        kc4, vc4 = (t[:, kept_rows].transpose(1, 2) for t in (k, v))  # compacted copies (the ideal's input)
        to_dense = lambda o: o.transpose(1, 2)  # noqa: E731 - [B, H, S, D] -> [B, S, H, D]
        dt = str(dtype).replace("torch.", "")
        if config == "all-queries":
            flex, flex_mode = _flex_attention(device)
            block_mask = _block_mask(lambda b, h, q_idx, kv_idx: key_mask[b, kv_idx], seq, seq, device)
            attn_mask = key_mask[:, None, None, :]
            impls = [
                Impl("sparsectx masked_attention", lambda: ops.masked_attention(q, k, v, key_mask),
                     note="kept keys gathered by index"),
                *_sdpa_impls(["cudnn"], q4, k4, v4, device, to_dense, attn_mask=attn_mask,
                             label="sdpa bool key mask ({})"),
                Impl("sdpa bool key mask (default)", lambda: _sdpa(q4, k4, v4, attn_mask=attn_mask),
                     output=to_dense),
                *_sdpa_impls(["efficient"], q4, k4, v4, device, to_dense, attn_mask=attn_mask,
                             label="sdpa bool key mask ({})"),
                Impl("ideal: sdpa on compacted keys", lambda: _sdpa(q4, kc4, vc4, best), output=to_dense,
                     note=f"backend {best or 'default'}; keys compacted beforehand"),
                # last: its compilation is the slowest step of the case
                Impl("flex_attention mask_mod", lambda: flex(q4, k4, v4, block_mask=block_mask), output=to_dense,
                     note=flex_mode),
            ]
            shape = f"S={seq}, {kept} keys kept, all queries, H={heads}, D={dim}, {dt}"
            return Workload(self.name, shape, impls, dtype, flops=4.0 * heads * seq * kept * dim)
        qc4 = q[:, kept_rows].transpose(1, 2)
        impls = [
            Impl("sparsectx masked_attention (query_mask)",
                 lambda: ops.masked_attention(q, k, v, key_mask, query_mask=key_mask),
                 output=lambda o: o[0, kept_rows], note="dropped queries skipped"),
            Impl("ideal: sdpa on compacted queries and keys", lambda: _sdpa(qc4, kc4, vc4, best),
                 output=lambda o: o.transpose(1, 2)[0], note=f"backend {best or 'default'}; compacted beforehand"),
        ]
        shape = f"S={seq}, {kept} keys kept, kept queries only, H={heads}, D={dim}, {dt}"
        return Workload(self.name, shape, impls, dtype, flops=4.0 * heads * kept * kept * dim)


# ----------------------------------------------------------------------------------------------------------------
# case: token compaction (scores + budget -> packed hidden states and position ids)
# ----------------------------------------------------------------------------------------------------------------
class CompactionCase:
    name = "compaction"
    title = "token compaction: keep the top 10% of 3 references' tokens, pack hidden states and position ids"
    impl_names = ("sparsectx compact_tokens (scores+budget)", "sparsectx compact_tokens (keep mask)",
                  "x[mask] (host sync)", "index_select (precomputed indices)", "topk+sort+gather")
    sizes = {
        "full": dict(batch=1, tokens=3 * 4096, channels=3072, id_axes=4, keep=0.1),
        "tiny": dict(batch=1, tokens=3 * 64, channels=64, id_axes=4, keep=0.1),
    }

    def configs(self, size: str, quick: bool = False):
        return [self.sizes[size]["keep"]]

    def label(self, config) -> str:
        return f"keep-{_pct(config)}"

    def build(self, config, size: str, device: torch.device) -> Workload:
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        batch, n, channels = s["batch"], s["tokens"], s["channels"]
        scores = torch.rand(batch, n, generator=gen, device=device)
        hidden = _randn(gen, batch, n, channels, device=device, dtype=dtype)
        ids = torch.randint(0, 4096, (batch, n, s["id_axes"]), generator=gen, device=device)  # int64, as diffusers
        count = math.floor(config * n + 0.5)  # the op's rounding of a ratio budget
        top = scores.topk(count, dim=1).indices.sort(dim=1).values
        mask = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, top, True)
        flat = (top + torch.arange(batch, device=device)[:, None] * n).flatten()
        hidden_rows, ids_rows = hidden.reshape(batch * n, channels), ids.reshape(batch * n, -1)

        def topk_sort_gather():
            idx = scores.topk(count, dim=1).indices.sort(dim=1).values
            packed_hidden = torch.gather(hidden, 1, idx[..., None].expand(-1, -1, channels))
            packed_ids = torch.gather(ids, 1, idx[..., None].expand(-1, -1, ids.shape[-1]))
            return packed_hidden.reshape(-1, channels), packed_ids.reshape(-1, ids.shape[-1])

        packed = lambda c: c.tensors  # noqa: E731
        impls = [
            Impl("sparsectx compact_tokens (scores+budget)",
                 lambda: ops.compact_tokens(scores, hidden, ids, budget=config), output=packed, note="no host sync"),
            Impl("sparsectx compact_tokens (keep mask)", lambda: ops.compact_tokens(mask, hidden, ids),
                 output=packed, note="reads the kept total (host sync)"),
            Impl("x[mask] (host sync)", lambda: (hidden[mask], ids[mask])),
            Impl("index_select (precomputed indices)",
                 lambda: (hidden_rows.index_select(0, flat), ids_rows.index_select(0, flat)),
                 note="selection not included"),
            Impl("topk+sort+gather", topk_sort_gather),
        ]
        moved = (scores.numel() * scores.element_size()
                 + 2 * count * batch * (channels * hidden.element_size() + ids.shape[-1] * ids.element_size()))
        shape = (f"B={batch}, N={n}, C={channels} {str(dtype).replace('torch.', '')} + ids int64[{s['id_axes']}], "
                 f"keep {_pct(config)} ({count} rows)")
        return Workload(self.name, shape, impls, dtype, bytes_moved=moved, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# case: one denoising step of the real FLUX.2-klein-9B architecture with random weights
# ----------------------------------------------------------------------------------------------------------------
FLUX2_KLEIN_9B = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                      num_attention_heads=32, joint_attention_dim=12288, mlp_ratio=3.0,
                      axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
FLUX2_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=64, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8),
                  rope_theta=2000, guidance_embeds=False)
REFERENCE_TIME_STRIDE = 10  # FLUX.2: reference i has time coordinate 10 * (i + 1)
_MODEL_CACHE: dict = {}


def release_cached_models() -> None:
    """Drops the end-to-end case's model (call when done with the case)."""
    _MODEL_CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _DefaultDtype:
    """Parameters created inside are in ``dtype`` (no fp32 copy of a 9B-parameter model is ever made)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)


def _flux2_model(size: str, device: torch.device, dtype: torch.dtype):
    key = (size, str(device), dtype)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        from diffusers import Flux2Transformer2DModel

        config = FLUX2_KLEIN_9B if size == "full" else FLUX2_TINY
        # random weights created directly on the device in the benchmark dtype (initialisation runs there, fast)
        with torch.device(device), _DefaultDtype(dtype), torch.no_grad():
            model = Flux2Transformer2DModel(**config)
        _MODEL_CACHE[key] = model.eval()
    return _MODEL_CACHE[key]


def _grid_ids(side: int, time_coord: int, device) -> torch.Tensor:
    """FLUX.2 4-axis position ids (T, H, W, L) of a ``side x side`` latent grid."""
    hh, ww = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    ids = torch.zeros(side * side, 4, dtype=torch.int64, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = time_coord, hh.flatten(), ww.flatten()
    return ids


class EndToEndCase:
    name = "e2e"
    title = "one denoising step, FLUX.2-klein-9B architecture (random weights), kept reference tokens in the sequence"
    impl_names = ("sparsectx compact_tokens + step", "sparsectx.enable (sparsectx attn)",
                  "sparsectx.enable (native attn)", "torch topk+sort+index_select + step",
                  "keep all reference tokens", "no reference (limit)")
    sizes = {
        "full": dict(target_side=64, text=512, ref_side=64, refs=(3, 1), keeps=(0.25, 0.10, 0.05),
                     quick=[(1, 0.10), (3, 0.10)], reps=3),
        "tiny": dict(target_side=8, text=16, ref_side=8, refs=(1, 3), keeps=(0.25, 0.05), quick=[(1, 0.25)],
                     reps=None),
    }

    def configs(self, size: str, quick: bool = False):
        s = self.sizes[size]
        return s["quick"] if quick else [(r, k) for r in s["refs"] for k in s["keeps"]]

    def label(self, config) -> str:
        refs, keep = config
        return f"{refs}ref-{_pct(keep)}"

    def build(self, config, size: str, device: torch.device) -> Workload:
        refs, keep = config
        s = self.sizes[size]
        dtype, gen = _dtype_for(device), _generator(device)
        model = _flux2_model(size, device, dtype)
        cfg = model.config
        channels, n_target, n_ref = cfg.in_channels, s["target_side"] ** 2, s["ref_side"] ** 2
        target = _randn(gen, 1, n_target, channels, device=device, dtype=dtype)
        ref_latents = _randn(gen, refs, n_ref, channels, device=device, dtype=dtype)
        text = _randn(gen, 1, s["text"], cfg.joint_attention_dim, device=device, dtype=dtype)
        text_ids = torch.zeros(1, s["text"], 4, dtype=torch.int64, device=device)
        text_ids[0, :, 3] = torch.arange(s["text"], device=device)
        target_ids = _grid_ids(s["target_side"], 0, device)[None]
        ref_ids = torch.stack([_grid_ids(s["ref_side"], REFERENCE_TIME_STRIDE * (i + 1), device) for i in range(refs)])
        timestep = torch.full((1,), 0.5, device=device, dtype=dtype)
        scores = torch.rand(refs, n_ref, generator=gen, device=device)  # a random selector, per reference image
        count = math.floor(keep * n_ref + 0.5)

        def step(latents, ids):
            with torch.inference_mode():
                out = model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, img_ids=ids,
                            txt_ids=text_ids, return_dict=False)[0]
            return out[:, :n_target]

        def with_refs(packed_latents, packed_ids):
            return step(torch.cat([target, packed_latents.reshape(1, -1, channels)], 1),
                        torch.cat([target_ids, packed_ids.reshape(1, -1, 4)], 1))

        def sparsectx_step():
            kept = ops.compact_tokens(scores, ref_latents, ref_ids, budget=count)
            return with_refs(*kept.tensors)

        def torch_step():
            idx = scores.topk(count, dim=1).indices.sort(dim=1).values
            lat = torch.stack([ref_latents[i].index_select(0, idx[i]) for i in range(refs)])
            ids = torch.stack([ref_ids[i].index_select(0, idx[i]) for i in range(refs)])
            return with_refs(lat, ids)

        impls = [
            Impl("sparsectx compact_tokens + step", sparsectx_step, note="compaction inside the timed step"),
            *(_enable_impl(model, lambda: with_refs(ref_latents, ref_ids), scores, count, attention)
              for attention in ("sparsectx", "native")),
            Impl("torch topk+sort+index_select + step", torch_step, note="the compacted ideal"),
            Impl("keep all reference tokens", lambda: with_refs(ref_latents, ref_ids), comparable=False,
                 note="100% kept (a different output by design)", shared_key=(self.name, refs, "all")),
            Impl("no reference (limit)", lambda: step(target, target_ids), comparable=False,
                 note="lower bound of any selection", shared_key=(self.name, "none")),
        ]
        shape = (f"{refs} ref x {_pct(keep)} ({refs * count} of {refs * n_ref} tokens), target {n_target}, "
                 f"text {s['text']}, {'klein-9B' if size == 'full' else 'tiny'} {str(dtype).replace('torch.', '')}")
        return Workload(self.name, shape, impls, dtype, reps=s["reps"], track_memory=True)


def impl_names_for(case, config) -> tuple:
    """The implementations a config's workload holds (all of the case's, unless the case splits them)."""
    return case.impl_names_for(config) if hasattr(case, "impl_names_for") else case.impl_names


def param_grid(case_name: str, size: Optional[str] = None) -> dict:
    """pytest parametrisation of a case: ``argvalues`` (config, implementation) pairs and readable ``ids``."""
    case = CASES[case_name]
    pairs = [(config, impl) for config in case.configs(size or default_size()) for impl in impl_names_for(case, config)]
    return {"argvalues": pairs, "ids": [f"{case.label(config)}-{impl}" for config, impl in pairs]}


def _enable_impl(model, full_step: Callable[[], Any], scores: torch.Tensor, count: int, attention: str) -> Impl:
    """The drop-in path: ``sparsectx.sparse_context`` around a step that passes every reference token, with a
    selector returning ``scores`` (so it keeps the same tokens as the other implementations). Enabled and disabled
    around each call: the model is shared with the other implementations (that overhead is timed too)."""
    name = f"sparsectx.enable ({attention} attn)"
    try:
        from .integration import sparse_context
    except Exception as exc:  # the integration depends on diffusers internals
        return Impl(name, skip=f"sparsectx.integration not importable ({_first_line(exc)})")
    flat_scores = scores.reshape(1, -1)  # the references' tokens in sequence order, one sample

    def selector(reference_latents, context):
        return flat_scores.expand(reference_latents.shape[0], -1)

    def step():
        with sparse_context(model, budget=count, selector=selector, attention=attention):
            return full_step()

    return Impl(name, step, note="selection + compaction + step, per call")


CASES = {case.name: case for case in (AttentionCase(), CompactionCase(), BatchCase(), MaskedCase(), TrainingCase(),
                                      EndToEndCase())}


# ----------------------------------------------------------------------------------------------------------------
# running a workload
# ----------------------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_size(device: Optional[torch.device] = None) -> str:
    device = device or default_device()
    return "full" if device.type == "cuda" else "tiny"


def _row(workload: Workload, impl: Impl, **values) -> dict:
    row = dict(case=workload.case, shape=workload.shape, impl=impl.name, time_ms=None, tflops=None, gbps=None,
               ratio=None, ok=None, err=None, peak_mem_gb=None, note=impl.note)
    row.update(values)
    return row


def run_workload(workload: Workload, device: torch.device, *, quick: bool = False, shared: Optional[dict] = None,
                 on_row: Optional[Callable[[list], None]] = None) -> list:
    """Checks every implementation against sparsectx's result, then times it. Returns one row per implementation
    (plus a bytes-moved floor row when the workload moves data). ``shared`` carries timings between workloads
    and the measured ceilings; ``on_row(rows)`` is called after each row (a run cut short keeps what it had)."""
    shared = {} if shared is None else shared
    rows: list = []

    def add(row: dict) -> None:
        _complete_row(workload, row, rows[0]["time_ms"] if rows else row["time_ms"])
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    primary = workload.impls[0]
    try:
        expected = primary.output(primary.fn())
    except Exception as exc:  # sparsectx failed: report it, time nothing
        add(_row(workload, primary, ok=False, note=f"error: {_first_line(exc)}"))
        return rows
    for impl in workload.impls:
        if impl.skip:
            add(_row(workload, impl, note=f"unavailable: {impl.skip}"))
            continue
        if impl.shared_key is not None and impl.shared_key in shared:
            add(_row(workload, impl, **shared[impl.shared_key]))
            continue
        values = {}
        try:
            if impl is not primary:
                result = impl.output(impl.fn())
                if impl.comparable:
                    ok, err = results_match(result, expected, workload)
                    values.update(ok=ok, err=err)
                    if not ok:
                        values["note"] = f"MISMATCH with sparsectx (rel err {err:.2e}); {impl.note}".rstrip("; ")
                del result
            if workload.track_memory and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            values["time_ms"] = time_ms(impl.fn, device, reps=workload.reps, quick=quick)
            if workload.track_memory and device.type == "cuda":
                values["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        except Exception as exc:  # sparsectx failing is an error; a peer failing is one this setup lacks
            failed = impl is primary
            add(_row(workload, impl, ok=False if failed else None,
                     note=f"{'error' if failed else 'unavailable'}: {_first_line(exc)}"))
            continue
        if impl.shared_key is not None:
            shared[impl.shared_key] = {k: values[k] for k in ("time_ms", "peak_mem_gb") if k in values}
        add(_row(workload, impl, **values))
    del expected
    ceilings = shared.get("ceilings")
    if workload.bytes_moved and ceilings:
        floor_ms = workload.bytes_moved / (ceilings["copy_GBps"] * 1e9) * 1e3
        add(_row(workload, Impl("bytes-moved floor"), time_ms=floor_ms,
                 note=f"{workload.bytes_moved / 1e6:.1f} MB at the copy rate measured in this run"))
    return rows


def _complete_row(workload: Workload, row: dict, base_ms: Optional[float]) -> None:
    """Fills the throughput columns and the ratio to sparsectx's time."""
    t = row["time_ms"]
    if t is None:
        return
    if workload.flops:
        row["tflops"] = workload.flops / (t * 1e-3) / 1e12
    if workload.bytes_moved:
        row["gbps"] = workload.bytes_moved / (t * 1e-3) / 1e9
    if base_ms:
        row["ratio"] = t / base_ms


class Unavailable(Exception):
    """An implementation that this workload, device or torch version does not offer."""


def checked_run(workload: Workload, impl_name: str) -> tuple:
    """Runs one implementation once (for pytest-benchmark). Returns ``(fn, result, expected)``: the callable to
    time, its result, and the result it must match: sparsectx's for a peer, the first peer's that runs here for
    sparsectx itself. (A peer with ``comparable=False`` computes a different function by design: its result only
    shares sparsectx's shape.) Raises ``Unavailable`` when the implementation does not run here."""
    impl = workload.impl(impl_name)
    if impl is None:
        raise Unavailable(f"{impl_name} is not part of this workload")
    if impl.skip:
        raise Unavailable(impl.skip)
    primary = workload.impls[0]
    if impl is primary:
        result = primary.output(primary.fn())
        for peer in workload.impls[1:]:
            if peer.skip or not peer.comparable:
                continue
            try:
                return impl.fn, result, peer.output(peer.fn())
            except Exception:  # a peer this device does not offer: try the next one
                continue
        raise Unavailable("no peer runs here to check sparsectx against")
    try:
        result = impl.output(impl.fn())
    except Exception as exc:
        raise Unavailable(_first_line(exc)) from exc
    expected = primary.output(primary.fn())
    return impl.fn, result, expected


def run_case(name: str, device: torch.device, size: str, *, quick: bool = False, shared: Optional[dict] = None,
             progress=None, on_rows: Optional[Callable[[list], None]] = None) -> list:
    """All workloads of a case; ``on_rows(case_rows)`` after each row, for incremental JSON."""
    case = CASES[name]
    rows = []
    shared = {} if shared is None else shared
    try:
        for config in case.configs(size, quick):
            if progress is not None:
                progress.set_postfix_str(case.label(config))
            try:
                workload = case.build(config, size, device)
            except Exception as exc:
                rows.append(dict(case=name, shape=case.label(config), impl="(setup)", time_ms=None, tflops=None,
                                 gbps=None, ratio=None, ok=False, err=None, peak_mem_gb=None,
                                 note=f"error: {_first_line(exc)}"))
            else:
                done = list(rows)
                report = (lambda current: on_rows(done + current)) if on_rows is not None else None
                rows += run_workload(workload, device, quick=quick, shared=shared, on_row=report)
                del workload
            if progress is not None:
                progress.update(1)
    finally:
        if name == EndToEndCase.name:
            release_cached_models()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# report: table, JSON, plot
# ----------------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec's field for a missing value."""
    if value is None:
        width = int(re.match(r"\d*", spec).group() or 0)
        return "-".rjust(width)
    return format(value, spec)


def format_table(rows: list) -> str:
    """Readable table: one block per (case, shape); time, throughput, ratio vs sparsectx, check."""
    lines = []
    blocks: dict = {}
    for row in rows:
        blocks.setdefault((row["case"], row["shape"]), []).append(row)
    for (case, shape), block in blocks.items():
        unit = "GB/s" if any(r["gbps"] for r in block) else "TFLOP/s"
        mem = any(r.get("peak_mem_gb") for r in block)
        lines.append(f"{case} | {shape}")
        head = f"  {'implementation':<42} {'time ms':>10} {unit:>8} {'ratio':>7}"
        lines.append(head + (f" {'peak GiB':>8}" if mem else "") + "  check / note")
        for r in block:
            rate = r["gbps"] if unit == "GB/s" else r["tflops"]
            check = "" if r["ok"] is None else ("ok" if r["ok"] else "FAIL")
            if r["err"] is not None and r["ok"] and r["err"] > 0:
                check += f" {r['err']:.0e}"
            note = "; ".join(x for x in (check.strip(), r["note"]) if x)
            line = (f"  {r['impl']:<42} {_fmt(r['time_ms'], '10.4g')} {_fmt(rate, '8.4g')} "
                    f"{_fmt(r['ratio'], '7.2f')}")
            lines.append(line + (f" {_fmt(r.get('peak_mem_gb'), '8.1f')}" if mem else "") + f"  {note}")
        lines.append("")
    return "\n".join(lines)


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(device: torch.device, size: str, quick: bool, cases: Sequence[str]) -> dict:
    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return None

    from . import __version__

    gpu = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine()),
        "driver": _driver_version() if gpu else None,
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "sparsectx": __version__,
        "sparsectx_path": {str(dt).replace("torch.", ""): ops.backend_for(device, dt)
                           for dt in (torch.float16, torch.bfloat16, torch.float32)},
        "size": size,
        "quick": quick,
        "cases": list(cases),
        "timing": ("median of CUDA-event timings (triton.testing.do_bench)" if gpu
                   else "median of time.perf_counter"),
        "ratio": RATIO_MEANING,
        "command": " ".join(sys.argv),
    }


def write_json(path: str, meta: dict, rows: list) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    os.replace(tmp, path)  # a run cut short by a timeout still leaves the last complete file


def write_plot(path: str, rows: list) -> str:
    """Horizontal bars of each peer's ratio vs sparsectx. Returns a message (the plot is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot skipped: matplotlib is not installed (pip install matplotlib) - {path} not written"
    peers = [r for r in rows if r["ratio"] is not None and not r["impl"].startswith("sparsectx")]
    if not peers:
        return "plot skipped: no peer was timed"
    labels = [f"{r['case']}: {r['impl']} [{r['shape'].split(',')[0]}]" for r in peers]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(peers) + 1.5))
    ax.barh(range(len(peers)), [r["ratio"] for r in peers], color=["tab:green" if r["ratio"] >= 1 else "tab:red"
                                                                   for r in peers])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(peers)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("peer time / sparsectx time (> 1: sparsectx faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ----------------------------------------------------------------------------------------------------------------
# command line (``sparsectx bench``)
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", action="extend", nargs="+", choices=CASE_ORDER, metavar="NAME",
                        help=f"cases to run (default all, run in this order: {', '.join(CASE_ORDER)})")
    parser.add_argument("--json", metavar="PATH",
                        help="write rows and run metadata as JSON (rewritten as rows come, so a cut run keeps them)")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart of the ratios (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--size", choices=SIZES, help="tiny (CPU default) or full (GPU default: the real shapes)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = torch.device(args.device) if args.device else default_device()
    size = args.size or default_size(device)
    names = [n for n in CASE_ORDER if n in args.case] if args.case else list(CASE_ORDER)
    meta = run_metadata(device, size, args.quick, names)
    shared = {"ceilings": measure_ceilings(device)}
    meta["ceilings"] = shared["ceilings"]
    print(f"sparsectx bench on {meta['device']} ({device}), size {size}{' quick' if args.quick else ''}; "
          f"torch {meta['torch']}, triton {meta['triton']}; sparsectx path {meta['sparsectx_path']}")
    print(f"ceilings measured now: copy {meta['ceilings']['copy_GBps']:.0f} GB/s (read + write), matmul "
          f"{meta['ceilings']['matmul_TFLOPs']:.3g} TFLOP/s ({meta['ceilings']['matmul']}); {RATIO_MEANING}\n")
    rows: list = []
    total = sum(len(CASES[n].configs(size, args.quick)) for n in names)
    # the bar is drawn on a terminal only (disable=None), so logs keep only the tables
    with tqdm(total=total, desc="bench", unit="shape", file=sys.stderr, disable=None) as progress:
        for name in names:
            progress.set_description(name)
            done = list(rows)
            save = (lambda case_rows: write_json(args.json, meta, done + case_rows)) if args.json else None
            case_rows = run_case(name, device, size, quick=args.quick, shared=shared, progress=progress,
                                 on_rows=save)
            rows += case_rows
            tqdm.write(f"== {CASES[name].title}\n{format_table(case_rows)}")
            if args.json:
                write_json(args.json, meta, rows)
    if args.json:
        print(f"JSON written to {args.json}")
    if args.plot:
        print(write_plot(args.plot, rows))
    failed = [r for r in rows if r["ok"] is False]
    for r in failed:
        print(f"FAILED: {r['case']} | {r['shape']} | {r['impl']}: {r['note']}", file=sys.stderr)
    return 1 if failed else 0
