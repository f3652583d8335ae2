"""Compile every Triton kernel for an NVIDIA GPU, on a machine without one: ``sparsectx compile-check``.

A GPU is needed to *run* a kernel, not to compile it: Triton lowers a kernel to PTX and ``ptxas`` (shipped inside
Triton's wheel) assembles it for any ``sm_XX`` on the CPU. This check drives the real launchers of ``kernels/``
(``attention_forward``, ``attention_backward``, ``attention_key_mass``, ``rms_norm_rope``, ``rope_tables``,
``compact_index``, ``gather_rows``, ``scatter_rows``, ``ranked_keep_mask``) with CPU tensors over the variants the
public ops launch (dtypes, head dims, reference layouts, selection paths), with every launch turned into a compile
for the chosen architecture (nothing runs, nothing is read back), and every autotune candidate compiled, not
measured. It reports per compiled kernel: registers per thread, spilled bytes (stack; a known local array apart)
and shared memory, next to the architecture's per-block shared memory limit; with ``--loops``, what one step of
each of its loops holds (instructions, barriers, shuffles, shared-memory stores and loads, from its SASS).

What it catches before any GPU time is spent: a kernel that does not compile with the installed Triton for that
architecture (an API or lowering difference between releases), a config whose shared memory exceeds what a block
may use (the launch would fail, or the autotuner would silently drop the candidate), and register spills (slow).
What it can not tell: whether the results are right or how fast the kernels run (that needs the GPU tests and
``bench/``).

    sparsectx compile-check                     # sm_90 (H100/H200), every autotune candidate
    sparsectx compile-check --arch 80 --first-config --json out.json
    sparsectx compile-check --quick --jobs 8    # 8 processes side by side, the same table

The binaries land in Triton's cache, as any compile's do: on a GPU machine of that arch, a later launch whose arguments
specialise as the check's do loads its binary instead of compiling it (``bench/gpu_check.sh`` builds ahead that way).

Runs in a child process without ``TRITON_INTERPRET`` when the parent has it set (the kernel modules keep the mode
they were imported in). Uses Triton's own launch path (argument specialisation, autotune configs, compile options)
with a stand-in driver that names the target; tested with Triton 3.6 and 3.9.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

from .kernels._launch import autotune_all_configs, interpreter_requested

# Largest shared memory one block may use (dynamic, opt-in), bytes, per compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"). A compiled kernel above it fails to launch there.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Shapes of the compile-only launches: realistic strides (Triton specialises integers and pointers on divisibility
# by 16, and the kernels' code depends on it), tiny extents (nothing is computed).
HEADS = 24
SEQ = 64
# The norm + RoPE kernels take the head count as a constexpr (one binary per count, and per dtype of the rows and of
# the weights): the (rows, weights, heads) the supported models run at head dim 128 besides ``HEADS`` in each checked
# dtype. klein-9B, Qwen-Image 2.1 and GLM-Image have 32 heads, Z-Image 30 (bf16); FLUX.3 normalises fp32 rows (24
# heads), with fp32 weights or with its bf16 model's.
MODEL_NORM_ROPE_FORMS = (("bf16", "bf16", 32), ("bf16", "bf16", 30), ("fp32", "fp32", HEADS), ("fp32", "bf16", HEADS))
# The calls of ``rms_norm_rope`` in sparsectx/processors.py (each a binary: the flags are constexprs): (a text
# prefix, norm weights, a table value per pair, diffusers' rounding before the weight, its backward compiled too)
NORM_ROPE_FORMS = (
    (True, True, False, False, True),    # FLUX joint blocks: [text, image], each stream with its own norm
    (False, True, False, False, True),   # FLUX single-stream blocks; FLUX.3 (its fp32 norms)
    (False, True, False, True, False),   # Bria FIBO's single-stream blocks (diffusers' RMSNorm)
    (True, True, True, True, True),      # Qwen-Image's joint [text, image] (complex frequencies)
    (False, True, True, True, True),     # Qwen-Image per stream; Z-Image per sample
    (False, False, False, False, True),  # norms without weights
)
MODEL_WIDTH = 3072
# What the public ops launch: fp16/bf16/fp32 (fp32 with IEEE-precision dots); head dims 64 and 128 (the supported
# models), 40 and 160 (not powers of two: masked tails, below and above 128), 256 (the largest the ops accept).
_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (40, 64, 128, 160, 256)
# Kernels whose stack frame holds a local array rather than spilled registers, up to this many bytes: the float64
# cosine and sine of ``_rope_tables_kernel`` (libdevice's reduction of large angles keeps a few doubles in local
# memory; sm_90: 48 B with Triton 3.6, 40 B with 3.9; the same kernel without them has no stack at all). A larger
# frame counts the rest as spilled.
LOCAL_ARRAY_BYTES = {"_rope_tables_kernel": 48}
# set in the environment of the child process the command starts (``main``): the child must not start another
CHILD_MARK = "SPARSECTX_COMPILE_CHECK_CHILD"


@dataclasses.dataclass
class Compiled:
    """One compiled kernel binary (one launch variant x one autotune candidate)."""
    variant: str            # the launch that compiled it, e.g. "attention bf16 D=128 gathered refs"
    kernel: str             # the @triton.jit function
    config: str             # block sizes and other constexprs that differ between candidates, warps, stages
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None   # stack frame: registers spilled to local memory (LOCAL_ARRAY_BYTES apart)
    shared_bytes: Optional[int] = None  # what a block needs: the launch's dynamic shared memory + the binary's static
    seconds: Optional[float] = None     # compile time (short when Triton's cache had the binary)
    error: Optional[str] = None         # compile error (then the resource fields are None)
    candidate: Optional[int] = None     # index in the autotuner's candidate list (None: not autotuned)
    local_array_bytes: int = 0          # the part of the stack frame that is a known local array (LOCAL_ARRAY_BYTES)
    fp_fusion: Optional[bool] = None    # compiled with FMA contraction (kernels/_launch.py's COMPILE_OPTIONS)
    loops: Optional[list] = None        # with ``loops=True``: what one step of each loop of the SASS holds (``_loops``)
    binary: Optional[str] = None        # Triton's hash of the binary (its cache key): one row per binary


# ----------------------------------------------------------------------------------------------------------------
# the compile-only launch path
# ----------------------------------------------------------------------------------------------------------------
class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver while compiling: it names the target, a device of its own and stream 0;
    anything that would touch a GPU (a launch, a benchmark) is never reached because every launch is a warm-up. The
    device is a name per target: a kernel keeps its compiled binaries per device, so binaries compiled for one arch
    (or for a real GPU of this process) are never handed out for another."""

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def get_current_device(self):
        return f"compile-check:{self._target.backend}:{self._target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):  # pragma: no cover - autotuning is replaced by compiling every candidate
        raise RuntimeError("compile-check does not measure")


@contextlib.contextmanager
def _compile_only(arch: int, record: Callable) -> Iterator[None]:
    """Within the block, every ``kernel[grid](...)`` compiles for ``sm_<arch>`` instead of launching, and an
    autotuned kernel compiles each of its candidates; ``record(jit_function, kwargs, compiled_kernel, seconds,
    candidate, error)`` sees each (``kwargs``: the launch's keyword arguments, constexprs and the candidate's block
    sizes; ``candidate``: its index in the autotuner's list, or None; on a compile error ``compiled_kernel`` is None
    and ``error`` the exception). A candidate of an untimed launch (``list_place``: one config of a kernel's list,
    see kernels/attention.py's ``_FirstThatLaunches``) whose binary needs more shared memory than the arch gives a
    block raises ``OutOfResources`` after its compile, as Triton's launcher does on such a GPU, so that the launch
    goes on to compile its next candidate; the last one does not (``problems`` names a list none of which fits, and
    the launcher goes on with its other kernels)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    jit_run, tuner_run, active = JITFunction.run, Autotuner.run, getattr(driver, "_active", None)
    candidate = [None]  # the autotune candidate being compiled (None outside an autotuned launch)

    def compile_instead(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        try:
            compiled = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
        except Exception as e:  # this kernel's finding: the launcher goes on with its other kernels
            record(self, kwargs, None, time.perf_counter() - start, candidate[0], e)
            return None
        record(self, kwargs, compiled, time.perf_counter() - start, candidate[0], None)
        return compiled

    limit = SHARED_MEMORY_LIMIT.get(arch)

    def every_candidate(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        position, length = getattr(self, "list_place", (0, None))  # (length: an untimed launch's candidate)
        for index, config in enumerate(self.configs):  # in the autotuner's order
            candidate[0] = position + index
            if config.pre_hook is not None:  # as the autotuner: e.g. tensor descriptors take the config's tile shape
                config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
            try:
                compiled = self.fn.run(*args, warmup=True, **kwargs, **config.all_kwargs())
            finally:
                candidate[0] = None
            if (length is not None and position < length - 1 and limit is not None and compiled is not None
                    and compiled.metadata.shared > limit):
                raise OutOfResources(compiled.metadata.shared, limit, "shared memory")

    driver.set_active(_TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run, Autotuner.run = compile_instead, every_candidate
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver.set_active(active)  # None: the real driver is looked up at its next use, as before


def _cuobjdump() -> str:
    """Path of the ``cuobjdump`` Triton ships with its NVIDIA backend."""
    from triton import knobs
    from triton.backends.nvidia import compiler

    tool = getattr(knobs.nvidia, "cuobjdump", None)
    path = getattr(tool, "path", None)
    return path or os.path.join(os.path.dirname(compiler.__file__), "bin", "cuobjdump")


def _cuobjdump_output(cubin: bytes, option: str) -> str:
    """What ``cuobjdump <option>`` prints of a compiled binary."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_cuobjdump(), option, path], capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, stack bytes, static shared memory bytes) of a compiled binary, as
    ``cuobjdump -res-usage`` reads them from it (a stack frame in these kernels, which keep no local arrays of their
    own, is spilled registers, but for the math library's in ``LOCAL_ARRAY_BYTES``; the static shared memory counts
    against a block's limit beside the launch's dynamic shared memory)."""
    usage = _cuobjdump_output(cubin, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/SHARED line: {usage[-300:]!r}")
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


# what a loop step's SASS is counted for: opcode families (the opcode before its first dot) per field of ``_loops``
LOOP_OPCODES = {"barriers": ("BAR",), "shuffles": ("SHFL",), "shared_stores": ("STS", "STSM"),
                "shared_loads": ("LDS", "LDSM")}


def _loops(cubin: bytes) -> list[dict]:
    """The loops of a compiled binary, read from its SASS (``cuobjdump -sass``: about 0.4 s a binary): one dict per
    loop, in address order, with ``instructions`` (in one step: from the loop's head to the branch back to it, inner
    loops counted once) and the ``LOOP_OPCODES`` counts among them. A loop is a branch to an earlier address with
    no unconditional ``EXIT`` between them (a block placed after the kernel's end jumps back into it); instructions
    predicated on ``!PT`` (never executed: padding) do not count."""
    return _sass_loops(_cuobjdump_output(cubin, "-sass"))


def _sass_code(sass: str) -> list[tuple]:
    """The instructions of a SASS listing (lines ``/*addr*/ [@pred] OPCODE operands ;``), in address order:
    ``(address, predicate, opcode, operands)``."""
    code = []
    for line in sass.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if found:
            code.append((int(found.group(1), 16), (found.group(2) or "").strip(), found.group(3), found.group(4)))
    return code


def _sass_loops(sass: str) -> list[dict]:
    """``_loops`` of a SASS listing (``_sass_code``)."""
    code = _sass_code(sass)
    where = {address: i for i, (address, *_) in enumerate(code)}
    ends: dict = {}  # first instruction of a loop -> its last (the branch back furthest down)
    for i, (address, _, opcode, operands) in enumerate(code):
        # (the target is the last operand: ``BRA 0x4840``, ``BRA P4, 0x23e0``)
        found = re.search(r"(0x[0-9a-f]+)\s*$", operands) if opcode.split(".")[0] == "BRA" else None
        target = int(found.group(1), 16) if found else None
        if target is not None and target < address and target in where:
            ends[where[target]] = max(ends.get(where[target], i), i)
    loops = []
    for first, last in sorted(ends.items()):
        if any(opcode == "EXIT" and not predicate for _, predicate, opcode, _ in code[first:last]):
            continue  # a block placed after the kernel's end (e.g. a wait) that jumps back into it: no loop
        executed = [opcode.split(".")[0] for _, predicate, opcode, _ in code[first:last + 1] if predicate != "@!PT"]
        loops.append({"instructions": len(executed),
                      **{name: sum(op in families for op in executed) for name, families in LOOP_OPCODES.items()}})
    return loops


def _config_label(kwargs: dict) -> str:
    """The compile parameters that tell one binary of a variant from another: block sizes, payload count, the
    flags that are on, warps and stages (Triton's defaults, 4 and 3, where the launch sets none)."""
    shown = [f"{name}={value}" for name, value in sorted(kwargs.items())
             if name.startswith("BLOCK") or name == "NUM_PAYLOADS"]
    shown += [name for name, value in sorted(kwargs.items()) if value is True and name.isupper()]
    return " ".join(shown + [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"])


def _error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}".rstrip(": ")


# ----------------------------------------------------------------------------------------------------------------
# the variants the public ops launch
# ----------------------------------------------------------------------------------------------------------------
def _attention_variants(dtypes, head_dims):
    """(label, launch) pairs: forward and backward of the three key layouts, per dtype and head dim; and, where the
    forward loads contiguous keys by tile copies (fp16/bf16, head dims that are powers of two up to 128), the same
    without references on keys whose heads are not adjacent (the per-element pointer loads of such layouts). There
    the forward of gathered references is the copy of their kept rows and the packed layout's forward, and a
    reference buffer whose heads are not adjacent is gathered in place (its own variant), and packed references
    with no own keys (``masked_attention``'s kept keys) load only the references by tile copies. "queries in place": the
    forward of ``masked_attention``'s kept queries, read from and written to dense ``[B, S, H, D]`` tensors by
    index (no backward). "gathered refs, one sample": the usual inference call (one sample, token counts a multiple
    of 16 and not, a kept count not), whose kernels Triton specialises otherwise (the backward's row pass and the
    copy of the kept rows on their sample count, 1: the others take the same binaries; no kernel specialises on the
    counts of tokens a request keeps)."""
    import torch

    from .kernels.attention import _row_descriptors, attention_backward, attention_forward

    for name in dtypes:
        dtype = getattr(torch, _DTYPE_NAMES[name])
        for dim in head_dims:
            layouts = ["no refs", "gathered refs", "packed refs", "queries in place",
                       "gathered refs, one sample"]
            if _row_descriptors(*(torch.zeros(1, HEADS, dim, dtype=dtype),) * 2)[0] is not None:
                # (and the packed layout with no own keys: masked_attention's kept keys, all packed as references,
                # loaded by tile copies while the own keys' loads are not)
                layouts += ["no refs, keys by pointers", "gathered refs, heads apart", "packed refs, no own keys"]
            for refs in layouts:
                def launch(dtype=dtype, dim=dim, refs=refs):
                    def rows(*shape):
                        return torch.zeros(*shape, HEADS, dim, dtype=dtype)
                    q, k, v = rows(2 * SEQ), rows(2 * SEQ), rows(2 * SEQ)
                    if refs == "no refs, keys by pointers":  # heads 2*D apart: no [rows, H*D] view to copy tiles of
                        k, v = (torch.zeros(2 * SEQ, HEADS, 2 * dim, dtype=dtype)[..., :dim] for _ in range(2))
                    cu = cu_k = torch.tensor([0, SEQ, 2 * SEQ], dtype=torch.int32)
                    if refs == "packed refs, no own keys":
                        k, v, cu_k = rows(0), rows(0), torch.zeros(3, dtype=torch.int32)
                    if refs == "queries in place":
                        attention_forward(rows(2, SEQ), k, v, cu, cu, SEQ, None, None, None, None, dim ** -0.5,
                                          q_index=torch.zeros(2 * SEQ, dtype=torch.int32))
                        return
                    ref_k = ref_v = ref_index = cu_r = None
                    if refs.endswith("one sample"):
                        for tokens, kept in ((SEQ + 13, SEQ // 2 + 3), (2 * SEQ, SEQ // 2 + 3)):
                            q, k, v = rows(tokens), rows(tokens), rows(tokens)
                            cu, cu_r = (torch.tensor([0, n], dtype=torch.int32) for n in (tokens, kept))
                            ref_k, ref_v, ref_index = rows(1, SEQ), rows(1, SEQ), torch.zeros(kept, dtype=torch.int32)
                            out, lse = attention_forward(q, k, v, cu, cu, tokens, ref_k, ref_v, ref_index, cu_r,
                                                         dim ** -0.5)
                            attention_backward(torch.zeros_like(out), torch.zeros_like(lse), q, k, v, out, lse, cu,
                                               cu, tokens, tokens, ref_k, ref_v, ref_index, cu_r, kept, dim ** -0.5)
                        return
                    if refs.startswith("gathered refs"):
                        ref_k, ref_v = rows(2, SEQ), rows(2, SEQ)
                        if refs.endswith("heads apart"):  # not packed first: the forward gathers in place
                            ref_k, ref_v = (torch.zeros(2, SEQ, HEADS, 2 * dim, dtype=dtype)[..., :dim]
                                            for _ in range(2))
                        ref_index = torch.zeros(SEQ, dtype=torch.int32)
                        cu_r = torch.tensor([0, SEQ // 2, SEQ], dtype=torch.int32)
                    elif refs.startswith("packed refs"):
                        ref_k, ref_v, cu_r = rows(SEQ), rows(SEQ), torch.tensor([0, SEQ // 2, SEQ], dtype=torch.int32)
                    out, lse = attention_forward(q, k, v, cu, cu_k, SEQ, ref_k, ref_v, ref_index, cu_r, dim ** -0.5)
                    attention_backward(torch.zeros_like(out), torch.zeros_like(lse), q, k, v, out, lse, cu, cu_k,
                                       SEQ, SEQ if k.shape[0] else 0, ref_k, ref_v, ref_index, cu_r, SEQ // 2,
                                       dim ** -0.5)
                yield f"attention {name} D={dim} {refs}", launch


def _key_mass_variants(dtypes, head_dims):
    """(label, launch) pairs: the two key-mass passes of the selection probes, per dtype and head dim."""
    import torch

    from .kernels.attention import attention_key_mass

    for name in dtypes:
        dtype = getattr(torch, _DTYPE_NAMES[name])
        for dim in head_dims:
            def launch(dtype=dtype, dim=dim):
                q = torch.zeros(2, SEQ, HEADS, dim, dtype=dtype)
                attention_key_mass(q, torch.zeros(2, 2 * SEQ, HEADS, dim, dtype=dtype),
                                   torch.zeros(2, SEQ), dim ** -0.5)
            yield f"key mass {name} D={dim}", launch


def _norm_rope_variants(dtypes, head_dims):
    """(label, launch) pairs: the QK norm + RoPE pass per dtype and head dim in each form the processors call
    (``NORM_ROPE_FORMS``), forward and backward, the image rows read in place as the q third of a fused QKV
    projection. At ``HEADS`` heads, and where head dim 128 is checked, also in the models' other head counts and
    dtypes (``MODEL_NORM_ROPE_FORMS``), whatever the dtypes checked."""
    import torch

    from .kernels.norm_rope import rms_norm_rope, rms_norm_rope_backward

    def launch(dtype, weight_dtype, dim, heads):
        text = torch.zeros(2, SEQ // 2, heads, dim, dtype=dtype)
        image = torch.zeros(2, SEQ, 3 * heads * dim, dtype=dtype)[..., :heads * dim].unflatten(-1, (heads, dim))
        weight = torch.zeros(dim, dtype=weight_dtype)
        table = torch.zeros(SEQ // 2 + SEQ, dim)
        pairs = torch.view_as_real(torch.zeros(SEQ // 2 + SEQ, dim // 2, dtype=torch.complex64))  # Qwen-Image's
        for prefix, weighted, per_pair, round_before_weight, backward in NORM_ROPE_FORMS:
            w = weight if weighted else None
            segments = [(text, w), (image, w)] if prefix else [(image, w)]
            rows = slice(0, SEQ // 2 + SEQ) if prefix else slice(SEQ // 2, SEQ // 2 + SEQ)
            cos, sin = (pairs[rows, :, 0], pairs[rows, :, 1]) if per_pair else (table[rows], table[rows])
            out = rms_norm_rope(segments, cos, sin, 1e-6, round_before_weight=round_before_weight)
            if backward:
                rms_norm_rope_backward(out, segments, cos, sin, 1e-6)

    forms = [(name, name, dim, HEADS) for name in dtypes for dim in head_dims]
    if 128 in head_dims:
        forms += [(name, weights, 128, heads) for name, weights, heads in MODEL_NORM_ROPE_FORMS
                  if (name, weights, 128, heads) not in forms]
    for name, weights, dim, heads in forms:
        yield (f"norm+rope {name} D={dim}" + ("" if heads == HEADS else f" H={heads}")
               + ("" if weights == name else f", {weights} weights"),
               lambda dtype=getattr(torch, _DTYPE_NAMES[name]), weight_dtype=getattr(torch, _DTYPE_NAMES[weights]),
               dim=dim, heads=heads: launch(dtype, weight_dtype, dim, heads))

    def tables():
        from .kernels.norm_rope import rope_tables

        for axes_dim in ((16, 56, 56), (32, 32, 32, 32)):  # FLUX.1's and FLUX.2's rotary tables (fp64 angles)
            rope_tables(torch.zeros(SEQ, len(axes_dim), dtype=torch.int64), torch.zeros(128, dtype=torch.float64),
                        axes_dim)
    yield "rope tables FLUX.1 / FLUX.2, D=128", tables


def _compaction_variants():
    """Selection (scores in each dtype the ops accept, for one sample and for two; rows of 100 tokens, one
    reference of 4096, three, and more than one selection block; one count for every sample or one per sample; and
    three or four references of 4096 tokens as the rows, which ``compact_tokens`` of ``[refs, N]`` scores runs; a
    keep mask of 100 tokens, one reference and three, also as an unaligned view: ``masked_attention``'s
    ``key_mask[:, kept_prefix:]``), the selection budgets' ranking (fixed and
    adaptive counts of each mass, one image and three, one longer than a block) and the row copies (1 to 3 payloads
    of mixed dtypes and widths, with and without zero padding, the models' latents with their ids, of 1, 2 and 4
    samples; scatter of rows or zeros)."""
    import torch

    from .kernels.compaction import (MAX_SELECT_BLOCK, RANK_BLOCK, compact_index, gather_rows, ranked_keep_mask,
                                     scatter_rows)

    for name in DTYPES:
        dtype = getattr(torch, _DTYPE_NAMES[name])
        for batch in (1, 2, 4):  # (4: three or four references of 4096 tokens as the rows, one count for all)
            for n_tokens in (100, 4096, 3 * 4096, 3 * MAX_SELECT_BLOCK) if batch < 4 else (4096,):
                for per_sample in (False, True) if batch == 2 else (False,):
                    counts = [n_tokens // 10, n_tokens // 5] if per_sample else [n_tokens // 10] * batch

                    def select(dtype=dtype, batch=batch, n_tokens=n_tokens, counts=counts):
                        compact_index(torch.zeros(batch, n_tokens, dtype=dtype), counts)
                    yield (f"select scores {name} B={batch} N={n_tokens} "
                           f"{'per-sample' if per_sample else 'uniform'} counts"), select

    for batch in (1, 2):
        # (one reference and three: their blocks' counts pad otherwise; and a klein sequence of 512 text, 4096 target
        # and 3 x 4096 reference tokens: masked_attention's key mask over the whole sequence)
        for n_tokens in (100, 4096, 3 * 4096, 4608 + 3 * 4096):
            def select_mask(batch=batch, n_tokens=n_tokens):
                compact_index(torch.zeros(batch, n_tokens, dtype=torch.bool), n_rows=batch * n_tokens)
                compact_index(torch.zeros(batch, n_tokens + 1, dtype=torch.bool)[:, 1:], n_rows=batch * n_tokens)
            yield f"select keep mask B={batch} N={n_tokens} (and an unaligned view)", select_mask

    def gather(batch, dtype, width):
        rows = 512 * batch
        index, cu = torch.zeros(rows, dtype=torch.int32), torch.arange(batch + 1, dtype=torch.int32) * 512
        hidden = torch.zeros(batch, 4096, width, dtype=dtype)
        ids = torch.zeros(batch, 4096, 4, dtype=torch.int64)
        keep = torch.zeros(batch, 4096, dtype=torch.bool)
        for payloads in ([hidden], [hidden, ids], [hidden, ids, keep], [keep]):
            gather_rows(payloads, index, cu, rows)
        for count in (1, 2, 3):  # masked_attention's packed q alone, its k and v, or q, k and v
            gather_rows([hidden] * count, index, cu, rows, zero_padding=False)
        # the packed latents of FLUX.2 (128 channels) and of FLUX.1 and Qwen-Image (64), each with its position ids:
        # their own column tiles (no row kernel specialises on the kept total)
        for channels in (128, 64):
            gather_rows([torch.zeros(batch, 4096, channels, dtype=dtype), ids], index, cu, rows)
        # FLUX.3's references: 128-channel latents with float32 position ids
        gather_rows([torch.zeros(batch, 4096, 128, dtype=dtype), ids.float()], index, cu, rows)

    def scatter(batch, dtype, width):
        rows = 512 * batch
        index, cu = torch.zeros(rows, dtype=torch.int32), torch.arange(batch + 1, dtype=torch.int32) * 512
        out = torch.zeros(batch, 4096, width, dtype=dtype)
        scatter_rows(torch.zeros(rows, width, dtype=dtype), index, cu, out)
        scatter_rows(None, index, cu, out)

    def rank(dtype, lengths, batch=2):
        rows, longest = batch * len(lengths), max(lengths)
        values, order = torch.zeros(rows, longest, dtype=dtype), torch.zeros(rows, longest, dtype=torch.int64)
        bounds = torch.zeros(batch, len(lengths), dtype=torch.int64)
        ranked_keep_mask(values, order, lengths, sum(lengths), bounds)
        for coverage in (0.9, torch.zeros(batch, len(lengths), dtype=torch.float64)):
            for mass in ("linear", "softmax", "auto"):
                ranked_keep_mask(values, order, lengths, sum(lengths), coverage=coverage, low=bounds, high=bounds,
                                 tolerance=1e-9, mass=mass)

    # the selection budgets' ranking: fixed counts, one coverage or one per image, each mass
    for name in (*DTYPES, "fp64"):
        for lengths in ((4096,), (4096,) * 3, (4096, 1024, 2 * RANK_BLOCK + 17)):
            dtype = getattr(torch, _DTYPE_NAMES.get(name, "float64"))
            yield (f"ranked keep mask {name} B=2 images {list(lengths)}",
                   lambda dtype=dtype, lengths=lengths: rank(dtype, lengths))

    for batch in (1, 2, 4):  # (4: as the selection's)
        for name in DTYPES:
            dtype = getattr(torch, _DTYPE_NAMES[name])
            yield (f"gather {name} [{MODEL_WIDTH}] + int64 ids + bool, B={batch}",
                   lambda batch=batch, dtype=dtype: gather(batch, dtype, MODEL_WIDTH))
            if batch < 4:
                yield (f"scatter {name} rows and zeros [{MODEL_WIDTH}], B={batch}",
                       lambda batch=batch, dtype=dtype: scatter(batch, dtype, MODEL_WIDTH))


# ----------------------------------------------------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------------------------------------------------
def _variants(dtypes, head_dims) -> list:
    """``run_check``'s (label, launch) pairs, in its order."""
    return (list(_attention_variants(dtypes, head_dims)) + list(_key_mass_variants(dtypes, head_dims))
            + list(_norm_rope_variants(dtypes, [d for d in head_dims if d % 2 == 0]))
            + list(_compaction_variants()))


def run_check(arch: int = 90, dtypes=DTYPES, head_dims=HEAD_DIMS, progress: bool = True,
              loops: bool = False, shard: tuple[int, int] = (0, 1)) -> list[Compiled]:
    """Compiles every variant for ``sm_<arch>`` in this process (which must not have imported the kernels through
    the interpreter): attention, key mass and norm + RoPE in ``dtypes`` (names: fp16, bf16, fp32) at ``head_dims``
    (norm + RoPE at the even ones), and every compaction kernel. The autotune candidates are the kernels' (all, or
    under ``SPARSECTX_AUTOTUNE=0`` the untimed launch's: the first, or up to the first that fits). Returns one row
    per compiled binary, and one row per variant that failed. ``loops``: each row also gets its binary's loops
    (``_loops``). ``shard=(i, n)``: only variants i, i + n, i + 2n, ... (one of n processes compiling side by side,
    ``--jobs``)."""
    from .kernels import attention, compaction, norm_rope

    if attention.INTERPRETED or compaction.INTERPRETED or norm_rope.INTERPRETED:
        raise RuntimeError("the kernels were imported for Triton's interpreter (TRITON_INTERPRET=1): run "
                           "compile-check in a process without it (the command line does so by itself)")
    index, count = shard
    variants = _variants(dtypes, head_dims)[index::count]  # (round robin: each shard gets heavy and light variants)
    rows: list[Compiled] = []
    seen: set = set()
    try:
        from tqdm import tqdm
        bar = tqdm(variants, desc=f"compiling for sm_{arch}" + (f" [{index + 1}/{count}]" if count > 1 else ""),
                   unit="variant", disable=None if progress else True, file=sys.stderr, position=index)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = variants
    for label, launch in bar:
        def record(jit_function, kwargs, compiled, seconds, candidate, error, label=label):
            name, config = jit_function.fn.__name__, _config_label(kwargs)
            if error is not None:
                rows.append(Compiled(label, name, config, error=_error_line(error), candidate=candidate))
                return
            key = (name, compiled.hash)
            if key in seen:  # the same binary reached again (a launcher calls a kernel twice)
                return
            seen.add(key)
            registers, stack, static_shared = _resources(compiled.asm["cubin"])
            local = min(stack, LOCAL_ARRAY_BYTES.get(name, 0))
            rows.append(Compiled(label, name, config, registers, stack - local,
                                 compiled.metadata.shared + static_shared, round(seconds, 2), candidate=candidate,
                                 local_array_bytes=local,
                                 fp_fusion=getattr(compiled.metadata, "enable_fp_fusion", None),
                                 loops=_loops(compiled.asm["cubin"]) if loops else None, binary=compiled.hash))
        try:
            with _compile_only(arch, record):
                launch()
        except Exception as e:  # the launcher itself failed: report it and go on with the other variants
            rows.append(Compiled(label, "?", "?", error=_error_line(e)))
    return rows


def _over(rows: list[Compiled], limit: int) -> list[Compiled]:
    return [r for r in rows if r.shared_bytes is not None and r.shared_bytes > limit]


def _candidate_groups(rows: list[Compiled]) -> dict:
    """The compiled autotune candidates of each (variant, kernel)."""
    groups: dict = {}
    for r in rows:
        if r.candidate is not None and not r.error:
            groups.setdefault((r.variant, r.kernel), []).append(r)
    return groups


def problems(rows: list[Compiled], arch: int) -> list[str]:
    """What would fail on the GPU: compile errors, and shared memory above the architecture's per-block limit in a
    binary that a launch can not avoid: a kernel without autotuning, or every compiled candidate of an autotuned
    kernel in a variant. A candidate that does not fit while another does is no problem: the autotuner drops it,
    and the untimed launch (SPARSECTX_AUTOTUNE=0, deterministic algorithms) goes on to the next (``dropped``)."""
    limit = SHARED_MEMORY_LIMIT.get(arch)
    found = [f"{r.variant}: {r.kernel} [{r.config}] does not compile: {r.error}" for r in rows if r.error]
    if limit is None:
        return found
    for r in _over(rows, limit):
        if r.candidate is None:
            found.append(f"{r.variant}: {r.kernel} [{r.config}] needs {r.shared_bytes} B of shared memory, sm_{arch} "
                         f"allows {limit} B per block (no autotuning)")
    for (variant, kernel), group in _candidate_groups(rows).items():
        if len(_over(group, limit)) == len(group):
            found.append(f"{variant}: {kernel}: none of its {len(group)} compiled autotune candidates fits "
                         f"sm_{arch}'s {limit} B of shared memory per block (each needs "
                         f"{', '.join(str(r.shared_bytes) for r in group)} B)")
    return found


def dropped(rows: list[Compiled], arch: int) -> list[Compiled]:
    """Autotune candidates whose shared memory exceeds the arch's limit while another candidate of theirs fits: the
    autotuner skips them there, and so does the untimed launch (it takes the first that fits)."""
    limit = SHARED_MEMORY_LIMIT.get(arch)
    if limit is None:
        return []
    return [r for group in _candidate_groups(rows).values() if len(_over(group, limit)) < len(group)
            for r in _over(group, limit)]


def format_table(rows: list[Compiled], arch: int) -> str:
    header = ("variant", "kernel", "config", "registers", "spill B", "local array B", "shared B", "compile s")
    body = [(r.variant, r.kernel, r.config, *(("-",) * 5 if r.error else
                                              (str(r.registers), str(r.spill_bytes), str(r.local_array_bytes),
                                               str(r.shared_bytes), f"{r.seconds:.1f}")))
            for r in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    spilled = [r for r in rows if r.spill_bytes]
    lines.append(f"\n{len(rows)} binaries for sm_{arch}; spilling: {len(spilled)}"
                 + "".join(f"\n  {r.variant}: {r.kernel} [{r.config}] {r.spill_bytes} B" for r in spilled))
    looped = [r for r in rows if r.loops]
    if looped:
        lines.append("loops, per step (instructions, barriers, shuffles, shared-memory stores / loads):"
                     + "".join(f"\n  {r.variant}: {r.kernel} [{r.config}] "
                               + "; ".join(f"{loop['instructions']} ins, {loop['barriers']} bar, "
                                           f"{loop['shuffles']} shfl, {loop['shared_stores']} st / "
                                           f"{loop['shared_loads']} ld" for loop in r.loops)
                               for r in looped))
    skipped = dropped(rows, arch)
    if skipped:
        lines.append(f"autotune candidates dropped on sm_{arch} (shared memory over "
                     f"{SHARED_MEMORY_LIMIT[arch]} B): {len(skipped)}"
                     + "".join(f"\n  {r.variant}: {r.kernel} [{r.config}] {r.shared_bytes} B" for r in skipped))
    if arch not in SHARED_MEMORY_LIMIT:
        lines.append(f"shared memory NOT checked: no per-block limit known for sm_{arch} "
                     f"(known: {', '.join(f'sm_{a}' for a in SHARED_MEMORY_LIMIT)})")
    return "\n".join(lines)


def _names(text: str, allowed) -> tuple:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(map(str, allowed))}, "
                                         f"got {text!r}")
    return names


def _dtype_list(text: str) -> tuple:
    return _names(text, DTYPES)


def _dim_list(text: str) -> tuple:
    try:
        return tuple(int(d) for d in _names(text, [str(d) for d in range(1, 257)]))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated head dims in 1..256, got {text!r}") from None


def _job_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return int(text)


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (1-based, as a --jobs child is given it) as ``(I - 1, N)``."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return int(index) - 1, int(count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_LIMIT), metavar="ARCH",
                        help="compute capability x 10: 90 for H100/H200 (default), 80 for A100, 89 for L40S/4090 "
                             f"(one of {', '.join(map(str, sorted(SHARED_MEMORY_LIMIT)))})")
    sizes = parser.add_argument_group("variants (--quick, or --dtypes/--head-dims)")
    sizes.add_argument("--dtypes", type=_dtype_list, default=None,
                       help=f"attention dtypes (default {','.join(DTYPES)}; the selection kernel is compiled for "
                            "every score dtype)")
    sizes.add_argument("--head-dims", type=_dim_list, default=None,
                       help=f"attention head dims (default {','.join(map(str, HEAD_DIMS))})")
    sizes.add_argument("--quick", action="store_true", help="short for --dtypes bf16 --head-dims 64,128")
    parser.add_argument("--first-config", action="store_true",
                        help="only the candidates of each attention kernel that its untimed launch "
                             "(SPARSECTX_AUTOTUNE=0, deterministic algorithms) compiles: the first, or up to the "
                             "first that fits the arch")
    parser.add_argument("--loops", action="store_true",
                        help="also count what one step of each loop of each binary holds (instructions, barriers, "
                             "shuffles, shared-memory stores and loads, read from its SASS: about 0.4 s a binary), "
                             "e.g. a reduction across warps or a shared-memory round trip in every step")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--jobs", type=_job_count, default=1, metavar="N",
                        help="compile in N processes side by side, each a share of the variants (default 1); the "
                             "table is the same. Binaries land in Triton's cache as any compile's do: on a GPU "
                             "machine of the arch, a later launch whose arguments specialise as the check's do loads "
                             "its binary instead of compiling it")
    parser.add_argument("--shard", type=_shard, default=None, help=argparse.SUPPRESS)  # (a --jobs child's share)


def main(args: argparse.Namespace) -> int:
    """Exit status 1 when something would fail on the GPU (see ``problems``), else 0."""
    if args.quick and (args.dtypes is not None or args.head_dims is not None):
        print("sparsectx compile-check: error: --quick stands for --dtypes bf16 --head-dims 64,128: give it or "
              "those options, not both", file=sys.stderr)
        return 2
    dtypes, head_dims = (("bf16",), (64, 128)) if args.quick else (args.dtypes or DTYPES, args.head_dims or HEAD_DIMS)
    if args.shard is not None and not args.json:
        print("sparsectx compile-check: error: --shard (a --jobs child's share) writes its rows to --json",
              file=sys.stderr)
        return 2
    if args.json:
        # before the compiles, minutes: a path found wrong after them gave a traceback and exit status 1, which
        # also means "problems found" (the bench's check: not a folder, its folder made, a file written there)
        from .benchmarks import check_output_path

        try:
            check_output_path("--json", args.json, prog="sparsectx compile-check", replaced=False)  # (opened)
        except SystemExit as error:
            print(error, file=sys.stderr)
            return 2
    try:
        other_candidates = args.first_config == autotune_all_configs()
    except ValueError:  # (a value the kernels refuse: the child gets this command's own)
        other_candidates = True
    if args.shard is None and (args.jobs > 1 or interpreter_requested() or other_candidates):
        if os.environ.get(CHILD_MARK):  # (a child that would start another: a bug, not a loop of processes)
            raise RuntimeError(f"compile-check's child process has TRITON_INTERPRET="
                               f"{os.environ.get('TRITON_INTERPRET')!r} and SPARSECTX_AUTOTUNE="
                               f"{os.environ.get('SPARSECTX_AUTOTUNE')!r}, which its parent set for it not to: it "
                               "would start another")
        # the kernel modules fix their mode and candidates at import: a fresh process without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["SPARSECTX_AUTOTUNE"] = "0" if args.first_config else "1"
        env[CHILD_MARK] = "1"
        argv = [sys.executable, "-m", "sparsectx.compile_check", "--arch", str(args.arch),
                "--dtypes", ",".join(dtypes), "--head-dims", ",".join(map(str, head_dims))]
        argv += ["--first-config"] if args.first_config else []
        argv += ["--loops"] if args.loops else []
        if args.jobs > 1:
            return _run_shards(args, dtypes, head_dims, argv, env)
        return subprocess.call(argv + (["--json", args.json] if args.json else []), env=env)
    start = time.perf_counter()
    shard = args.shard or (0, 1)
    rows = run_check(args.arch, dtypes, head_dims, loops=args.loops, shard=shard)
    if args.shard is not None:  # a --jobs child: its rows and its variants' places, for the parent to merge
        labels = [label for label, _ in _variants(dtypes, head_dims)]
        with open(args.json, "w") as f:
            json.dump({"variants": {labels[i]: i for i in range(shard[0], len(labels), shard[1])},
                       "rows": [dataclasses.asdict(r) for r in rows]}, f)
        return 0
    return _report(args, dtypes, head_dims, rows, time.perf_counter() - start)


def _run_shards(args: argparse.Namespace, dtypes, head_dims, argv: list, env: dict) -> int:
    """``--jobs N``: N child processes (``argv`` with ``env``), child i compiling ``--shard i/N`` of the variants;
    their rows merged in the one process's order, each binary once (as ``run_check`` lists it), then reported."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compile-check-") as scratch:
        outputs = [os.path.join(scratch, f"shard{i}.json") for i in range(args.jobs)]
        # (a shard writes its rows to its file, its progress bar and any error to this command's stderr)
        children = [subprocess.Popen(argv + ["--shard", f"{i + 1}/{args.jobs}", "--json", out], env=env,
                                     stdout=subprocess.DEVNULL) for i, out in enumerate(outputs)]
        failed = [f"shard {i + 1}/{args.jobs} exited with status {status}"
                  for i, status in enumerate(child.wait() for child in children)
                  if status != 0 or not os.path.exists(outputs[i])]
        if failed:
            print(f"sparsectx compile-check: error: {'; '.join(failed)} (its error above)", file=sys.stderr)
            return 2
        shards = []
        for out in outputs:
            with open(out) as f:
                shards.append(json.load(f))
    places = {label: place for shard in shards for label, place in shard["variants"].items()}
    merged = sorted((Compiled(**row) for shard in shards for row in shard["rows"]), key=lambda r: places[r.variant])
    seen: set = set()
    rows = []
    for row in merged:  # (a stable sort: each variant's rows in their order)
        if row.binary is not None and (row.kernel, row.binary) in seen:  # reached by an earlier variant too
            continue
        seen.add((row.kernel, row.binary))
        rows.append(row)
    return _report(args, dtypes, head_dims, rows, time.perf_counter() - start)


def _report(args: argparse.Namespace, dtypes, head_dims, rows: list[Compiled], seconds: float) -> int:
    """The table and the problems on stdout (and the JSON file): 1 when there are problems, else 0."""
    import triton

    jobs = f", {args.jobs} processes" if args.jobs > 1 else ""
    print(f"Triton {triton.__version__}, sm_{args.arch}, {seconds:.0f} s{jobs}\n")
    print(format_table(rows, args.arch))
    found = problems(rows, args.arch)
    for line in found:  # (printed before the JSON is written: a failed write keeps them)
        print(f"PROBLEM: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "first_config": args.first_config,
                       "dtypes": list(dtypes), "head_dims": list(head_dims),
                       "shared_memory_limit": SHARED_MEMORY_LIMIT.get(args.arch), "problems": found,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sparsectx.compile_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
