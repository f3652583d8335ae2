"""Token compaction kernels: keep-mask or top-k selection -> packed kept rows, and the inverse scatter.

Three kernels, each one concept (the plain-torch specification is in ``sparsectx/reference.py``:
``topk_keep_mask``, ``compact_ref``, ``scatter_ref``):

- ``_compact_index_kernel`` (one program per sample): decides which tokens a sample keeps, either from a keep mask
  or as the ``k`` highest scores (ties to the lower index; found on the device by bisection over order-preserving
  integer keys, so no host sync), then writes each kept token's position at its packed row (stream compaction:
  block-wise exclusive prefix sums with a running carry) and the sample's ``cu_seqlens`` entry.
- ``_gather_rows_kernel`` (grid: packed-row blocks x feature blocks): copies the kept rows of up to
  ``PAYLOADS_PER_LAUNCH`` payloads ``[B, N, C]`` into their packed ``[rows, C]`` outputs; rows past the kept total
  are zero-filled.
- ``_scatter_rows_kernel`` (same grid): the inverse, writes packed rows (or zeros) to ``out[b, index]``.

The row kernels only load and store payload values (never compute on them), so every dtype is copied bit-exactly,
bf16 included under the interpreter. Offsets into payloads are int64.

Launchers (all take device tensors and return device tensors; which ones read the device from the host is said
in each docstring): ``compact_index``, ``gather_rows``, ``scatter_rows``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# Bits of the order-preserving integer key of an fp32 score: the top-k threshold is found one bit per step.
KEY_BITS = tl.constexpr(32)
# Bit pattern of +inf in fp32: larger magnitudes are NaN.
FP32_INF_BITS = tl.constexpr(0x7F800000)
# Largest token block the selection kernel holds at once; longer samples are processed in several blocks.
MAX_SELECT_BLOCK = 16384
# Payloads copied by one gather launch (more are split over several launches).
PAYLOADS_PER_LAUNCH = 3
# Row-copy tile: packed rows x (at most) feature columns per program.
COPY_BLOCK_ROWS = 16
COPY_MAX_BLOCK_COLS = 512


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _score_keys(scores_ptr, row_offset, stride_n, pos, valid):
    """int32 keys whose signed order is torch.sort's order of the fp32 scores: sign-magnitude float bits -> two's
    complement (so -0.0 and +0.0 get the same key, as they compare equal), and every NaN -> INT32_MAX, above +inf."""
    score = tl.load(scores_ptr + row_offset + pos.to(tl.int64) * stride_n, mask=valid, other=0.0).to(tl.float32)
    bits = score.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -magnitude, bits)
    return tl.where(magnitude > FP32_INF_BITS, 0x7FFFFFFF, key)


@triton.jit
def _topk_cut(scores_ptr, row_offset, stride_n, n_tokens, k, idx_bits, BLOCK_N: tl.constexpr):
    """Returns ``(threshold, cut)`` such that the k highest scores of the row, ties to the lower index, are exactly
    the tokens with ``key > threshold`` or ``key == threshold and position < cut``."""
    # 1) threshold = the k-th largest key = the largest t with count(key >= t) >= k, built greedily from the top
    #    bit. The search runs over the unsigned offset u = t + 2**31 (int64), so every candidate fits in int32.
    u = tl.zeros((), dtype=tl.int64)
    for step in range(KEY_BITS):
        bit = tl.full((), 1, dtype=tl.int64) << (KEY_BITS - 1 - step)
        candidate = (u + bit - 0x7FFFFFFF - 1).to(tl.int32)
        count_ge = 0
        for start in range(0, n_tokens, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < n_tokens
            key = _score_keys(scores_ptr, row_offset, stride_n, pos, valid)
            count_ge += tl.sum((valid & (key >= candidate)).to(tl.int32))
        if count_ge >= k:
            u += bit
    threshold = (u - 0x7FFFFFFF - 1).to(tl.int32)  # k = 0: INT32_MAX, only NaN ties it (and none is kept)

    # 2) keys above the threshold are all kept; `need` of the keys equal to it are kept too
    count_gt = 0
    count_eq = 0
    for start in range(0, n_tokens, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < n_tokens
        key = _score_keys(scores_ptr, row_offset, stride_n, pos, valid)
        count_gt += tl.sum((valid & (key > threshold)).to(tl.int32))
        count_eq += tl.sum((valid & (key == threshold)).to(tl.int32))
    need = k - count_gt

    # 3) ties: cut = the largest c with count(key == threshold and position < c) <= need, i.e. the position of the
    #    first tie that is not kept (bisection over the position bits); all ties are kept when none is dropped.
    cut = n_tokens
    if need < count_eq:
        cut = 0
        for step in range(idx_bits):
            candidate = cut + (1 << (idx_bits - 1 - step))
            count_lt = 0
            for start in range(0, n_tokens, BLOCK_N):
                pos = start + tl.arange(0, BLOCK_N)
                valid = pos < n_tokens
                key = _score_keys(scores_ptr, row_offset, stride_n, pos, valid)
                count_lt += tl.sum((valid & (key == threshold) & (pos < candidate)).to(tl.int32))
            if count_lt <= need:
                cut = candidate
    return threshold, cut


@triton.jit
def _compact_index_kernel(
    sel_ptr, stride_sel_b, stride_sel_n, n_tokens,
    counts_ptr, uniform_count, n_samples,
    index_ptr, cu_seqlens_ptr, n_rows, idx_bits,
    HAS_SCORES: tl.constexpr, PER_SAMPLE_COUNTS: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program b: keep set of sample b (mask, or top-k of scores), then index[cu_seqlens[b] + rank] = position for
    every kept token in order, and cu_seqlens[b + 1]. The last program zero-fills index rows past the kept total."""
    b = tl.program_id(0)
    # where this sample's packed rows start, and how many it keeps (host-known counts: one scalar for all samples)
    if PER_SAMPLE_COUNTS:
        samples = tl.arange(0, B_PAD)
        counts = tl.load(counts_ptr + samples, mask=samples < n_samples, other=0)
        row_start = tl.sum(tl.where(samples < b, counts, 0))
        k = tl.load(counts_ptr + b)
    else:
        row_start = b * uniform_count
        k = uniform_count
    row_offset = b.to(tl.int64) * stride_sel_b
    tl.store(cu_seqlens_ptr + b + 1, row_start + k)
    if b == 0:
        tl.store(cu_seqlens_ptr, 0)

    if HAS_SCORES:
        threshold, cut = _topk_cut(sel_ptr, row_offset, stride_sel_n, n_tokens, k, idx_bits, BLOCK_N)

    # stream compaction: rank of each kept token = kept tokens before it in this sample (running carry over blocks)
    carry = 0
    for start in range(0, n_tokens, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < n_tokens
        if HAS_SCORES:
            key = _score_keys(sel_ptr, row_offset, stride_sel_n, pos, valid)
            keep = valid & ((key > threshold) | ((key == threshold) & (pos < cut)))
        else:
            keep = valid & (tl.load(sel_ptr + row_offset + pos.to(tl.int64) * stride_sel_n, mask=valid, other=0) != 0)
        kept = keep.to(tl.int32)
        row = row_start + carry + tl.cumsum(kept, 0) - kept
        tl.store(index_ptr + row, pos, mask=keep & (row < n_rows))
        carry += tl.sum(kept)

    # padding rows of an output sized for more than the kept total get index 0
    if b == n_samples - 1:
        for start in range(row_start + k, n_rows, BLOCK_N):
            row = start + tl.arange(0, BLOCK_N)
            tl.store(index_ptr + row, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=row < n_rows)


@triton.jit
def _sample_of_rows(cu_seqlens_ptr, rows, n_samples, B_PAD: tl.constexpr):
    """Sample of each packed row (the number of samples that end at or before it) and whether the row is valid."""
    samples = tl.arange(0, B_PAD)
    ends = tl.load(cu_seqlens_ptr + 1 + samples, mask=samples < n_samples, other=0)
    ended = (samples < n_samples)[None, :] & (ends[None, :] <= rows[:, None])
    sample = tl.sum(ended.to(tl.int32), axis=1)
    total = tl.load(cu_seqlens_ptr + n_samples)
    return sample, rows < total


@triton.jit
def _copy_kept_rows(src_ptr, dst_ptr, width, stride_b, stride_n, sample, pos, rows, kept, in_output, cols):
    """dst[rows, cols] = src[sample, pos, cols] for kept rows, 0 for the other rows of the output."""
    col_ok = cols < width
    src_row = sample.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_n
    values = tl.load(src_ptr + src_row[:, None] + cols[None, :], mask=kept[:, None] & col_ok[None, :], other=0)
    dst_row = rows.to(tl.int64) * width
    tl.store(dst_ptr + dst_row[:, None] + cols[None, :], values, mask=in_output[:, None] & col_ok[None, :])


@triton.jit
def _gather_rows_kernel(
    index_ptr, cu_seqlens_ptr, n_samples, n_rows,
    src0, dst0, width0, stride_b0, stride_n0,
    src1, dst1, width1, stride_b1, stride_n1,
    src2, dst2, width2, stride_b2, stride_n2,
    NUM_PAYLOADS: tl.constexpr, B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Packed rows [pid_r * BLOCK_R, +BLOCK_R) x columns [pid_c * BLOCK_C, +BLOCK_C) of every payload."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_output = rows < n_rows
    sample, kept = _sample_of_rows(cu_seqlens_ptr, rows, n_samples, B_PAD)
    kept = kept & in_output
    pos = tl.load(index_ptr + rows, mask=kept, other=0)
    _copy_kept_rows(src0, dst0, width0, stride_b0, stride_n0, sample, pos, rows, kept, in_output, cols)
    if NUM_PAYLOADS > 1:
        _copy_kept_rows(src1, dst1, width1, stride_b1, stride_n1, sample, pos, rows, kept, in_output, cols)
    if NUM_PAYLOADS > 2:
        _copy_kept_rows(src2, dst2, width2, stride_b2, stride_n2, sample, pos, rows, kept, in_output, cols)


@triton.jit
def _scatter_rows_kernel(
    src_ptr, index_ptr, cu_seqlens_ptr, n_samples, n_rows, n_tokens,
    out_ptr, width, stride_b, stride_n,
    HAS_SRC: tl.constexpr, B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[sample, index[row], cols] = src[row, cols] (or 0 without src) for the valid packed rows of this block."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    sample, valid = _sample_of_rows(cu_seqlens_ptr, rows, n_samples, B_PAD)
    valid = valid & (rows < n_rows)
    pos = tl.load(index_ptr + rows, mask=valid, other=0)
    valid = valid & (pos >= 0) & (pos < n_tokens)  # a malformed index never writes out of bounds
    mask = valid[:, None] & col_ok[None, :]
    if HAS_SRC:
        values = tl.load(src_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], mask=mask, other=0)
    else:
        values = tl.zeros((BLOCK_R, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    out_row = sample.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_n
    tl.store(out_ptr + out_row[:, None] + cols[None, :], values, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def _select_config(n_tokens: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the selection kernel: one block holds the whole sample when it fits."""
    block = min(triton.next_power_of_2(max(n_tokens, 16)), MAX_SELECT_BLOCK)
    return block, max(1, min(16, block // 1024))


def _copy_config(max_width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the row kernels."""
    block_c = min(triton.next_power_of_2(max(max_width, 1)), COPY_MAX_BLOCK_COLS)
    return COPY_BLOCK_ROWS, block_c, 4


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...]`` -> ``[B, N, C]`` view with unit column stride (copies only when the trailing dims can not be
    flattened); bool is copied as bytes."""
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    flat = t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def compact_index(
    selection: torch.Tensor, counts: Optional[Sequence[int]] = None, n_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions per sample, packed: ``(index int32 [n_rows], cu_seqlens int32 [B+1])``.

    ``selection`` is a keep mask bool ``[B, N]`` or scores ``[B, N]`` (fp32/fp16, bf16 on GPU only). ``counts``
    (host ints, one per sample) is required with scores (the ``counts[b]`` highest scores are kept, ties to the
    lower index) and optional with a mask (then it must equal the mask's row sums). ``n_rows`` (default: the kept
    total) sizes ``index``; rows past the kept total hold 0, and with a mask a smaller ``n_rows`` drops the rows
    past it (``cu_seqlens`` still counts them).

    Host sync: none when ``counts`` is given (the scores path) or when a mask comes with ``n_rows``; a mask without
    ``n_rows`` reads the kept total once.
    """
    batch, n_tokens = selection.shape
    device = selection.device
    has_scores = selection.dtype != torch.bool
    if has_scores and counts is None:
        raise ValueError("counts is required when selection holds scores")
    if counts is not None:
        counts = [int(c) for c in counts]
        uniform = len(set(counts)) <= 1
        uniform_count = counts[0] if counts else 0
        if n_rows is None:
            n_rows = sum(counts)
        counts_dev = None if uniform else _to_device_int32(counts, device)
    else:
        uniform, uniform_count = False, 0
        counts_dev = selection.sum(dim=1, dtype=torch.int32)
        if n_rows is None:
            n_rows = int(counts_dev.sum())  # the one host read of the mask path
    index = torch.empty(n_rows, dtype=torch.int32, device=device)
    if batch == 0:
        return index.zero_(), torch.zeros(1, dtype=torch.int32, device=device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=device)
    sel = selection if has_scores else selection.view(torch.uint8)
    block_n, num_warps = _select_config(n_tokens)
    _compact_index_kernel[(batch,)](
        sel, sel.stride(0), sel.stride(1), n_tokens,
        counts_dev if counts_dev is not None else index, uniform_count, batch,
        index, cu_seqlens, n_rows, max(n_tokens - 1, 0).bit_length(),
        HAS_SCORES=has_scores, PER_SAMPLE_COUNTS=not uniform, B_PAD=triton.next_power_of_2(batch),
        BLOCK_N=block_n, num_warps=num_warps,
    )
    return index, cu_seqlens


def _to_device_int32(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host ints -> int32 device tensor without waiting for the device (pinned, asynchronous copy on CUDA)."""
    host = torch.tensor(values, dtype=torch.int32, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def gather_rows(
    payloads: Sequence[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor, n_rows: int,
) -> list[torch.Tensor]:
    """Packed copies ``[n_rows, ...]`` of the kept rows of each payload ``[B, N, ...]`` (any dtype, any strides on the
    first two dims): row r holds ``payload[b, index[r]]`` for the sample b whose range of ``cu_seqlens`` contains r,
    and zeros for ``r >= cu_seqlens[-1]``. Never reads the device from the host."""
    outputs = [torch.empty((n_rows, *p.shape[2:]), dtype=p.dtype, device=p.device) for p in payloads]
    batch = cu_seqlens.numel() - 1
    if n_rows == 0 or not payloads:
        return outputs
    for first in range(0, len(payloads), PAYLOADS_PER_LAUNCH):
        group = [(_as_rows(p), _as_rows(o.view(1, *o.shape)))
                 for p, o in zip(payloads[first:first + PAYLOADS_PER_LAUNCH],
                                 outputs[first:first + PAYLOADS_PER_LAUNCH])]
        max_width = max(src.shape[2] for src, _ in group)
        if max_width == 0:
            continue
        block_r, block_c, num_warps = _copy_config(max_width)
        args = []
        for src, dst in group + [group[0]] * (PAYLOADS_PER_LAUNCH - len(group)):  # unused slots repeat the first
            args += [src, dst, src.shape[2], src.stride(0), src.stride(1)]
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(max_width, block_c))
        _gather_rows_kernel[grid](
            index, cu_seqlens, batch, n_rows, *args,
            NUM_PAYLOADS=len(group), B_PAD=triton.next_power_of_2(max(batch, 1)),
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
        )
    return outputs


def scatter_rows(
    packed: Optional[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor,
) -> torch.Tensor:
    """In place: ``out[b, index[r]] = packed[r]`` for the valid packed rows r (``r < cu_seqlens[-1]``), or zeros there
    when ``packed`` is None; other positions of ``out`` ``[B, N, ...]`` keep their values. ``packed`` has ``index``'s
    row count and ``out``'s trailing shape. Returns ``out``. Never reads the device from the host."""
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written in place)")
    batch, n_tokens = out.shape[:2]
    dst = _as_rows(out)
    n_rows, width = index.numel(), dst.shape[2]
    if n_rows == 0 or width == 0 or batch == 0:
        return out
    src = None if packed is None else _as_rows(packed.contiguous().view(1, *packed.shape))
    block_r, block_c, num_warps = _copy_config(width)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(width, block_c))
    _scatter_rows_kernel[grid](
        src, index, cu_seqlens, batch, n_rows, n_tokens, dst, width, dst.stride(0), dst.stride(1),
        HAS_SRC=src is not None, B_PAD=triton.next_power_of_2(batch),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out

