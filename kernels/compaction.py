"""Token compaction kernels: keep-mask or top-k selection -> packed kept rows, and the inverse scatter.

Six kernels, each one concept (the plain-torch specification is in ``sparsectx/reference.py``:
``topk_keep_mask``, ``compact_ref``, ``scatter_ref``, ``ranked_keep_mask_ref``):

- ``_topk_threshold_kernel`` (one program per sample, scores only): the keep rule of top-k, ties to the lower
  index, without a host sync. A radix select over order-preserving integer keys, two bits per pass (16 passes of
  one three-count reduction; a row held in registers first decides the leading digits all its keys share, from its
  largest and smallest key), finds the k-th largest key (``threshold``) and how many keys lie above it; the sample
  keeps the keys above it and the first ``need = k - above`` keys equal to it. On long rows the first passes
  count over the whole row and, once few keys share the threshold's leading digits, the rest over those keys
  only, compacted through a scratch row. A row that fits in one block is loaded once and held in registers, and the
  program then writes the sample's packed index rows itself (one prefix scan over the row): the scores path is
  then this launch and the row gather.
- ``_block_counts_kernel`` (grid: samples x token blocks): counts the tokens above the threshold (a mask's kept
  tokens) and the ties in each token block; launched for masks and for rows longer than one selection block.
- ``_write_index_kernel`` (same grid): stream compaction. Each program sums the counts of its sample's earlier
  blocks (for a mask, also those of the earlier samples: its packed rows' start, with no reduction of the mask
  launched before), ranks its block's tokens with a local prefix scan, and writes each kept token's position at
  its packed row; it also writes ``cu_seqlens`` and zero-fills index rows past the kept total.
- ``_gather_rows_kernel`` (grid: packed-row blocks x feature blocks): copies the kept rows of up to
  ``PAYLOADS_PER_LAUNCH`` payloads ``[B, N, C]`` into their packed ``[rows, C]`` outputs, each in a column tile of
  its own width (position ids beside hidden states take few registers); rows past the kept total are zero-filled
  (or, when the caller never reads them, not written).
- ``_scatter_rows_kernel`` (same grid): the inverse, writes packed rows (or zeros) to ``out[b, index]``.
- ``_ranked_keep_kernel`` (one program per sample and reference image): the selection budgets' keep mask. Given
  each image's scores sorted in descending order (``torch.sort``, stable: ties to the lower index) and their
  positions, it keeps the first ``count`` of them, ``count`` given or adaptive: the fewest top-ranked tokens whose
  score mass (linear, ``max(score, 0) / sum``, or softmax; summed in fp64) reaches a coverage of the image's mass,
  within a floor and a cap. It replaces some twenty small torch ops after the sort, each a launch.

The row kernels only load and store payload values (never compute on them), so every dtype is copied bit-exactly,
bf16 included under the interpreter. Offsets into payloads are int64.

Launchers (all take device tensors and return device tensors; which ones read the device from the host is said
in each docstring): ``compact_index``, ``gather_rows``, ``scatter_rows``, ``ranked_keep_mask``.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._launch import (COMPILE_OPTIONS, built_for_interpreter, cdiv, hash_in_definition_order, next_power_of_2,
                      on_device_of, to_device)

# Order-preserving integer keys of fp32 scores: the top-k threshold is found RADIX_BITS bits per pass. Two bits per
# pass need 3 counts per pass (candidate digits 1..3); more bits per pass would cost 2**bits - 1 counts, each a full
# compare-and-add over the row, for fewer passes: two is the cheapest total on one SM for rows of ~10k tokens.
KEY_BITS = tl.constexpr(32)
RADIX_BITS = tl.constexpr(2)
RADIX_PASSES = tl.constexpr(KEY_BITS.value // RADIX_BITS.value)
# (_digit_counts and _accept_digit count the 2**RADIX_BITS - 1 = 3 candidate digits of a pass one by one)
assert RADIX_BITS.value == 2, "the radix passes are written for three candidate digits"
# Offset between a signed int32 key and its unsigned rank in [0, KEY_RANGE = 2**32).
KEY_OFFSET = tl.constexpr(1 << 31)
KEY_RANGE = tl.constexpr(1 << KEY_BITS.value)
# Key of positions past the row's end: below every real key (-inf is -0x7F800000), so never counted, kept or tied.
PAD_KEY = tl.constexpr(-(1 << 31))
# Bit pattern of +inf in fp32: larger magnitudes are NaN.
FP32_INF_BITS = tl.constexpr(0x7F800000)
# INT32_MAX: the mask of an fp32's magnitude bits, and the largest key (every NaN's, above +inf's).
INT32_MAX = tl.constexpr(0x7FFFFFFF)
# Candidate filter of the selection kernel, on rows of at least FILTER_MIN_TOKENS tokens: once at most CAND_BLOCK
# keys (1 / CAND_BLOCK_FRACTION of the selection block) share the digits of the threshold decided so far, they are
# compacted, held in registers and counted alone by the remaining passes (spread fp32 scores: after about 6 of the
# 16 passes, their sign, exponent and top mantissa bits; scores tied at the threshold never narrow, and every pass
# then counts the whole row, as without the filter).
FILTER_MIN_TOKENS = 2048
CAND_BLOCK_FRACTION = 16
# The selection kernel reads a block of tokens as a tile whose thread t holds ROW_REPS consecutive tokens, from
# t x ROW_REPS (``_tile_positions``): a prefix count in token order over the tile (the filter's compaction, the
# index rows' ranks) is then one scan within each thread and one across the threads (``_tile_prefix``), where a tile
# in token order (4 consecutive tokens per thread, every 4 x threads tokens) crosses the threads once per
# 4 x threads tokens.
# Largest token block the selection kernel holds at once: a row that fits is loaded once and kept in registers for
# every pass; longer rows are streamed block by block in each pass.
MAX_SELECT_BLOCK = 16384
# Several per-token flags of a block are summed (or prefix-summed) by one reduction (or scan) in 16-bit fields of
# one integer: a block's count, at most MAX_SELECT_BLOCK, fits in a field.
COUNT_FIELD_BITS = tl.constexpr(16)
COUNT_FIELD_MASK = tl.constexpr((1 << 16) - 1)
assert MAX_SELECT_BLOCK < 1 << COUNT_FIELD_BITS.value, "a block's count must fit in a count field"
# Token block of one program of the block-count and index-write kernels (a short local scan: many programs per
# sample instead of one long scan), and their warps.
COMPACT_BLOCK = 1024
COMPACT_WARPS = 4
# Block counts summed by one step of the index kernel's loop over the earlier samples of a mask (samples x blocks).
COUNT_TILE = 4096
assert COMPACT_BLOCK < 1 << COUNT_FIELD_BITS.value, "a block's count must fit in a count field"
# Payloads copied by one gather launch (more are split over several launches).
PAYLOADS_PER_LAUNCH = 3
# Row-copy tile: packed rows x (at most) feature columns per program.
COPY_BLOCK_ROWS = 16
COPY_MAX_BLOCK_COLS = 512
# the narrowest column tile (a bool payload of width 1 beside others: Triton 3.9 put 8 B of a 16 x 1 tile on the
# stack, a spill the compile check refuses)
COPY_MIN_BLOCK_COLS = 16
# Ranked keep masks: the sorted tokens of one image are read RANK_BLOCK at a time by RANK_WARPS warps (a reference
# of 64 x 64 latent tokens in 8 steps per pass). The adaptive form's masses are fp64, and ptxas caps these kernels'
# registers low (64 to 98 on sm_90): with every mass and score dtype compiled for sm_90 with Triton 3.6 and 3.9,
# 512 on 4 warps holds at most 64 registers and spills nothing; 1024 on 4 warps spilled in 2 binaries with 3.6, on
# 8 warps in 8 and 11, and 4096 spilled up to 136 B (measured before the adaptive loops accumulated lane by lane).
RANK_BLOCK = 512
RANK_WARPS = 4
# fp64's smallest normal number (torch.finfo(torch.float64).tiny): the floor of the linear mass's divisors.
FP64_TINY = tl.constexpr(2.2250738585072014e-308)
# How an adaptive count reads the scores as a distribution (reference.score_mass's modes).
MASS_LINEAR = tl.constexpr(0)
MASS_SOFTMAX = tl.constexpr(1)
MASS_AUTO = tl.constexpr(2)  # softmax for a row with a negative score, linear otherwise
MASS_MODES = {"linear": MASS_LINEAR.value, "softmax": MASS_SOFTMAX.value, "auto": MASS_AUTO.value}
# The row kernels find each row's sample in a [COPY_BLOCK_ROWS, samples] block, at most Triton's 2**20 elements:
# sparsectx.ops refuses batches above MAX_COMPACT_SAMPLES (65536) before any launch.
assert COPY_BLOCK_ROWS * 65536 <= 1 << 20, "ops.MAX_COMPACT_SAMPLES samples must fit in one row-kernel block"


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _score_keys(scores_ptr, row_offset, stride_n, pos, valid):
    """int32 keys whose signed order is torch.sort's order of the fp32 scores: sign-magnitude float bits -> two's
    complement (so -0.0 and +0.0 get the same key, as they compare equal), every NaN -> INT32_MAX, above +inf, and
    PAD_KEY where not ``valid``."""
    score = tl.load(scores_ptr + row_offset + pos.to(tl.int64) * stride_n, mask=valid, other=0.0).to(tl.float32)
    bits = score.to(tl.int32, bitcast=True)
    magnitude = bits & INT32_MAX
    key = tl.where(bits < 0, -magnitude, bits)
    key = tl.where(magnitude > FP32_INF_BITS, INT32_MAX, key)
    return tl.where(valid, key, PAD_KEY)


@triton.jit
def _tile_positions(REPS: tl.constexpr, THREADS: tl.constexpr):
    """Token offsets of a tile of ``REPS · THREADS`` tokens, entry ``i = r · THREADS + t`` holding token
    ``t · REPS + r``: thread t (Triton gives entry i to thread ``i % THREADS``, as the offsets, built through a
    remainder and a quotient, are not contiguous for it) holds the REPS consecutive tokens from ``t · REPS``."""
    flat = tl.arange(0, REPS * THREADS)
    return (flat % THREADS) * REPS + flat // THREADS


@triton.jit
def _tile_prefix(x, REPS: tl.constexpr, THREADS: tl.constexpr):
    """Exclusive prefix sums in token order of a tile (``_tile_positions``): the earlier threads' sums (one scan
    across the threads) plus the sums of the thread's earlier tokens (a scan within the thread)."""
    column = tl.reshape(x, (REPS, THREADS))  # (column t: thread t's tokens in order)
    per_thread = tl.sum(column, 0)
    before = (tl.cumsum(per_thread, 0) - per_thread)[None, :] + (tl.cumsum(column, 0) - column)
    return tl.reshape(before, (REPS * THREADS,))


@triton.jit
def _block_keys(scores_ptr, row_offset, stride_n, n_tokens, start, row_keys, REPS: tl.constexpr,
                THREADS: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Keys of the tile of tokens from ``start``: the row's keys held since the start (ONE_BLOCK), else loaded now."""
    if ONE_BLOCK:
        return row_keys
    else:
        pos = start + _tile_positions(REPS, THREADS)
        return _score_keys(scores_ptr, row_offset, stride_n, pos, pos < n_tokens)


@triton.jit
def _digit_counts(key, u, bit):
    """count(key >= u + d * bit) for d = 1, 2, 3 over one block of keys: one reduction of three 16-bit fields."""
    cand1 = (u + bit - KEY_OFFSET).to(tl.int32)
    cand2 = (u + 2 * bit - KEY_OFFSET).to(tl.int32)
    cand3 = (u + 3 * bit - KEY_OFFSET).to(tl.int32)
    fields = ((key >= cand1).to(tl.int64) + ((key >= cand2).to(tl.int64) << COUNT_FIELD_BITS)
              + ((key >= cand3).to(tl.int64) << (2 * COUNT_FIELD_BITS)))
    block_counts = tl.sum(fields)
    return ((block_counts & COUNT_FIELD_MASK).to(tl.int32),
            ((block_counts >> COUNT_FIELD_BITS) & COUNT_FIELD_MASK).to(tl.int32),
            (block_counts >> (2 * COUNT_FIELD_BITS)).to(tl.int32))


@triton.jit
def _accept_digit(u, bit, k, count1, count2, count3, count_above, count_from_u):
    """One radix step: the digit of the threshold at ``bit`` (how many candidates u + d * bit keep count >= k; the
    counts fall as d rises) appended to ``u``; returns the new ``u``, count(key >= u + bit) and count(key >= u)."""
    digit = (count1 >= k).to(tl.int32) + (count2 >= k).to(tl.int32) + (count3 >= k).to(tl.int32)
    count_above = tl.where(digit == 0, count1, tl.where(digit == 1, count2, tl.where(digit == 2, count3,
                                                                                       count_above)))
    count_from_u = tl.where(digit == 0, count_from_u, tl.where(digit == 1, count1, tl.where(digit == 2, count2,
                                                                                            count3)))
    return u + digit.to(tl.int64) * bit, count_above, count_from_u


@triton.jit
def _largest_and_smallest(largest_a, smallest_a, largest_b, smallest_b):
    """Combine of a reduction to (the largest, the smallest) of a tile."""
    return tl.maximum(largest_a, largest_b), tl.minimum(smallest_a, smallest_b)


@triton.jit
def _pass_bit(step):
    """The lowest bit of the digit that radix pass ``step`` decides."""
    return tl.full((), KEY_RANGE, dtype=tl.int64) >> ((step + 1) * RADIX_BITS)


@triton.jit
def _topk_threshold(scores_ptr, row_offset, stride_n, n_tokens, k, row_keys, candidates_ptr,
                    BLOCK_N: tl.constexpr, REPS: tl.constexpr, THREADS: tl.constexpr, ONE_BLOCK: tl.constexpr,
                    CAND_BLOCK: tl.constexpr):
    """Returns ``(threshold, count_above)``: the k-th largest key (k = 0: a key that none lies above) and the number
    of keys above it. The k highest scores, ties to the lower index, are the keys above the threshold and the first
    ``k - count_above`` keys equal to it."""
    # Radix select: threshold = the largest t with count(key >= t) >= k, built RADIX_BITS bits per pass from the top,
    # over the unsigned rank u = t + KEY_OFFSET (int64, so every candidate fits in int32 once offset back).
    # Invariants after each pass: count_above = count(key >= u + bit), the keys above every threshold u can still
    # become (0 before the first pass), and count_from_u = count(key >= u) (every real key before the first pass):
    # the keys in [u, u + bit), which share the digits decided so far, number count_from_u - count_above.
    u = tl.zeros((), dtype=tl.int64)
    count_above = tl.zeros((), dtype=tl.int32)
    count_from_u = tl.zeros((), dtype=tl.int32) + n_tokens
    step = tl.zeros((), dtype=tl.int32)
    if ONE_BLOCK:
        # 0) the passes whose digit every key shares are decided at once: those of the leading digits the row's
        # largest and smallest keys have in common (positions past the row's end, PAD_KEY, left out of the smallest;
        # a row of one value decides every digit here). The invariants hold: every key lies in [u, u + the lowest
        # decided digit's bit), so count_from_u is every key and count_above none.
        largest, smallest = tl.reduce((row_keys, tl.where(row_keys == PAD_KEY, INT32_MAX, row_keys)), 0,
                                      _largest_and_smallest)
        top = largest.to(tl.int64) + KEY_OFFSET
        bottom = smallest.to(tl.int64) + KEY_OFFSET
        while (step < RADIX_PASSES) & ((top >> (KEY_BITS - RADIX_BITS * (step + 1)))
                                       == (bottom >> (KEY_BITS - RADIX_BITS * (step + 1)))):
            step += 1
        u = (bottom >> (KEY_BITS - RADIX_BITS * step)) << (KEY_BITS - RADIX_BITS * step)
    # 1) passes over the whole row, while more keys than CAND_BLOCK share the digits decided so far (CAND_BLOCK = 0:
    # every pass; with ties at the threshold the range never narrows, and every pass runs here too)
    while (step < RADIX_PASSES) & (count_from_u - count_above > CAND_BLOCK):
        bit = _pass_bit(step)
        count1 = 0
        count2 = 0
        count3 = 0
        for start in range(0, n_tokens, BLOCK_N):
            key = _block_keys(scores_ptr, row_offset, stride_n, n_tokens, start, row_keys, REPS, THREADS, ONE_BLOCK)
            block1, block2, block3 = _digit_counts(key, u, bit)
            count1 += block1
            count2 += block2
            count3 += block3
        u, count_above, count_from_u = _accept_digit(u, bit, k, count1, count2, count3, count_above, count_from_u)
        step += 1
    if CAND_BLOCK > 0:
        if step < RADIX_PASSES:
            # 2) candidate filter: the at most CAND_BLOCK keys of ranks [u, u + width) (the digits decided so far)
            # are the only ones that can still tell the remaining digits apart (the keys above them are
            # count_above). Compacted into this sample's scratch row, a selection block at a time (one prefix count
            # of the tile), then loaded once and held in registers for the remaining passes.
            width = _pass_bit(step - 1)
            low = (u - KEY_OFFSET).to(tl.int32)
            high = (u + width - 1 - KEY_OFFSET).to(tl.int32)
            n_candidates = 0
            for start in range(0, n_tokens, BLOCK_N):
                key = _block_keys(scores_ptr, row_offset, stride_n, n_tokens, start, row_keys, REPS, THREADS,
                                  ONE_BLOCK)
                in_range = ((key >= low) & (key <= high) & (key != PAD_KEY)).to(tl.int32)
                # (the candidate's slot, -1 for the other keys: one value per key held for the stores)
                slot = tl.where(in_range != 0, n_candidates + _tile_prefix(in_range, REPS, THREADS), -1)
                tl.store(candidates_ptr + slot, key, mask=slot >= 0)
                n_candidates += tl.sum(in_range)
            tl.debug_barrier()  # the candidates written by every thread of the program, before any thread reads them
            slot = tl.arange(0, CAND_BLOCK)
            candidates = tl.load(candidates_ptr + slot, mask=slot < n_candidates, other=PAD_KEY)
            above_range = count_above
            # 3) the remaining passes: count(key >= c) = the keys above the range + the candidates >= c
            for later_step in range(step, RADIX_PASSES):
                bit = _pass_bit(later_step)
                count1, count2, count3 = _digit_counts(candidates, u, bit)
                u, count_above, count_from_u = _accept_digit(u, bit, k, above_range + count1, above_range + count2,
                                                             above_range + count3, count_above, count_from_u)
    # k = 0: a threshold with no key above it and need = 0 (INT32_MAX, which only NaN ties, once every pass ran;
    # without the filter the passes stop as soon as no key reaches u)
    threshold = (u - KEY_OFFSET).to(tl.int32)
    return threshold, count_above


@triton.jit
def _sample_counts(counts_ptr, uniform_count, n_samples, b, PER_SAMPLE_COUNTS: tl.constexpr, B_PAD: tl.constexpr):
    """(first packed row, kept count) of sample b, from host-known counts (one scalar for all samples, or a
    per-sample vector summed over the earlier samples)."""
    if PER_SAMPLE_COUNTS:
        samples = tl.arange(0, B_PAD)
        counts = tl.load(counts_ptr + samples, mask=samples < n_samples, other=0)
        return tl.sum(tl.where(samples < b, counts, 0)), tl.load(counts_ptr + b)
    else:
        return b * uniform_count, uniform_count


@triton.jit
def _earlier_samples_kept(block_counts_ptr, b, n_blocks, NB_PAD: tl.constexpr, SAMPLE_CHUNK: tl.constexpr):
    """The first packed row of sample b of a keep mask: the kept tokens of every block of samples 0..b-1
    (``block_counts [B, n_blocks]``, low count field), summed SAMPLE_CHUNK samples at a time. (A sample's rows then
    need no reduction of the mask before the launch.)"""
    blocks = tl.arange(0, NB_PAD)
    row_start = tl.zeros((), dtype=tl.int32)
    for first in range(0, b, SAMPLE_CHUNK):
        samples = first + tl.arange(0, SAMPLE_CHUNK)
        tile = tl.load(block_counts_ptr + samples[:, None] * n_blocks + blocks[None, :],
                       mask=(samples < b)[:, None] & (blocks < n_blocks)[None, :], other=0)
        row_start += tl.sum(tl.sum(tile & COUNT_FIELD_MASK, axis=1), axis=0)
    return row_start


@triton.jit
def _token_flags(sel_ptr, row_offset, stride_sel_n, n_tokens, pos, threshold, HAS_SCORES: tl.constexpr):
    """(above, tie) of tokens ``pos``: scores above / equal to the sample's threshold key, or a mask's kept tokens
    (no ties). Positions past the row's end are neither."""
    valid = pos < n_tokens
    if HAS_SCORES:
        key = _score_keys(sel_ptr, row_offset, stride_sel_n, pos, valid)
        return key > threshold, key == threshold
    else:
        kept = tl.load(sel_ptr + row_offset + pos.to(tl.int64) * stride_sel_n, mask=valid, other=0) != 0
        return kept, pos < 0


# (the kept count and the index rows are values here, not strides: one binary for every count. Triton specialises ints
# on divisibility by 16 and on 1: a kept count divisible by 16 got a second binary, which spilled 568-696 B on rows of
# 3 or 4 x 4096 tokens, sm_90, Triton 3.6/3.9)
@triton.jit(do_not_specialize=["uniform_count", "n_rows"])
def _topk_threshold_kernel(
    scores_ptr, stride_b, stride_n, n_tokens,
    counts_ptr, uniform_count, n_samples,
    threshold_ptr, need_ptr, index_ptr, cu_seqlens_ptr, n_rows, candidates_ptr,
    PER_SAMPLE_COUNTS: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, ROW_REPS: tl.constexpr,
    ROW_THREADS: tl.constexpr, ONE_BLOCK: tl.constexpr, CAND_BLOCK: tl.constexpr,
):
    """Program b: threshold[b] = the k-th largest key of sample b and need[b] = how many keys equal to it are kept
    (k minus the keys above it); ``candidates`` ``[B, N]`` int32 is its scratch when CAND_BLOCK > 0 (the keys left
    once at most CAND_BLOCK share the threshold's leading digits). Tokens are read in tiles of BLOCK_N = ROW_REPS x
    ROW_THREADS, each thread holding ROW_REPS consecutive ones (``_tile_positions``). ONE_BLOCK: the sample fits in
    one BLOCK_N block, its keys are loaded once, and the program also does ``_write_index_kernel``'s work for it
    (its packed index rows, its cu_seqlens entry, and for the last sample the zero padding), which saves two
    launches."""
    b = tl.program_id(0)
    row_start, k = _sample_counts(counts_ptr, uniform_count, n_samples, b, PER_SAMPLE_COUNTS, B_PAD)
    row_offset = b.to(tl.int64) * stride_b
    first = _tile_positions(ROW_REPS, ROW_THREADS)
    row_keys = _score_keys(scores_ptr, row_offset, stride_n, first, first < n_tokens)  # used when ONE_BLOCK
    threshold, count_above = _topk_threshold(scores_ptr, row_offset, stride_n, n_tokens, k, row_keys,
                                             candidates_ptr + b.to(tl.int64) * n_tokens, BLOCK_N, ROW_REPS,
                                             ROW_THREADS, ONE_BLOCK, CAND_BLOCK)
    need = k - count_above
    if ONE_BLOCK:
        # padding keys lie below every real key, so they are neither above nor tied
        flags = _kept_flags(row_keys > threshold, row_keys == threshold)
        _write_kept_rows(index_ptr, first, flags, _tile_prefix(flags, ROW_REPS, ROW_THREADS), 0, 0, need, row_start,
                         n_rows)
        _write_cu_seqlens(cu_seqlens_ptr, b, row_start + k)
        if b == n_samples - 1:
            _zero_pad_index(index_ptr, row_start + k, n_rows, BLOCK_N)
    else:
        tl.store(threshold_ptr + b, threshold)
        tl.store(need_ptr + b, need)


@triton.jit
def _block_counts_kernel(
    sel_ptr, stride_sel_b, stride_sel_n, n_tokens, threshold_ptr, block_counts_ptr, n_blocks,
    HAS_SCORES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (b, j): block_counts[b, j] = tokens above (low count field) and ties (next field) in token block j
    of sample b."""
    b = tl.program_id(0)
    block = tl.program_id(1)
    pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
    threshold = tl.load(threshold_ptr + b) if HAS_SCORES else 0
    above, tie = _token_flags(sel_ptr, b.to(tl.int64) * stride_sel_b, stride_sel_n, n_tokens, pos, threshold,
                              HAS_SCORES)
    tl.store(block_counts_ptr + b * n_blocks + block,
             tl.sum(above.to(tl.int32) + (tie.to(tl.int32) << COUNT_FIELD_BITS)))


@triton.jit
def _kept_flags(above, tie):
    """Per token, 1 in the low count field if it is above the threshold, 1 in the next if it ties."""
    return above.to(tl.int32) + (tie.to(tl.int32) << COUNT_FIELD_BITS)


@triton.jit
def _write_kept_rows(index_ptr, pos, flags, before, above_carry, ties_carry, need, row_start, n_rows):
    """index[row] = pos for the kept tokens among ``pos`` (every token above, the first ``need`` ties in token order
    counting ``ties_carry`` earlier ones), at row = row_start + kept tokens before it (``above_carry`` earlier ones
    above). ``flags``: ``_kept_flags``; ``before``: their exclusive prefix sums in token order."""
    above_before = above_carry + (before & COUNT_FIELD_MASK)
    ties_before = ties_carry + (before >> COUNT_FIELD_BITS)
    keep = ((flags & COUNT_FIELD_MASK) != 0) | (((flags >> COUNT_FIELD_BITS) != 0) & (ties_before < need))
    row = row_start + above_before + tl.minimum(ties_before, need)
    tl.store(index_ptr + row, pos, mask=keep & (row < n_rows))


@triton.jit
def _write_cu_seqlens(cu_seqlens_ptr, b, end):
    """cu_seqlens[b + 1] = end (the packed rows of samples 0..b), and cu_seqlens[0] = 0 for sample 0."""
    tl.store(cu_seqlens_ptr + b + 1, end)
    if b == 0:
        tl.store(cu_seqlens_ptr, 0)


@triton.jit
def _zero_pad_index(index_ptr, start, n_rows, BLOCK_N: tl.constexpr):
    """index rows [start, n_rows) (an output sized for more rows than kept) get 0."""
    for first in range(start, n_rows, BLOCK_N):
        pad_row = first + tl.arange(0, BLOCK_N)
        tl.store(index_ptr + pad_row, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=pad_row < n_rows)


@triton.jit(do_not_specialize=["uniform_count", "n_rows"])  # (as the selection kernel)
def _write_index_kernel(
    sel_ptr, stride_sel_b, stride_sel_n, n_tokens, threshold_ptr, need_ptr, block_counts_ptr, n_blocks,
    counts_ptr, uniform_count, n_samples,
    index_ptr, cu_seqlens_ptr, n_rows,
    HAS_SCORES: tl.constexpr, PER_SAMPLE_COUNTS: tl.constexpr, COUNTS_FROM_BLOCKS: tl.constexpr,
    B_PAD: tl.constexpr, NB_PAD: tl.constexpr, SAMPLE_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (b, j): index[row] = position for every kept token of token block j of sample b, at its packed row
    (stream compaction: the earlier blocks' counts, then a prefix scan within the block). Program (b, 0) writes
    cu_seqlens[b + 1]; the last program zero-fills index rows past the kept total. The samples' kept counts are the
    host's (uniform or PER_SAMPLE_COUNTS) or, for a mask (COUNTS_FROM_BLOCKS), the block counts'."""
    b = tl.program_id(0)
    block = tl.program_id(1)
    # this sample's block counts (the earlier ones carry into this block's ranks; all of them are a mask's count)
    blocks = tl.arange(0, NB_PAD)
    sample_counts = tl.load(block_counts_ptr + b * n_blocks + blocks, mask=blocks < n_blocks, other=0)
    if COUNTS_FROM_BLOCKS:
        row_start = _earlier_samples_kept(block_counts_ptr, b, n_blocks, NB_PAD, SAMPLE_CHUNK)
        k = tl.sum(sample_counts & COUNT_FIELD_MASK)
    else:
        row_start, k = _sample_counts(counts_ptr, uniform_count, n_samples, b, PER_SAMPLE_COUNTS, B_PAD)

    # keep rule: every token "above", plus the first `need` "ties" in index order (the mask path has no ties)
    threshold = 0
    need = 0
    if HAS_SCORES:
        threshold = tl.load(threshold_ptr + b)
        need = tl.load(need_ptr + b)

    # tokens above / ties in the earlier blocks of this sample, each field summed on its own (a sample's total may
    # not fit in a field)
    counts = tl.where(blocks < block, sample_counts, 0)
    above_carry = tl.sum(counts & COUNT_FIELD_MASK)
    ties_carry = tl.sum(counts >> COUNT_FIELD_BITS)

    pos = block * BLOCK_N + tl.arange(0, BLOCK_N)
    above, tie = _token_flags(sel_ptr, b.to(tl.int64) * stride_sel_b, stride_sel_n, n_tokens, pos, threshold,
                              HAS_SCORES)
    flags = _kept_flags(above, tie)
    _write_kept_rows(index_ptr, pos, flags, tl.cumsum(flags, 0) - flags, above_carry, ties_carry, need, row_start,
                     n_rows)
    if block == 0:
        _write_cu_seqlens(cu_seqlens_ptr, b, row_start + k)
    if (b == n_samples - 1) & (block == tl.num_programs(1) - 1):
        _zero_pad_index(index_ptr, row_start + k, n_rows, BLOCK_N)


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
def _copy_kept_rows(src_ptr, dst_ptr, width, stride_b, stride_n, sample, pos, rows, kept, written,
                    BLOCK_C: tl.constexpr):
    """dst[rows, cols] = src[sample, pos, cols] for the kept rows, 0 for the other ``written`` rows, over this
    column program's tile of the payload's own width ``BLOCK_C`` (a narrow payload, e.g. 4 id columns beside 3072
    hidden ones, copies with its first column programs only, in a tile of its size)."""
    if tl.program_id(1) * BLOCK_C < width:
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < width
        src_row = sample.to(tl.int64) * stride_b + pos.to(tl.int64) * stride_n
        values = tl.load(src_ptr + src_row[:, None] + cols[None, :], mask=kept[:, None] & col_ok[None, :], other=0)
        dst_row = rows.to(tl.int64) * width
        tl.store(dst_ptr + dst_row[:, None] + cols[None, :], values, mask=written[:, None] & col_ok[None, :])


# (the kept total and the token count only bound rows and positions: one binary for every count, as the selection
# kernel; the row copies keep their vector widths: sm_90, Triton 3.6)
@triton.jit(do_not_specialize=["n_rows", "n_tokens"])
def _gather_rows_kernel(
    index_ptr, cu_seqlens_ptr, n_samples, n_rows, n_tokens,
    src0, dst0, width0, stride_b0, stride_n0,
    src1, dst1, width1, stride_b1, stride_n1,
    src2, dst2, width2, stride_b2, stride_n2,
    NUM_PAYLOADS: tl.constexpr, B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C0: tl.constexpr,
    BLOCK_C1: tl.constexpr, BLOCK_C2: tl.constexpr, ZERO_PADDING: tl.constexpr,
):
    """Packed rows [pid_r * BLOCK_R, +BLOCK_R) x columns [pid_c * BLOCK_Ci, +BLOCK_Ci) of every payload i; rows
    past the kept total are zeros (ZERO_PADDING) or left as they are."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_output = rows < n_rows
    sample, kept = _sample_of_rows(cu_seqlens_ptr, rows, n_samples, B_PAD)
    written = in_output if ZERO_PADDING else kept & in_output
    kept = kept & in_output
    pos = tl.load(index_ptr + rows, mask=kept, other=0)
    kept = kept & (pos >= 0) & (pos < n_tokens)  # a malformed index (scatter's backward) reads nothing: zeros
    _copy_kept_rows(src0, dst0, width0, stride_b0, stride_n0, sample, pos, rows, kept, written, BLOCK_C0)
    if NUM_PAYLOADS > 1:
        _copy_kept_rows(src1, dst1, width1, stride_b1, stride_n1, sample, pos, rows, kept, written, BLOCK_C1)
    if NUM_PAYLOADS > 2:
        _copy_kept_rows(src2, dst2, width2, stride_b2, stride_n2, sample, pos, rows, kept, written, BLOCK_C2)


@triton.jit(do_not_specialize=["n_rows", "n_tokens"])  # (as _gather_rows_kernel)
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


@triton.jit
def _fp64_from_bits(bits):
    """A float64 scalar passed as its int64 bit pattern (Triton passes Python floats to a kernel as fp32)."""
    return tl.full((), bits, dtype=tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _unscaled_mass(values_row, j, inside, top, inv_scale, softmax, MASS: tl.constexpr):
    """Each token's mass before the division by its row's total, fp64 (0 past the row's end): ``exp(v - top)``
    (softmax; ``top`` the row's largest score) or ``max(v, 0) / scale`` (linear, as a product with ``1 / scale``);
    MASS_AUTO: the softmax where ``softmax`` (the row has a negative score), else linear."""
    v = tl.load(values_row + j, mask=inside, other=0.0).to(tl.float64)
    if MASS == MASS_LINEAR:
        unscaled = tl.maximum(v, 0.0) * inv_scale
    elif MASS == MASS_SOFTMAX:
        unscaled = tl.exp(v - top)
    else:
        unscaled = tl.where(softmax, tl.exp(v - top), tl.maximum(v, 0.0) * inv_scale)
    return tl.where(inside, unscaled, 0.0)


@triton.jit
def _ranked_keep_kernel(
    values_ptr, order_ptr, stride_row, lengths_ptr, starts_ptr, n_refs,
    counts_ptr, coverage_ptr, coverage_bits, tolerance_bits, low_ptr, high_ptr,
    keep_ptr, n_tokens,
    ADAPTIVE: tl.constexpr, MASS: tl.constexpr, COVERAGE_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``row = b · n_refs + i`` (sample b, image i of ``lengths[i]`` tokens from token ``starts[i]``):
    ``values`` / ``order`` ``[B · n_refs, L]`` hold the image's scores in descending order and their positions in
    the image (entries past its length unread). Writes ``keep[b, starts[i] + order[j]] = j < count`` for every j
    below the image's length, so every token of the image is written once. ``count`` is ``counts[row]`` or, with
    ADAPTIVE, computed and stored there: the tokens j whose mass ranked above them, ``before_j``, lies below
    ``coverage - tolerance`` (at least 1 when coverage > 0, none when it is 0), then ``min(max(count, low), high)``.
    The mass is ``reference.score_mass``'s, in fp64: MASS_LINEAR ``c = max(v, 0) / max(max_j c_j, tiny)``,
    ``p = c / sum(c)``, or ``1 / length`` for every token when the sum is 0; MASS_SOFTMAX ``softmax(v)``, uniform
    for a row of -inf; MASS_AUTO the softmax for a row with a negative score (its last, sorted), else linear. The
    products and sums round otherwise than torch's (a count differs only where a mass lies within a few roundings
    of the threshold)."""
    row = tl.program_id(0)
    b = row // n_refs
    image = row % n_refs
    length = tl.load(lengths_ptr + image)
    values_row = values_ptr + row.to(tl.int64) * stride_row
    order_row = order_ptr + row.to(tl.int64) * stride_row
    if ADAPTIVE:
        # 1) the row's mass in all, before the division: the largest score (the first, sorted) shifts the softmax
        # and scales the linear mass (so that a sum of scores near float64's max stays finite)
        top = tl.load(values_row, mask=length > 0, other=0.0).to(tl.float64)
        inv_scale = 1.0 / tl.maximum(tl.maximum(top, 0.0), FP64_TINY)
        softmax = tl.load(values_row + length - 1, mask=length > 0, other=0.0) < 0  # (MASS_AUTO: the smallest score)
        # (summed lane by lane over the blocks, then once across them: no reduction across warps in the loop)
        lanes = tl.zeros((BLOCK,), dtype=tl.float64)
        for start in range(0, length, BLOCK):
            j = start + tl.arange(0, BLOCK)
            lanes += _unscaled_mass(values_row, j, j < length, top, inv_scale, softmax, MASS)
        total = tl.sum(lanes)
        if COVERAGE_PER_ROW:
            coverage = tl.load(coverage_ptr + row)
        else:
            coverage = _fp64_from_bits(coverage_bits)
        threshold = coverage - _fp64_from_bits(tolerance_bits)
        # where the mass is undefined every token gets 1 / length: a linear row without a positive total, a softmax
        # row of -inf scores (+inf and NaN scores are the callers' to refuse: their count is unspecified). Else the
        # shares are compared undivided: before_j / total < threshold as before_j < threshold · total.
        if MASS == MASS_LINEAR:
            flat = (total > 0) == 0  # (NaN too)
        elif MASS == MASS_SOFTMAX:
            flat = top == float("-inf")
        else:
            flat = tl.where(softmax, top == float("-inf"), (total > 0) == 0)
        uniform = 1.0 / tl.maximum(length, 1).to(tl.float64)
        bound = tl.where(flat, threshold, threshold * total)
        # 2) how many tokens the mass ranked above them leaves below the bound (a running prefix sum over the row's
        # blocks; the mass is non-negative, so each block's last prefix is its largest), counted lane by lane and
        # summed once after the loop
        carried = tl.zeros((), dtype=tl.float64)
        below = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, length, BLOCK):
            j = start + tl.arange(0, BLOCK)
            inside = j < length
            unscaled = _unscaled_mass(values_row, j, inside, top, inv_scale, softmax, MASS)
            mass = tl.where(inside, tl.where(flat, uniform, unscaled), 0.0)
            through = carried + tl.cumsum(mass, 0)
            below += (inside & (through - mass < bound)).to(tl.int32)
            carried = tl.max(through, 0)
        needed = tl.sum(below.to(tl.int64))
        needed = tl.where(coverage > 0, tl.maximum(needed, 1), 0)
        count = tl.minimum(tl.maximum(needed, tl.load(low_ptr + row)), tl.load(high_ptr + row))
        tl.store(counts_ptr + row, count)
    else:
        count = tl.load(counts_ptr + row)
    # 3) the keep mask: the first `count` tokens of the order kept, the others dropped
    keep_row = keep_ptr + b.to(tl.int64) * n_tokens + tl.load(starts_ptr + image)
    for start in range(0, length, BLOCK):
        j = start + tl.arange(0, BLOCK)
        inside = j < length
        position = tl.load(order_row + j, mask=inside, other=0)
        tl.store(keep_row + position, j < count, mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def _select_config(n_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, CAND_BLOCK) of the selection kernel: one block holds the whole sample when it fits; long
    rows count the last passes over the filtered candidates only (CAND_BLOCK 0: no filter)."""
    block = min(next_power_of_2(max(n_tokens, 16)), MAX_SELECT_BLOCK)
    cand_block = max(block // CAND_BLOCK_FRACTION, 16) if n_tokens >= FILTER_MIN_TOKENS else 0
    # warps: one per 1024 keys, up to 8 for a row held in one block and 16 for rows streamed block by block. The
    # one-block row of 3 x 4096 keys took 27.3 us at 8 warps and 31.0 at 16 on the 2026-11-30 H200 (29.7 / 31.7 in
    # an earlier run; 4 and 32 warps slower): one program's passes are bound by its SM's arithmetic, and more warps
    # add reduction steps. Streamed rows were not timed, and at 8 warps Triton 3.9 spills 16 B there (fp16/bf16).
    max_warps = 8 if n_tokens <= block else 16
    return block, max(1, min(max_warps, block // 1024)), cand_block


def _compact_config(n_tokens: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the block-count and index-write kernels."""
    block = min(next_power_of_2(max(n_tokens, 16)), COMPACT_BLOCK)
    return block, max(1, min(COMPACT_WARPS, block // 256))


def _copy_config(max_width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the row kernels."""
    block_c = min(max(next_power_of_2(max(max_width, 1)), COPY_MIN_BLOCK_COLS), COPY_MAX_BLOCK_COLS)
    return COPY_BLOCK_ROWS, block_c, 4


# dtypes the row kernels load and store as they are (no byte or pair view)
_COPIED_AS_IS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.uint8)


def _loadable(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` in a dtype Triton loads and stores (the row kernels only copy bits): bool and one-byte floats
    (fp8) as bytes, complex as its (real, imaginary) pairs. A lazy conjugate or negative view (``x.conj()``) is
    materialised first: its memory holds the values before the flag."""
    if t.dtype in _COPIED_AS_IS and not t.is_neg():  # (the common case: a real tensor without a lazy negation)
        return t
    t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bool or (t.dtype.is_floating_point and t.dtype.itemsize == 1):
        return t.view(torch.uint8)
    return torch.view_as_real(t) if t.is_complex() else t


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...]`` -> ``[B, N, C]`` view (of ``_loadable(t)``) with unit column stride (copies only when the
    trailing dims can not be flattened)."""
    t = _loadable(t)
    if t.ndim == 3 and t.stride(2) == 1:
        return t
    flat = t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))
    return flat if flat.stride(-1) == 1 else flat.contiguous()


@on_device_of("selection")
def compact_index(
    selection: torch.Tensor, counts: Optional[Sequence[int]] = None, n_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions per sample, packed: ``(index int32 [n_rows], cu_seqlens int32 [B+1])``.

    ``selection`` is a keep mask bool ``[B, N]`` or scores ``[B, N]`` (fp32/fp16/bf16, read exactly as fp32). ``counts``
    (host ints, one per sample) is required with scores (the ``counts[b]`` highest scores are kept, ties to the
    lower index) and refused with a mask (its row sums are its counts). ``n_rows`` (default: the kept
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
    if not has_scores and counts is not None:
        raise ValueError("counts must be None when selection is a keep mask (its row sums are the counts)")
    if counts is not None:
        counts = [int(c) for c in counts]
        if len(counts) != batch or (counts and not 0 <= min(counts) <= max(counts) <= n_tokens):
            raise ValueError(f"counts must give one count in [0, N={n_tokens}] per sample ({batch}), got {counts}")
        uniform = len(set(counts)) <= 1
        uniform_count = counts[0] if counts else 0
        if n_rows is None:
            n_rows = sum(counts)
        counts_dev = None if uniform else to_device(counts, torch.int32, device)
    else:  # a mask: the index kernel takes the samples' counts from the block counts
        uniform, uniform_count, counts_dev = False, 0, None
        if n_rows is None:
            n_rows = int(selection.sum())  # the one host read of the mask path
    index = torch.empty(n_rows, dtype=torch.int32, device=device)
    if batch == 0:
        return index.zero_(), torch.zeros(1, dtype=torch.int32, device=device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=device)
    sel = selection if has_scores else selection.view(torch.uint8)
    counts_arg = counts_dev if counts_dev is not None else index  # unused pointer without per-sample host counts
    b_pad = next_power_of_2(batch)
    # 1) scores: per-sample threshold key and number of kept ties (one program per sample); a sample that fits in
    # one selection block writes its packed index rows there too, and that is all
    threshold = need = index  # unused pointers on the mask path and for one-block rows
    if has_scores:
        select_block, select_warps, cand_block = _select_config(n_tokens)
        # the tiles' columns: one per thread (fewer when the block is smaller than the warps' threads)
        row_threads = min(32 * select_warps, select_block)
        one_block = n_tokens <= select_block
        if not one_block:
            # (rows of a multiple of 4 entries: ``need`` starts 16-byte aligned whatever the batch, one binary)
            threshold, need = torch.empty((2, cdiv(batch, 4) * 4), dtype=torch.int32, device=device)
        candidates = torch.empty((batch, n_tokens), dtype=torch.int32, device=device) if cand_block else index
        _topk_threshold_kernel[(batch,)](
            sel, sel.stride(0), sel.stride(1), n_tokens, counts_arg, uniform_count, batch, threshold, need,
            index, cu_seqlens, n_rows, candidates, PER_SAMPLE_COUNTS=not uniform, B_PAD=b_pad,
            BLOCK_N=select_block, ROW_REPS=select_block // row_threads, ROW_THREADS=row_threads,
            ONE_BLOCK=one_block, CAND_BLOCK=cand_block,
            num_warps=select_warps, **COMPILE_OPTIONS,
        )
        if one_block:
            return index, cu_seqlens
    # 2) per token block: counts of tokens above and ties; 3) per token block: packed rows of its kept tokens
    block_n, num_warps = _compact_config(n_tokens)
    n_blocks = max(cdiv(n_tokens, block_n), 1)
    nb_pad = next_power_of_2(n_blocks)
    block_counts = torch.empty((batch, n_blocks), dtype=torch.int32, device=device)
    grid = (batch, n_blocks)
    _block_counts_kernel[grid](
        sel, sel.stride(0), sel.stride(1), n_tokens, threshold, block_counts, n_blocks,
        HAS_SCORES=has_scores, BLOCK_N=block_n, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    _write_index_kernel[grid](
        sel, sel.stride(0), sel.stride(1), n_tokens, threshold, need, block_counts, n_blocks,
        counts_arg, uniform_count, batch, index, cu_seqlens, n_rows,
        HAS_SCORES=has_scores, PER_SAMPLE_COUNTS=counts_dev is not None, COUNTS_FROM_BLOCKS=counts is None,
        B_PAD=b_pad, NB_PAD=nb_pad, SAMPLE_CHUNK=min(b_pad, max(1, COUNT_TILE // nb_pad)), BLOCK_N=block_n,
        num_warps=num_warps, **COMPILE_OPTIONS,
    )
    return index, cu_seqlens


@on_device_of("index")
def gather_rows(
    payloads: Sequence[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor, n_rows: int,
    zero_padding: bool = True,
) -> list[torch.Tensor]:
    """Packed copies ``[n_rows, ...]`` of the kept rows of each payload ``[B, N, ...]`` (any dtype, any strides on the
    first two dims): row r holds ``payload[b, index[r]]`` for the sample b whose range of ``cu_seqlens`` contains r,
    and zeros for indices outside ``[0, N)`` and for ``r >= cu_seqlens[-1]`` (with ``zero_padding=False`` those
    rows are left uninitialised: no write for a consumer that never reads them). Never reads the device from the
    host."""
    outputs = [torch.empty((n_rows, *p.shape[2:]), dtype=p.dtype, device=p.device) for p in payloads]
    batch = cu_seqlens.numel() - 1
    if n_rows == 0 or not payloads:
        return outputs
    for first in range(0, len(payloads), PAYLOADS_PER_LAUNCH):
        # outputs are fresh contiguous [n_rows, ...] tensors: only their base pointer is passed. Each payload's
        # arguments and column tile are found once (one strides() call: a stride(i) call costs about a us of host
        # time); unused slots repeat the first payload's
        slots, block_cs, max_width, col_programs = [], [], 0, 0
        for p, o in zip(payloads[first:first + PAYLOADS_PER_LAUNCH], outputs[first:first + PAYLOADS_PER_LAUNCH]):
            src = _as_rows(p)
            width = src.shape[2]
            stride_b, stride_n, _ = src.stride()
            block_c = _copy_config(width)[1]  # each payload's own column tile
            slots.append((src, _loadable(o), width, stride_b, stride_n))
            block_cs.append(block_c)
            max_width = max(max_width, width)
            col_programs = max(col_programs, cdiv(width, block_c))
        if max_width == 0:
            continue
        num_payloads = len(slots)
        slots += [slots[0]] * (PAYLOADS_PER_LAUNCH - num_payloads)
        block_cs += [block_cs[0]] * (PAYLOADS_PER_LAUNCH - num_payloads)
        block_r, _, num_warps = _copy_config(max_width)
        args = [value for slot in slots for value in slot]
        # column programs: as many as the payload needing the most (the widest) has tiles
        grid = (cdiv(n_rows, block_r), col_programs)
        _gather_rows_kernel[grid](
            index, cu_seqlens, batch, n_rows, payloads[0].shape[1], *args,
            NUM_PAYLOADS=num_payloads, B_PAD=next_power_of_2(max(batch, 1)), BLOCK_R=block_r,
            BLOCK_C0=block_cs[0], BLOCK_C1=block_cs[1], BLOCK_C2=block_cs[2], ZERO_PADDING=zero_padding,
            num_warps=num_warps, **COMPILE_OPTIONS,
        )
    return outputs


@on_device_of("index")
def scatter_rows(
    packed: Optional[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor, out: torch.Tensor,
) -> torch.Tensor:
    """In place: ``out[b, index[r]] = packed[r]`` for the valid packed rows r (``r < cu_seqlens[-1]``), or zeros there
    when ``packed`` is None; other positions of ``out`` ``[B, N, ...]`` keep their values. ``packed`` has ``index``'s
    row count and ``out``'s trailing shape. Returns ``out``. Never reads the device from the host."""
    if not out.is_contiguous() or out.is_conj() or out.is_neg():
        raise ValueError("out must be contiguous and no lazy conjugate or negative view (it is written in place)")
    batch, n_tokens = out.shape[:2]
    dst = _as_rows(out)
    n_rows, width = index.numel(), dst.shape[2]
    if n_rows == 0 or width == 0 or batch == 0:
        return out
    src = None if packed is None else _as_rows(packed.contiguous().view(1, *packed.shape))
    block_r, block_c, num_warps = _copy_config(width)
    grid = (cdiv(n_rows, block_r), cdiv(width, block_c))
    _scatter_rows_kernel[grid](
        src, index, cu_seqlens, batch, n_rows, n_tokens, dst, width, dst.stride(0), dst.stride(1),
        HAS_SRC=src is not None, B_PAD=next_power_of_2(batch),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps, **COMPILE_OPTIONS,
    )
    return out


def _fp64_bits(value: float) -> int:
    """The int64 bit pattern of a float64 (``_fp64_from_bits``' argument)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


@functools.lru_cache(maxsize=64)
def _image_layout(ref_lengths: tuple, device: torch.device) -> torch.Tensor:
    """int64 ``[2, n_refs]`` on ``device``: each image's length and first token, copied once per layout and device
    (shared: never modified). Its rows are views of rows of an even number of entries, so that both start 16-byte
    aligned: Triton specialises a pointer on that alignment, and an odd image count left the second row unaligned (one
    binary for an odd count, another for an even one)."""
    starts = [sum(ref_lengths[:i]) for i in range(len(ref_lengths))]
    padding = [0] * (len(ref_lengths) % 2)
    return to_device([list(ref_lengths) + padding, starts + padding], torch.int64, device)[:, :len(ref_lengths)]


@on_device_of("values")
def ranked_keep_mask(
    values: torch.Tensor, order: torch.Tensor, ref_lengths: Sequence[int], n_tokens: int,
    counts: Optional[torch.Tensor] = None, coverage=None, low: Optional[torch.Tensor] = None,
    high: Optional[torch.Tensor] = None, tolerance: float = 0.0, mass: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep bool [B, n_tokens], counts int64 [B, n_refs])`` of ``_ranked_keep_kernel``: ``values`` / ``order``
    ``[B · n_refs, L]`` (L at least the longest image; contiguous rows) are the images' scores sorted in descending
    order and their positions in the image; the images lie one after another in the tokens (``ref_lengths``).
    ``counts`` (int64, ``B · n_refs`` entries) keeps that many of each image; without it the counts are adaptive:
    ``coverage`` (a float, or a float64 tensor of ``B · n_refs`` entries), ``low`` and ``high`` (int64, ``B · n_refs``
    entries) are required, and ``mass`` (``MASS_MODES``) says how the scores are read as a distribution. Never reads
    the device from the host."""
    n_refs, rows = len(ref_lengths), values.shape[0]
    batch = rows // n_refs
    device = values.device
    layout = _image_layout(tuple(ref_lengths), device)
    keep = torch.empty((batch, n_tokens), dtype=torch.bool, device=device)
    adaptive = counts is None
    if adaptive:
        counts = torch.empty((batch, n_refs), dtype=torch.int64, device=device)
    if rows == 0:
        return keep, counts.view(batch, n_refs)
    per_row = isinstance(coverage, torch.Tensor)
    _ranked_keep_kernel[(rows,)](
        values, order, values.stride(0), layout[0], layout[1], n_refs,
        counts, coverage if per_row else None, _fp64_bits(float(coverage)) if adaptive and not per_row else 0,
        _fp64_bits(tolerance), low, high, keep, n_tokens,
        ADAPTIVE=adaptive, MASS=MASS_MODES[mass] if adaptive else MASS_LINEAR, COVERAGE_PER_ROW=per_row,
        BLOCK=min(next_power_of_2(max(values.shape[1], 16)), RANK_BLOCK),
        num_warps=RANK_WARPS, **COMPILE_OPTIONS,
    )
    return keep, counts.view(batch, n_refs)


INTERPRETED = built_for_interpreter(_gather_rows_kernel)  # how this module's kernels were built (see ops.backend_for)
if not INTERPRETED:  # (the same binaries on disk for every process: _launch.hash_in_definition_order)
    hash_in_definition_order(globals())
