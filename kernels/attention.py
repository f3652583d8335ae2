"""Gather-based sparse joint attention: varlen forward and backward in Triton; and the attention mass each key
receives from a set of queries (token selection's probes, at the end of the module).

Spec: ``sparsectx.reference.sparse_attention_ref`` (forward), ``sparse_attention_bwd_ref`` (backward) and
``attention_key_mass_ref`` (key mass).

Sample b's queries are rows ``cu_q[b]:cu_q[b+1]`` of the packed ``q [Tq, H, D]``; its keys are its own packed rows
``cu_k[b]:cu_k[b+1]`` of ``k/v [Tk, H, D]`` followed by its reference rows ``j in cu_r[b]:cu_r[b+1]``: either
``ref_k[b, ref_index[j]]`` of a ``[B, R, H, D]`` buffer (gathered), or, with ``REF_PACKED``, rows ``ref_k[j]`` of a
packed ``[Tref, H, D]`` tensor (a second contiguous key segment per sample, e.g. the image tokens of a sequence whose
text tokens are the own keys). Full blocks of consecutive rows (the own keys, packed references) are loaded by the
bulk tensor copy engine where the layout allows it: host-side tensor descriptors over the ``[rows, H*D]`` view, whose
tile is the launch config's (``_descriptor_tiles``). Gathered rows have no such load on sm_90 (no tensor-descriptor
gather): a gathered key block is loaded through a vector of row pointers, and where packed rows would load by tile
copies the forward launcher first copies the kept rows into packed references (``_packs_gathered_rows``); the
backward gathers in place. There is no causal mask.

Offsets are int64 wherever a product can pass 2**31 elements: token rows, the batch and the head (a head-major
view, e.g. ``[B, H, R, D]`` transposed to ``[B, R, H, D]``, has a head stride of ``R * D``: with 24 heads of 128 at
R = 730k, ``head * stride`` wrapped in int32 and addressed memory before the tensor).

Layout of the work (no host synchronisation: grids are sized from host-side upper bounds, and programs past the end
of their sample return at once):
- forward: one program per (query block, head, sample); it streams over the sample's own keys, then over its
  gathered reference keys, with an online softmax in base 2 (fp32 statistics). Its queries are packed rows, or
  (``Q_INDEXED``, ``masked_attention``'s kept queries) rows of a dense ``[B, S, H, D]`` q given by a compaction's
  index, whose outputs go to the same rows of a dense output: no packed copy of q, no scatter of the output.
- backward (FlashAttention-2 split, no atomics): a pre-pass computes ``delta = rowsum(dO * O) - dlse``; one kernel
  per key block accumulates dK and dV over all query blocks of the sample (launched once for the own keys and once
  for the reference keys, whose gradients are stored straight into their rows of the reference-buffer gradient:
  indices are unique within a sample, so every row has a single writer); one kernel per query block accumulates dQ.
"""
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import (COMPILE_OPTIONS, autotune_all_configs, built_for_interpreter, cdiv, hash_in_definition_order,
                      interpreter_requested, next_power_of_2, on_device_of)
from .compaction import gather_rows

LOG2E = 1.4426950408889634  # scores are scaled by scale*log2(e) so that exp2 replaces exp
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # lse is returned in natural log


# ----------------------------------------------------------------------------------------------------------------
# launch configurations: a small autotune set on the GPU, tuned per head dim, key source (the best block shape
# differs between contiguous and gathered keys) and launch size class (``_tune_rows``); one fixed config in the
# interpreter (where several configs fail and big blocks run fastest).
# Two sets per kernel, by the bytes of a head's row block (BLOCK_D x element size): up to WIDE_ROW_BYTES (fp16/bf16
# head dims up to 128, fp32 up to 64), and wider rows (fp16/bf16 head dims 129-256, fp32 65-256), whose tiles must be
# smaller (the narrow set's first forward tile needs 256 KB of shared memory at BLOCK_D=256 in bf16, its first dQ
# tile 289 KB at BLOCK_D=128 in fp32; sm_90 gives a block 227 KB). The first GPU config of each list compiled for
# sm_90 (bf16: D=64 and 128, resp. D=256) without register spills, and fits sm_90 at every dtype and head dim
# (`sparsectx compile-check`, tests check both). Under SPARSECTX_AUTOTUNE=0 (saves compile time, e.g. in test runs
# over many shapes and dtypes) and torch's deterministic algorithms, nothing is timed: a launch takes the first
# candidate this GPU can run (``_FirstThatLaunches``: the first, except where a block has less shared memory than
# sm_90's, as on sm_86/sm_89); the lists below stay complete (a GPU test runs every candidate).
# ----------------------------------------------------------------------------------------------------------------
def _gpu_configs(shapes, pre_hook=None) -> list:
    """Launch configurations of ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` shapes (the interpreter reads only the
    block sizes: tests run the GPU tiles there)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for bm, bn, w, s in shapes]


def _configs(shapes, interpreter_shape, pre_hook=None):
    return _gpu_configs([(*interpreter_shape, 4, 1)] if interpreter_requested() else shapes, pre_hook)


DESCRIPTOR_ARGS = ("K_DESC", "V_DESC", "RK_DESC", "RV_DESC")


def _descriptor_tiles(nargs):
    """Config pre-hook of the forward: the key/value tensor descriptors move tiles of the config's block shape."""
    for name in DESCRIPTOR_ARGS:
        if nargs[name] is not None:
            nargs[name].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_D"]]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Ordered from `bench/sweep_attention.py` on an H200 (2026-11-29, Triton
# 3.6, bf16, D=128, L 4.6k-17k: bench/runs/2026-11-29-h200-s8-run1-sweep.json): the forward's fastest was 128x128 with
# 8 warps and 3 stages (it spills 40 B with gathered keys under Triton 3.9, so it is not first), dK/dV's 64x128/8/3
# (spills 16-24 B), dQ's 128x64/8/3; dropped: the dK/dV candidates with which the backward took 1.5-1.9x the best
# time there, and the dQ candidates with which it took 1.14-1.20x.
FWD_SHAPES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 128, 8, 2)]
# dK/dV: a program holds BLOCK_N keys and streams BLOCK_M queries; dQ: BLOCK_M queries, streams BLOCK_N keys
DKDV_SHAPES = [(32, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (16, 64, 4, 3), (32, 128, 8, 2)]
DQ_SHAPES = [(128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3), (128, 64, 8, 2)]
# head rows wider than WIDE_ROW_BYTES: smaller tiles, chosen from sm_90 compiles of bf16 D=256
WIDE_ROW_BYTES = 256
WIDE_HEAD_BLOCK_D = 128  # the widest head-dim block of fp16/bf16 in WIDE_ROW_BYTES
FWD_SHAPES_WIDE = [(64, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3), (128, 64, 8, 1), (64, 32, 4, 2)]
DKDV_SHAPES_WIDE = [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2)]
DQ_SHAPES_WIDE = [(64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
INTERPRETER_SHAPE = (32, 32)
AUTOTUNE_ALL = autotune_all_configs()  # SPARSECTX_AUTOTUNE, read (and a bad value refused) at import
FWD_CONFIGS = _configs(FWD_SHAPES, INTERPRETER_SHAPE, _descriptor_tiles)
DKDV_CONFIGS = _configs(DKDV_SHAPES, INTERPRETER_SHAPE)
DQ_CONFIGS = _configs(DQ_SHAPES, INTERPRETER_SHAPE)
FWD_CONFIGS_WIDE = _configs(FWD_SHAPES_WIDE, INTERPRETER_SHAPE, _descriptor_tiles)
DKDV_CONFIGS_WIDE = _configs(DKDV_SHAPES_WIDE, INTERPRETER_SHAPE)
DQ_CONFIGS_WIDE = _configs(DQ_SHAPES_WIDE, INTERPRETER_SHAPE)


def _autotuned(kernel, configs, wide_configs, key):
    """Two autotuners over the same jitted kernel: ``(for head rows up to WIDE_ROW_BYTES, for wider rows)``."""
    return tuple(triton.autotune(configs=c, key=key)(kernel) for c in (configs, wide_configs))


class _FirstThatLaunches:
    """The launch without timing: ``launcher[grid](*args, **kwargs)`` launches the first of ``configs`` that this GPU
    can run. A config needing more shared memory than a block may use here (e.g. a tile sized for sm_90's 227 KB
    on an sm_86/sm_89 GPU's 99 KB) fails in Triton's launcher, before the kernel runs, with ``OutOfResources``; the
    next one is tried (Triton keeps the failed binary and raises again at once on later launches). Which config
    runs depends only on the GPU and the kernel's constexprs, so the same inputs give the same bits every time; the
    last config's failure is raised. In the interpreter the lists hold one config."""

    def __init__(self, kernel, configs, key):
        # one single-config autotuner per candidate: it keeps the config's pre-hook (tensor descriptor tiles); each
        # knows its place in the list, (position, length) (read by `sparsectx compile-check`)
        self.candidates = tuple(triton.autotune(configs=[c], key=key)(kernel) for c in configs)
        for position, candidate in enumerate(self.candidates):
            candidate.list_place = (position, len(configs))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for candidate in self.candidates:
                try:
                    return candidate[grid](*args, **kwargs)
                except OutOfResources:
                    # Triton's autotuner keeps the arguments of a launch that raised (``nargs``, reset only after
                    # a launch): the refused launch's tensors would stay alive until this candidate's next one
                    candidate.nargs = None
                    if candidate is self.candidates[-1]:
                        raise
        return launch


def _first_that_launches(kernel, configs, wide_configs, key):
    """``_FirstThatLaunches`` for head rows up to WIDE_ROW_BYTES and for wider rows (as ``_autotuned``)."""
    return tuple(_FirstThatLaunches(kernel, c, key) for c in (configs, wide_configs))


# Triton's Autotuner keeps a launch's arguments on the shared tuner object while it runs a config's pre-hook
# (``_descriptor_tiles``) and while it benchmarks candidates: launches from several threads (DataParallel replicas,
# a threaded server) would mix them (a tile shape set on another call's descriptors, or a TypeError). Every
# autotuned launch holds this lock; it covers the host-side launch only, not the kernel's run.
_TUNER_LOCK = threading.Lock()


def _new_tuner_lock() -> None:
    """A forked child's own lock: one that another thread of the parent held at the fork is never released there."""
    global _TUNER_LOCK
    _TUNER_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_tuner_lock)


def _wide_rows(block_d: int, dtype: torch.dtype) -> bool:
    """Whether a launch of head-dim block ``block_d`` in ``dtype`` takes the tiles of wide head rows."""
    return block_d * dtype.itemsize > WIDE_ROW_BYTES


def _for_head(tuners, fixed, block_d: int, dtype: torch.dtype):
    """The launcher of a launch's head rows (``_wide_rows``): the autotuner from ``tuners``, or, under
    SPARSECTX_AUTOTUNE=0 or ``torch.use_deterministic_algorithms(True)``, the untimed launch from ``fixed``
    (``_FirstThatLaunches``). The autotuner's pick is timed in each process and for each launch size class
    (``_tune_rows``), and the block shape sets the order of the sums: with it, a sample's bits could change with the
    batch it runs in or from one run to the next; the untimed launch gives the same bits for the same inputs on the
    same GPU every time (no kernel uses atomics)."""
    untimed = not AUTOTUNE_ALL or torch.are_deterministic_algorithms_enabled()
    return (fixed if untimed else tuners)[_wide_rows(block_d, dtype)]


def tuned_configs() -> dict:
    """What the autotuner chose so far in this process: ``{kernel: {"picked": {key: config}, "last_tuned":
    {config: ms}}}`` (strings; ``last_tuned``: every candidate's time for the key that kernel tuned last). Kernels
    that tuned nothing are absent: empty before the first GPU launch, in the interpreter, with one candidate and for
    untimed launches (SPARSECTX_AUTOTUNE=0, deterministic algorithms).
    Kernels of wide head rows (``_wide_rows``: head dims above 128, above 64 in fp32) are reported as ``fwd_wide``,
    ``bwd_dkdv_wide``, ``bwd_dq_wide``."""
    choices = {}
    for name, pair in (("fwd", FWD_TUNERS), ("bwd_dkdv", DKDV_TUNERS), ("bwd_dq", DQ_TUNERS)):
        for kernel, suffix in zip(pair, ("", "_wide")):
            picked = {str(key): str(config) for key, config in getattr(kernel, "cache", {}).items()}
            timings = getattr(kernel, "configs_timings", None) or {}
            if picked and len(kernel.configs) > 1:
                choices[name + suffix] = {"picked": picked,
                                          "last_tuned": {str(config): _first(ms) for config, ms in timings.items()}}
    return choices


def _first(ms):
    """A candidate's timing as one float (the autotuner stores a list of quantiles or a float)."""
    return float(ms[0]) if isinstance(ms, (list, tuple)) else float(ms)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr, acc=None):
    """Matrix product with fp32 accumulation (into ``acc`` when given: the tensor cores add it, no separate pass);
    fp32 inputs use full IEEE precision instead of tf32."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_kv(k_ptrs, v_ptrs, key_valid, d_valid, MASKED: tl.constexpr):
    """One block of keys and values through one pointer per row and feature (MASKED: zeros outside the valid keys
    and features)."""
    if MASKED:
        kv_mask = key_valid[:, None] & d_valid[None, :]
        return tl.load(k_ptrs, mask=kv_mask, other=0.0), tl.load(v_ptrs, mask=kv_mask, other=0.0)
    return tl.load(k_ptrs), tl.load(v_ptrs)


@triton.jit
def _load_kv_rows(K_DESC, V_DESC, k_base, v_base, stride_kt, stride_vt, row0, col, offs_n, d_valid,
                  TMA: tl.constexpr, MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A full block of keys and values from ``BLOCK_N`` consecutive rows starting at ``row0``: one bulk tensor copy
    each (TMA: descriptors over the ``[rows, H*D]`` view, tile at column ``col``), else a pointer per element."""
    if TMA:  # a descriptor whose tile is not the launch's block would load a smaller block without an error
        tl.static_assert(K_DESC.block_shape[0] == BLOCK_N and K_DESC.block_shape[1] == BLOCK_D)
        tl.static_assert(V_DESC.block_shape[0] == BLOCK_N and V_DESC.block_shape[1] == BLOCK_D)
        return K_DESC.load([row0, col]), V_DESC.load([row0, col])
    rows = (row0 + offs_n).to(tl.int64)[:, None]
    return _load_kv(k_base + rows * stride_kt, v_base + rows * stride_vt, offs_n >= 0, d_valid, MASK_D)


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, key_valid, qk_scale, MASK_KEYS: tl.constexpr, IEEE: tl.constexpr):
    """Folds one block of keys/values into the running output, max and sum of the online softmax (base 2, fp32
    statistics). ``qk_scale`` is >= 0 (the launcher negates q for a negative scale), so a full block's row max is
    taken on the raw products and the scale folds into one multiply-add per score. MASK_KEYS: the block is a
    sequence tail and its invalid keys get score -inf. While a row has seen only -inf scores (keys holding -inf),
    its running max is -inf and the exponentials are taken from 0 instead (they are 0, where -inf - -inf would give
    NaN)."""
    qk = _dot(q, tl.trans(k), IEEE)
    if MASK_KEYS:  # scaled first: a zero scale must not meet the -inf of a masked key
        qk = tl.where(key_valid[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_from = tl.where(m_new == float("-inf"), 0.0, m_new)
    if MASK_KEYS:
        p = tl.math.exp2(qk - m_from[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale - m_from[:, None])
    alpha = tl.math.exp2(m_i - m_from)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, IEEE, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _query_block(CU_Q, batch, pid_m, BLOCK_M: tl.constexpr):
    """Rows of query block ``pid_m`` of sample ``batch``: (first packed row of the sample, its query count, offsets
    within the sample, which offsets are real queries, int64 packed row numbers)."""
    q_start = tl.load(CU_Q + batch)
    q_len = tl.load(CU_Q + batch + 1) - q_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return q_start, q_len, offs_m, offs_m < q_len, (q_start + offs_m).to(tl.int64)


@triton.jit
def _ref_rows(RIDX, r_start, offs, valid, REF_PACKED: tl.constexpr, MASKED: tl.constexpr):
    """int64 rows of reference keys ``r_start + offs`` of a sample: consecutive rows of the packed tensor
    (REF_PACKED), else the buffer rows ``ref_index[r_start + offs]`` (MASKED: only where ``valid``, 0 elsewhere)."""
    if REF_PACKED:
        return (r_start + offs).to(tl.int64)
    elif MASKED:
        return tl.load(RIDX + r_start + offs, mask=valid, other=0).to(tl.int64)
    else:
        return tl.load(RIDX + r_start + offs).to(tl.int64)


@triton.jit
def _query_offsets(QIDX, batch, q_start, offs_m, q_valid, q_rows, stride_b, stride_t, Q_INDEXED: tl.constexpr):
    """int64 element offsets of a query block's rows in q (or the output): their packed rows, or with Q_INDEXED
    (dense ``[B, S, H, D]`` q and output) row ``QIDX[packed row]`` of the sample."""
    if Q_INDEXED:
        pos = tl.load(QIDX + q_start + offs_m, mask=q_valid, other=0).to(tl.int64)
        return batch.to(tl.int64) * stride_b + pos * stride_t
    return q_rows * stride_t


# (the key only, and the lse rows' stride, the query count: one binary for every value; Triton specialises ints on
# divisibility by 16, which gave these kernels a second, byte-identical binary, compiled again: sm_90, Triton 3.6/3.9)
@triton.jit(do_not_specialize=["tune_rows", "stride_lse_h"])
def _fwd_kernel(
    Q, K, V, RK, RV, RIDX, CU_Q, CU_K, CU_R, O, LSE, QIDX, K_DESC, V_DESC, RK_DESC, RV_DESC,
    qk_scale, stride_qb, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_rkb, stride_rkr, stride_rkh, stride_rvb, stride_rvr, stride_rvh,
    stride_ob, stride_ot, stride_oh, stride_lse_h, tune_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_D: tl.constexpr, HAS_REF: tl.constexpr,
    REF_PACKED: tl.constexpr, Q_INDEXED: tl.constexpr, IEEE: tl.constexpr, OWN_TMA: tl.constexpr,
    REF_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, head, batch = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # int64: module doc
    q_start, q_len, offs_m, q_valid, q_rows = _query_block(CU_Q, batch, pid_m, BLOCK_M)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_offsets = _query_offsets(QIDX, batch, q_start, offs_m, q_valid, q_rows, stride_qb, stride_qt, Q_INDEXED)
    q = tl.load(Q + q_offsets[:, None] + head * stride_qh + offs_d[None, :],
                mask=q_valid[:, None] & d_valid[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # the sample's own keys, contiguous packed rows: full blocks unmasked, then the tail
    k_start = tl.load(CU_K + batch)
    k_len = tl.load(CU_K + batch + 1) - k_start
    k_base = K + head * stride_kh + offs_d[None, :]
    v_base = V + head * stride_vh + offs_d[None, :]
    k_full = (k_len // BLOCK_N) * BLOCK_N
    col = tl.program_id(1) * HEAD_DIM  # the head's first column in the descriptors' [rows, H*D] view
    for start_n in range(0, k_full, BLOCK_N):
        k, v = _load_kv_rows(K_DESC, V_DESC, k_base, v_base, stride_kt, stride_vt, k_start + start_n, col, offs_n,
                             d_valid, OWN_TMA, MASK_D, BLOCK_N, BLOCK_D)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, offs_n < BLOCK_N, qk_scale, False, IEEE)
    if k_full < k_len:
        key_valid = k_full + offs_n < k_len
        rows = (k_start + k_full + offs_n).to(tl.int64)[:, None]
        k, v = _load_kv(k_base + rows * stride_kt, v_base + rows * stride_vt, key_valid, d_valid, True)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, key_valid, qk_scale, True, IEEE)

    # the sample's kept reference keys (rows of ref_k[batch] gathered through ref_index, or its packed rows; the
    # packed tensor's batch stride is 0), same full/tail split
    if HAS_REF:
        r_start = tl.load(CU_R + batch)
        r_len = tl.load(CU_R + batch + 1) - r_start
        rk_base = RK + batch.to(tl.int64) * stride_rkb + head * stride_rkh + offs_d[None, :]
        rv_base = RV + batch.to(tl.int64) * stride_rvb + head * stride_rvh + offs_d[None, :]
        r_full = (r_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, r_full, BLOCK_N):
            if REF_PACKED:  # consecutive rows, loaded as the own keys are
                k, v = _load_kv_rows(RK_DESC, RV_DESC, rk_base, rv_base, stride_rkr, stride_rvr, r_start + start_n,
                                     col, offs_n, d_valid, REF_TMA, MASK_D, BLOCK_N, BLOCK_D)
            else:
                idx = _ref_rows(RIDX, r_start, start_n + offs_n, None, False, False)[:, None]
                k, v = _load_kv(rk_base + idx * stride_rkr, rv_base + idx * stride_rvr, offs_n < BLOCK_N, d_valid,
                                MASK_D)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, offs_n < BLOCK_N, qk_scale, False, IEEE)
        if r_full < r_len:
            key_valid = r_full + offs_n < r_len
            idx = _ref_rows(RIDX, r_start, r_full + offs_n, key_valid, REF_PACKED, True)[:, None]
            k, v = _load_kv(rk_base + idx * stride_rkr, rv_base + idx * stride_rvr, key_valid, d_valid, True)
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, key_valid, qk_scale, True, IEEE)

    # normalise; a query that saw no key (l_i = 0) outputs zeros and lse = -inf (NaN scores: NaN, not -inf; a +inf
    # score: output NaN, lse +inf as torch.logsumexp gives it, not the NaN of inf - inf)
    seen = l_i != 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_offsets = _query_offsets(QIDX, batch, q_start, offs_m, q_valid, q_rows, stride_ob, stride_ot, Q_INDEXED)
    tl.store(O + o_offsets[:, None] + head * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=q_valid[:, None] & d_valid[None, :])
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    lse = tl.where(m_i == float("inf"), m_i, lse)
    tl.store(LSE + head * stride_lse_h + q_start + offs_m, lse, mask=q_valid)


# (the load path is part of the key: the best tile, and what fits in shared memory, differ between tile copies and
# pointer loads)
FWD_KEY = ["HEAD_DIM", "HAS_REF", "REF_PACKED", "Q_INDEXED", "OWN_TMA", "REF_TMA", "tune_rows"]
FWD_TUNERS = _autotuned(_fwd_kernel, FWD_CONFIGS, FWD_CONFIGS_WIDE, FWD_KEY)
FWD_FIXED = _first_that_launches(_fwd_kernel, FWD_CONFIGS, FWD_CONFIGS_WIDE, FWD_KEY)


def _empty_as(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uninitialised tensor of ``t``'s shape, dtype and device, whatever ``t``'s strides (outputs and
    gradients are contiguous, as the reference's and the fake op's)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _tune_rows(batch: int, max_len: int, heads: int) -> int:
    """Autotuning key for the size of a launch: the (batch x longest sequence x heads) rows its programs cover,
    rounded up to a power of two. The best block shape depends on it (how many waves of programs fill the GPU), so
    each size class is tuned once; the kernels do not read it."""
    return next_power_of_2(max(batch * max_len * heads, 1))


def _block_d(dim: int) -> int:
    return max(16, next_power_of_2(dim))


def _ref_args(ref_k, ref_v, ref_index, cu_r, like):
    """Kernel arguments for the references: ``(ref_k, ref_v, ref_index, cu_r, has_ref, packed)`` (dummies when there
    are none: HAS_REF=False skips their loop; a packed tensor's index argument is unused)."""
    if ref_k is None:  # (never read: allocated, not filled, so no launch is spent on them)
        dummy = like.new_empty((1, 1, 1, 1))
        index = torch.empty(1, dtype=torch.int32, device=like.device)
        return dummy, dummy, index, index, False, False
    packed = ref_index is None
    return ref_k, ref_v, cu_r if packed else ref_index, cu_r, True, packed


def _ref_strides(t):
    """(batch, row, head) strides of a reference tensor: a packed ``[Tref, H, D]`` one has batch stride 0 (its rows
    are addressed by their packed number)."""
    return (0, t.stride(0), t.stride(1)) if t.ndim == 3 else (t.stride(0), t.stride(1), t.stride(2))


@on_device_of("q")
def attention_forward(q, k, v, cu_q, cu_k, max_seqlen_q, ref_k, ref_v, ref_index, cu_r, softmax_scale,
                      q_index=None):
    """Launches the forward kernel. Returns ``(out [Tq, H, D], lse [H, Tq] fp32, natural log)``.

    With ``q_index`` (int32 ``[Tq]``, positions within each sample, packed by ``cu_q``: a compaction's index) q is
    a dense ``[B, S, H, D]`` tensor whose kept queries are read in place: packed query j of sample b is
    ``q[b, q_index[j]]``; ``out`` is then ``[B, S, H, D]``, those rows written and the others zero (the same as
    gathering the queries, attending and scattering the output back, without the two copies)."""
    indexed = q_index is not None
    heads, dim = q.shape[-2:]
    tq = q_index.numel() if indexed else q.shape[0]
    batch = cu_q.numel() - 1
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device) if indexed else _empty_as(q)
    lse = torch.empty((heads, tq), dtype=torch.float32, device=q.device)
    if tq == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    if ref_index is not None and ref_index.numel() and _packs_gathered_rows(ref_k, ref_v):
        ref_k, ref_v = gather_rows([ref_k, ref_v], ref_index, cu_r, ref_index.numel(), zero_padding=False)
        ref_index = None
    rk, rv, ridx, cur, has_ref, packed = _ref_args(ref_k, ref_v, ref_index, cu_r, q)
    if softmax_scale < 0:  # the kernel needs a scale >= 0 (its row max is taken before scaling): negation is exact
        q, softmax_scale = -q, -softmax_scale

    def grid(meta):
        return (cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)

    own_desc = _row_descriptors(k, v)
    ref_desc = _row_descriptors(rk, rv) if packed else (None, None)
    # (batch, row, head) strides of q and the output: a packed tensor's batch stride is unused
    q_strides, out_strides = ((t.stride(0), t.stride(1), t.stride(2)) if indexed else (0, t.stride(0), t.stride(1))
                              for t in (q, out))
    with _TUNER_LOCK:
        _for_head(FWD_TUNERS, FWD_FIXED, _block_d(dim), q.dtype)[grid](
            q, k, v, rk, rv, ridx, cu_q, cu_k, cur, out, lse, q_index if indexed else cu_q, *own_desc, *ref_desc,
            softmax_scale * LOG2E, *q_strides, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *_ref_strides(rk), *_ref_strides(rv), *out_strides, lse.stride(0),
            _tune_rows(batch, max_seqlen_q, heads),
            HEAD_DIM=dim, BLOCK_D=_block_d(dim), MASK_D=_block_d(dim) != dim, HAS_REF=has_ref, REF_PACKED=packed,
            Q_INDEXED=indexed, IEEE=q.dtype == torch.float32, OWN_TMA=own_desc[0] is not None,
            REF_TMA=ref_desc[0] is not None, **COMPILE_OPTIONS,
        )
    return out, lse


def _tile_copies(dtype: torch.dtype, dim: int) -> bool:
    """Whether blocks of consecutive key rows of this dtype and head dim can be loaded by bulk tile copies (see
    ``_row_descriptors``; the layout decides the rest)."""
    return dtype.itemsize == 2 and dim == _block_d(dim) and dim <= WIDE_HEAD_BLOCK_D


PACK_MAX_SAMPLES = 64  # the row-copy kernel finds each packed row's sample by a scan over the samples


def _packs_gathered_rows(ref_k, ref_v) -> bool:
    """Whether the forward first copies the kept rows of a ``[B, R, H, D]`` reference buffer into packed
    ``[Tref, H, D]`` tensors (one gather launch for both) and reads them as packed references. On an H200 (Triton
    3.6, bf16, D=128; bench/RESULTS.md, 2026-11-30) blocks of gathered rows, loaded through a pointer per element,
    took 1.04-1.24x the time of the same keys loaded as tile copies of packed rows, growing with the kept count,
    and copying the kept keys of ``masked_attention`` first took its forward from 3.11 to 2.11 ms; the copy moves
    each kept row twice (at 4 TB/s, about 25 us for 4096 rows of 24 x 128 keys and values). So the forward
    copies where the packed rows load by tile copies (``_tile_copies``) and the buffer's heads are adjacent
    (a ``[B, R, H*D]`` view to copy rows of: a head-major buffer would be copied whole), for batches of up to
    PACK_MAX_SAMPLES samples (each program of the copy scans every sample's bounds), and gathers in place
    elsewhere. The copy has ``ref_index.numel()`` rows (only the kept ones written) and lives for the launch only;
    the backward, whose loads are pointers either way, reads the buffer in place."""
    batch, dim = ref_k.shape[0], ref_k.shape[3]
    return (_tile_copies(ref_k.dtype, dim) and batch <= PACK_MAX_SAMPLES
            and all(t.stride(2) == dim and t.stride(3) == 1 for t in (ref_k, ref_v)))


def _row_descriptors(k, v):
    """Tensor descriptors over the ``[rows, H*D]`` views of packed ``[T, H, D]`` keys and values, for loads of whole
    row blocks by bulk tensor copies; ``(None, None)`` (pointer loads) where such a view does not exist or the copy
    engine cannot address it: heads not adjacent, a feature stride other than 1, rows that overlap (e.g. expanded),
    row strides or base addresses not 16-byte aligned, head dims that are not their own block (powers of two up to
    WIDE_HEAD_BLOCK_D), no rows or no heads; and fp32, whose IEEE dots spill registers at every tile (compiled for
    sm_90 with Triton 3.6, the first forward candidate's stack grows with tile copies from 3.2 to 9.5 KB at D=64 and
    from 14 to 18 KB at D=128). The tile shape is the launch config's (``_descriptor_tiles``)."""
    rows, heads, dim = k.shape
    if k.numel() == 0 or not _tile_copies(k.dtype, dim):  # (no rows, or no heads)
        return None, None
    size = k.element_size()
    if not all(t.stride(2) == 1 and t.stride(1) == dim and t.stride(0) >= heads * dim and t.stride(0) * size % 16 == 0
               and t.data_ptr() % 16 == 0 for t in (k, v)):
        return None, None
    return tuple(TensorDescriptor(t, [rows, heads * dim], [t.stride(0), 1], [16, dim]) for t in (k, v))


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["n_rows", "n_key_rows"])  # (as _fwd_kernel: the query and key counts)
def _bwd_delta_kernel(O, DO, DLSE, DELTA, CU_Q, CU_K, DQ, DK, DV, n_samples, stride_ot, stride_oh, stride_dot,
                      stride_doh, n_rows, n_key_rows, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dlse[h, t] (the row term of dS = P * (dP - delta)), for the
    rows that belong to a sample (rows past cu_q[B], a caller's padding, are never written by the forward). Also
    zeroes the gradient rows no other backward kernel writes: dq rows past cu_q[B] and dk/dv rows past cu_k[B]
    (the grid covers max(Tq, Tk) rows; the reference path gives zeros there too)."""
    pid_m, head = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: module doc
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d[None, :] < HEAD_DIM
    q_end = tl.load(CU_Q + n_samples)
    row_valid = rows < q_end
    mask = row_valid[:, None] & d_valid
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    dlse = tl.load(DLSE + head * n_rows + rows, mask=row_valid, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
    tl.store(DELTA + head * n_rows + rows, delta, mask=row_valid)

    # gradient rows of no sample: zero
    zeros = tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty)
    q_pad = (rows >= q_end) & (rows < n_rows)
    tl.store(DQ + rows64[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :], zeros,
             mask=q_pad[:, None] & d_valid)
    k_pad = ((rows >= tl.load(CU_K + n_samples)) & (rows < n_key_rows))[:, None] & d_valid
    k_offs = rows64[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :]
    tl.store(DK + k_offs, zeros, mask=k_pad)
    tl.store(DV + k_offs, zeros, mask=k_pad)


@triton.jit
def _load_query_grads(Q, DO, LSE2, DELTA, q_rows, q_cols, q_valid, offs_d, d_valid, head,
                      stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h):
    """The backward's per-query inputs of one query block: q and dO (packed rows ``q_rows``), lse in base 2 and
    delta (columns ``q_cols`` of their ``[H, Tq]`` tensors); rows past the sample's end load zeros."""
    mask = q_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(LSE2 + head * stride_lse_h + q_cols, mask=q_valid, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + q_cols, mask=q_valid, other=0.0)
    return q, do, lse2, delta


@triton.jit(do_not_specialize=["tune_rows", "stride_lse_h"])  # (as _fwd_kernel)
def _bwd_dkdv_kernel(
    Q, DO, LSE2, DELTA, K, V, DK, DV, CU_Q, CU_K, KIDX,
    qk_scale, sm_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh, tune_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_REF: tl.constexpr, REF_PACKED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one block of BLOCK_N keys of one sample and head.

    Own keys (IS_REF=False), or packed reference keys (IS_REF and REF_PACKED): K/V/DK/DV are packed [T, H, D]
    tensors, key rows cu_k[b] + n (batch strides 0). Gathered reference keys (IS_REF only): K/V are the
    [B, R, H, D] buffers and DK/DV their gradients; cu_k is cu_seqlens_ref and the key rows are
    ref_index[cu_k[b] + n] inside sample b's slice of the buffer.
    """
    pid_n, head, batch = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # int64: module doc
    k_start = tl.load(CU_K + batch)
    k_len = tl.load(CU_K + batch + 1) - k_start
    if pid_n * BLOCK_N >= k_len:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    key_valid = offs_n < k_len
    kv_mask = key_valid[:, None] & d_valid[None, :]
    if IS_REF:
        rows = _ref_rows(KIDX, k_start, offs_n, key_valid, REF_PACKED, True)
    else:
        rows = (k_start + offs_n).to(tl.int64)
    b64 = batch.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + rows[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + rows[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_start = tl.load(CU_Q + batch)
    q_len = tl.load(CU_Q + batch + 1) - q_start
    # stream over every query block of the sample: P^T = exp2(K Q^T * scale - lse), dV += P^T dO,
    # dS^T = P^T * (V dO^T - delta), dK += dS^T Q
    for start_m in range(0, q_len, BLOCK_M):
        q_valid = start_m + offs_m < q_len
        q_cols = q_start + start_m + offs_m
        q, do, lse2, delta = _load_query_grads(Q, DO, LSE2, DELTA, q_cols.to(tl.int64), q_cols, q_valid, offs_d,
                                               d_valid, head, stride_qt, stride_qh, stride_dot, stride_doh,
                                               stride_lse_h)
        qk_t = _dot(k, tl.trans(q), IEEE) * qk_scale
        p_t = tl.where(q_valid[None, :], tl.math.exp2(qk_t - lse2[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, IEEE)
        dp_t = _dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + rows[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + rows[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


DKDV_KEY = ["HEAD_DIM", "IS_REF", "REF_PACKED", "tune_rows"]
DKDV_TUNERS = _autotuned(_bwd_dkdv_kernel, DKDV_CONFIGS, DKDV_CONFIGS_WIDE, DKDV_KEY)
DKDV_FIXED = _first_that_launches(_bwd_dkdv_kernel, DKDV_CONFIGS, DKDV_CONFIGS_WIDE, DKDV_KEY)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, key_valid, qk_scale, IEEE: tl.constexpr):
    """dQ += dS K for one key block, with P = exp2(Q K^T * scale - lse) and dS = P * (dO V^T - delta)."""
    qk = _dot(q, tl.trans(k), IEEE) * qk_scale
    p = tl.where(key_valid[None, :], tl.math.exp2(qk - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit(do_not_specialize=["tune_rows", "stride_lse_h"])  # (as _fwd_kernel)
def _bwd_dq_kernel(
    Q, DO, LSE2, DELTA, K, V, RK, RV, RIDX, CU_Q, CU_K, CU_R, DQ,
    qk_scale, sm_scale, stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_rkb, stride_rkr, stride_rkh, stride_rvb, stride_rvr, stride_rvh, stride_dqt, stride_dqh, tune_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_REF: tl.constexpr, REF_PACKED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, head, batch = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)  # int64: module doc
    q_start, q_len, offs_m, q_valid, q_rows = _query_block(CU_Q, batch, pid_m, BLOCK_M)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q, do, lse2, delta = _load_query_grads(Q, DO, LSE2, DELTA, q_rows, q_start + offs_m, q_valid, offs_d, d_valid,
                                           head, stride_qt, stride_qh, stride_dot, stride_doh, stride_lse_h)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # the sample's own keys
    k_start = tl.load(CU_K + batch)
    k_len = tl.load(CU_K + batch + 1) - k_start
    for start_n in range(0, k_len, BLOCK_N):
        key_valid = start_n + offs_n < k_len
        rows = (k_start + start_n + offs_n).to(tl.int64)
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(K + rows[:, None] * stride_kt + head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, key_valid, qk_scale, IEEE)

    # the sample's reference keys (gathered, or packed rows)
    if HAS_REF:
        r_start = tl.load(CU_R + batch)
        r_len = tl.load(CU_R + batch + 1) - r_start
        rk_base = RK + batch.to(tl.int64) * stride_rkb + head * stride_rkh
        rv_base = RV + batch.to(tl.int64) * stride_rvb + head * stride_rvh
        for start_n in range(0, r_len, BLOCK_N):
            key_valid = start_n + offs_n < r_len
            idx = _ref_rows(RIDX, r_start, start_n + offs_n, key_valid, REF_PACKED, True)
            kv_mask = key_valid[:, None] & d_valid[None, :]
            k = tl.load(rk_base + idx[:, None] * stride_rkr + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(rv_base + idx[:, None] * stride_rvr + offs_d[None, :], mask=kv_mask, other=0.0)
            dq = _dq_step(dq, q, do, lse2, delta, k, v, key_valid, qk_scale, IEEE)

    dq = dq * sm_scale
    tl.store(DQ + q_rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_valid[:, None] & d_valid[None, :])


DQ_KEY = ["HEAD_DIM", "HAS_REF", "REF_PACKED", "tune_rows"]
DQ_TUNERS = _autotuned(_bwd_dq_kernel, DQ_CONFIGS, DQ_CONFIGS_WIDE, DQ_KEY)
DQ_FIXED = _first_that_launches(_bwd_dq_kernel, DQ_CONFIGS, DQ_CONFIGS_WIDE, DQ_KEY)


DELTA_BLOCK_M = 64


@on_device_of("q")
def attention_backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                       ref_k, ref_v, ref_index, cu_r, max_seqlen_ref, softmax_scale):
    """Launches the backward kernels. Returns ``(dq, dk, dv, dref_k, dref_v)``; the reference-buffer gradients are
    zero on rows no sample kept (and empty tensors when there is no buffer)."""
    tq, heads, dim = q.shape
    batch = cu_q.numel() - 1
    block_d = _block_d(dim)
    ieee = q.dtype == torch.float32
    qk_scale = softmax_scale * LOG2E
    tk = k.shape[0]
    has_ref = ref_k is not None
    dref_k = ref_k.new_zeros(ref_k.shape) if has_ref else q.new_empty(0)
    dref_v = ref_v.new_zeros(ref_v.shape) if has_ref else q.new_empty(0)
    if batch == 0:  # every row is padding
        return _empty_as(q).zero_(), _empty_as(k).zero_(), _empty_as(v).zero_(), dref_k, dref_v
    dq, dk, dv = _empty_as(q), _empty_as(k), _empty_as(v)  # same shapes and strides: dk's serve dv
    # the kernels take lse in base 2; queries that see no key (lse = -inf) take part in no product, and a finite
    # stand-in keeps exp2 NaN-free; a NaN row (NaN scores) stays NaN, as its gradients are
    lse2 = torch.where(lse == float("-inf"), 0.0, lse * LOG2E).contiguous()
    delta = torch.empty_like(lse2)
    if tq or tk:
        _bwd_delta_kernel[(cdiv(max(tq, tk), DELTA_BLOCK_M), heads)](
            out, dout, dlse, delta, cu_q, cu_k, dq, dk, dv, batch, out.stride(0), out.stride(1), dout.stride(0),
            dout.stride(1), tq, tk, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
            HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=DELTA_BLOCK_M, **COMPILE_OPTIONS)

    common = (qk_scale, softmax_scale, q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), lse2.stride(0))
    rk, rv, ridx, cur, _, packed = _ref_args(ref_k, ref_v, ref_index, cu_r, q)
    dkdv, dq_launch = (_for_head(tuners, fixed, block_d, q.dtype)
                       for tuners, fixed in ((DKDV_TUNERS, DKDV_FIXED), (DQ_TUNERS, DQ_FIXED)))
    with _TUNER_LOCK:  # (module comment above _TUNER_LOCK)
        if max_seqlen_k > 0 and k.shape[0] > 0:
            dkdv[lambda meta: (cdiv(max_seqlen_k, meta["BLOCK_N"]), heads, batch)](
                q, dout, lse2, delta, k, v, dk, dv, cu_q, cu_k, cu_k, *common,
                *_ref_strides(k), *_ref_strides(v), *_ref_strides(dk), *_ref_strides(dv),
                _tune_rows(batch, max_seqlen_k, heads),
                HEAD_DIM=dim, BLOCK_D=block_d, IS_REF=False, REF_PACKED=False, IEEE=ieee, **COMPILE_OPTIONS)
        if has_ref and max_seqlen_ref > 0 and ref_k.shape[-3] > 0 and (packed or ref_index.numel() > 0):
            dkdv[lambda meta: (cdiv(max_seqlen_ref, meta["BLOCK_N"]), heads, batch)](
                q, dout, lse2, delta, ref_k, ref_v, dref_k, dref_v, cu_q, cu_r, ridx, *common,
                *_ref_strides(ref_k), *_ref_strides(ref_v), *_ref_strides(dref_k), *_ref_strides(dref_v),
                _tune_rows(batch, max_seqlen_ref, heads),
                HEAD_DIM=dim, BLOCK_D=block_d, IS_REF=True, REF_PACKED=packed, IEEE=ieee, **COMPILE_OPTIONS)
        if tq and max_seqlen_q > 0:
            dq_launch[lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, batch)](
                q, dout, lse2, delta, k, v, rk, rv, ridx, cu_q, cu_k, cur, dq, *common,
                k.stride(0), k.stride(1), v.stride(0), v.stride(1), *_ref_strides(rk), *_ref_strides(rv),
                dq.stride(0), dq.stride(1), _tune_rows(batch, max_seqlen_q, heads),
                HEAD_DIM=dim, BLOCK_D=block_d, HAS_REF=has_ref, REF_PACKED=packed, IEEE=ieee, **COMPILE_OPTIONS)
    return dq, dk, dv, dref_k, dref_v


# ----------------------------------------------------------------------------------------------------------------
# key mass (token-selection probes): the softmax probability each key receives, summed over weighted queries.
# Spec: ``sparsectx.reference.attention_key_mass_ref``. Dense ``[B, S, H, D]`` layouts, no varlen, no gradient.
# Two passes, as the softmax of a query needs all its keys before any of its probabilities is known:
# - rows: one program per (query block, head, sample) streams the keys: each query's max score m (base 2) and its
#   weight over its sum of exp2(s - m), w / l (kept apart from m, not as one log-sum-exp: m + log2(l) in fp32 loses
#   log2(l) once |m| is large);
# - columns: one program per (key block, head, sample) streams the queries: sum_q exp2(s_qk - m_q) * (w_q / l_q).
# Neither pass writes a score: 2·B·H·Q·N·D flops per pass, reading q and k once per block of the other.
# One launch configuration per head-dim class (a probe runs once per pipeline call: autotuning would cost more
# than it saves); fp16/bf16 compile for sm_90 without spills (Triton 3.6, D=40/64/128/160/256).
# ----------------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the rows and the columns kernel, for head rows up to WIDE_ROW_BYTES
# and wider (``_wide_rows``: fp16/bf16 head dims above 128, fp32 above 64). fp32 inputs (IEEE dots, no tensor cores)
# spill at these tiles as at smaller ones (sm_90, Triton 3.6 and 3.9: about 2.5 KB per pass at D=64, 7 KB at D=128):
# correct, slow; fp16/bf16 do not spill.
MASS_CONFIGS = {False: ((128, 64, 8, 3), (64, 128, 8, 3)), True: ((64, 64, 8, 2), (64, 64, 8, 2))}
MASS_INTERPRETER_CONFIG = (32, 32, 4, 1)


def _mass_config(block_d: int, dtype: torch.dtype, columns: bool):
    return MASS_INTERPRETER_CONFIG if interpreter_requested() else MASS_CONFIGS[_wide_rows(block_d, dtype)][columns]


@triton.jit
def _mass_rows_block(PTR, rows, valid, head, stride_t, stride_h, offs_d, d_valid):
    """Rows ``rows`` (int32, within the sample; zeros where not ``valid``) of one head of a sample-offset
    ``[S, H, D]`` tensor, as a ``[rows, BLOCK_D]`` tile."""
    return tl.load(PTR + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :],
                   mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _mass_row_stats(m_i, l_i, s):
    """Folds a block of scaled scores ``s`` (base 2) into each query's running max and sum of exp2(s - max)
    (exponentials from 0 while a row has seen only -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_from = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.math.exp2(m_i - m_from) + tl.sum(tl.math.exp2(s - m_from[:, None]), 1)


@triton.jit
def _mass_rows_kernel(
    Q, K, W, MAX2, SCALE, qk_scale, n_queries, n_keys,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lh, stride_wb,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m, head, batch = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    Q += batch * stride_qb
    K += batch * stride_kb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_valid = offs_m < n_queries
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q = _mass_rows_block(Q, offs_m, q_valid, head, stride_qt, stride_qh, offs_d, d_valid)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # running max and sum of exp2 over every key block: the full blocks unmasked, then the tail
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        k = _mass_rows_block(K, start_n + offs_n, offs_n >= 0, head, stride_kt, stride_kh, offs_d, d_valid)
        m_i, l_i = _mass_row_stats(m_i, l_i, _dot(q, tl.trans(k), IEEE) * qk_scale)
    if n_full < n_keys:
        key_valid = n_full + offs_n < n_keys
        k = _mass_rows_block(K, n_full + offs_n, key_valid, head, stride_kt, stride_kh, offs_d, d_valid)
        m_i, l_i = _mass_row_stats(m_i, l_i, tl.where(key_valid[None, :], _dot(q, tl.trans(k), IEEE) * qk_scale,
                                                       float("-inf")))
    # a query that sees no finite score (sum 0) gives every key probability 0 in the column pass; NaN stays NaN
    none = l_i == 0.0
    stats = batch * stride_lb + head * stride_lh + offs_m
    weight = tl.load(W + batch * stride_wb + offs_m, mask=q_valid, other=0.0)
    tl.store(MAX2 + stats, tl.where(none, 0.0, m_i), mask=q_valid)
    tl.store(SCALE + stats, weight * tl.where(none, 0.0, 1.0 / tl.where(none, 1.0, l_i)), mask=q_valid)


@triton.jit
def _mass_column_sums(Q, MAX2, SCALE, k, rows, q_valid, head, stride_qt, stride_qh, offs_d, d_valid, qk_scale,
                      MASK_QUERIES: tl.constexpr, IEEE: tl.constexpr):
    """Per key of the block ``k``: its probability under the queries ``rows``, each weighted by its SCALE, summed.
    The scores are taken transposed, keys as rows: the key block stays the product's register operand, loaded once,
    and the sum over the queries runs along each row, within a warp (as rows, it would cross the warps in every
    block). MASK_QUERIES: the block is the tail, its queries past the end add nothing (also where a key of -inf meets
    their zero padding: 0 * -inf = NaN)."""
    q = _mass_rows_block(Q, rows, q_valid, head, stride_qt, stride_qh, offs_d, d_valid)
    m = tl.load(MAX2 + rows, mask=q_valid, other=0.0)
    weight = tl.load(SCALE + rows, mask=q_valid, other=0.0)
    s = _dot(k, tl.trans(q), IEEE) * qk_scale  # [keys, queries]; keys past the end: their row is not stored
    p = tl.math.exp2(s - m[None, :]) * weight[None, :]
    if MASK_QUERIES:
        p = tl.where(q_valid[None, :], p, 0.0)
    return tl.sum(p, 1)


@triton.jit
def _mass_columns_kernel(
    Q, K, MAX2, SCALE, MASS, qk_scale, n_queries, n_keys,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_lb, stride_lh, stride_mb, stride_mh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n, head, batch = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    Q += batch * stride_qb
    MAX2 += batch * stride_lb + head * stride_lh
    SCALE += batch * stride_lb + head * stride_lh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = offs_n < n_keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k = _mass_rows_block(K + batch * stride_kb, offs_n, key_valid, head, stride_kt, stride_kh, offs_d, d_valid)
    mass = tl.zeros([BLOCK_N], dtype=tl.float32)
    # this key block's probability under every query, weighted and summed over the query blocks: the full blocks
    # unmasked, then the tail
    n_full = (n_queries // BLOCK_M) * BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        mass += _mass_column_sums(Q, MAX2, SCALE, k, start_m + offs_m, offs_m >= 0, head, stride_qt, stride_qh,
                                  offs_d, d_valid, qk_scale, False, IEEE)
    if n_full < n_queries:
        rows = n_full + offs_m
        mass += _mass_column_sums(Q, MAX2, SCALE, k, rows, rows < n_queries, head, stride_qt, stride_qh, offs_d,
                                  d_valid, qk_scale, True, IEEE)
    tl.store(MASS + batch * stride_mb + head * stride_mh + offs_n, mass, mask=key_valid)


@on_device_of("q")
def attention_key_mass(q, k, weights, softmax_scale):
    """Launches the two key-mass kernels on ``q [B, Q, H, D]``, ``k [B, N, H, D]`` (last dim contiguous) and fp32
    ``weights [B, Q]`` (last dim contiguous). Returns fp32 ``[B, H, N]``: per head, ``sum_q weights[b, q] *
    softmax_n(scale * q·k)``."""
    batch, n_queries, heads, dim = q.shape
    n_keys = k.shape[1]
    if batch == 0 or heads == 0 or n_keys == 0 or n_queries == 0:
        return torch.zeros((batch, heads, n_keys), dtype=torch.float32, device=q.device)
    mass = torch.empty((batch, heads, n_keys), dtype=torch.float32, device=q.device)  # every element is stored
    max2, scale = torch.empty((2, batch, heads, n_queries), dtype=torch.float32, device=q.device)  # per query
    block_d = _block_d(dim)
    common = dict(HEAD_DIM=dim, BLOCK_D=block_d, IEEE=q.dtype == torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               max2.stride(0), max2.stride(1))
    block_m, block_n, warps, stages = _mass_config(block_d, q.dtype, columns=False)
    _mass_rows_kernel[(cdiv(n_queries, block_m), heads, batch)](
        q, k, weights, max2, scale, softmax_scale * LOG2E, n_queries, n_keys, *strides, weights.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common, **COMPILE_OPTIONS)
    block_m, block_n, warps, stages = _mass_config(block_d, q.dtype, columns=True)
    _mass_columns_kernel[(cdiv(n_keys, block_n), heads, batch)](
        q, k, max2, scale, mass, softmax_scale * LOG2E, n_queries, n_keys, *strides, mass.stride(0), mass.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common, **COMPILE_OPTIONS)
    return mass


INTERPRETED = built_for_interpreter(_fwd_kernel)  # how this module's kernels were built (see ops.backend_for)
if not INTERPRETED:  # (the same binaries on disk for every process: _launch.hash_in_definition_order)
    hash_in_definition_order(globals())
