"""QK RMS norm and rotary embedding in one pass, forward and backward: what FLUX.1/FLUX.2 and Qwen-Image attention do
to their queries and keys between the projections and the attention: the text stream's (a prefix, with its own
norm weight) and the image stream's, joined along the sequence, in one launch.

Spec: ``sparsectx.reference.rms_norm_rope_ref`` (its autograd gives the backward's spec).

In diffusers these are an RMS norm kernel, a concatenation of the text and image streams and about eight
elementwise kernels of ``apply_rotary_emb`` (a negation, a stack, two upcasts to fp32, two products with the fp32
tables, a sum and the downcast), each a pass over the ``[B, S, H, D]`` tensor (and as many again backward). Here
one program reads a block of tokens x a block of heads once, normalises every head vector (fp32 statistics,
rounded to the tensor's dtype as the norm's output is in diffusers), rotates its pairs of adjacent features by the
token's cos/sin rows (read once per program, shared by its heads) and writes the result at its place in the joint
output; each row is read from its stream (a tile that straddles the join reads both, masked) and takes its stream's
weight. The backward rotates the output gradient back, then takes the norm's gradient, written to the row's stream's
gradient; each program writes its partial sums of the two weights' gradients to its own row, and a second launch
sums the rows into the gradient of each weight there is (no atomics, deterministic).

The tables themselves (``rope_tables``): FLUX's cos/sin rows of multi-axis positions, each feature's angle the
position on its axis times its frequency, one launch (the torch ops diffusers runs take about thirteen per axis).

Offsets are int64 (a ``[B, S, H*D]`` tensor of a long sequence passes 2**31 elements).
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._launch import (COMPILE_OPTIONS, built_for_interpreter, cdiv, hash_in_definition_order, next_power_of_2,
                      on_device_of)

# Tokens and heads per program. A program moves BLOCK_TOKENS x HEAD_BLOCK head vectors (4096 elements at D=128) and
# BLOCK_TOKENS rows of both tables. Chosen by arithmetic (enough programs to fill an H200 at a few thousand tokens,
# 16 fp32 values per thread and tensor with 8 warps), not measured on a GPU.
BLOCK_TOKENS = 8
HEAD_BLOCK = 4
NUM_WARPS = 8
# Triton's interpreter (TRITON_INTERPRET=1) runs each program as Python, at a cost per program far above that of its
# elements: there a program takes INTERPRETER_BLOCK_TOKENS tokens (and the tables kernel INTERPRETER_TABLE_BLOCK_ROWS
# rows), the same code at a larger tile. tests/test_norm_rope.py runs the GPU's tiles; a test there runs these.
INTERPRETER_BLOCK_TOKENS = 64
INTERPRETER_TABLE_BLOCK_ROWS = 64
# The weights' gradient: partial rows summed per program of the reduction kernel (rows x features at a time), and
# the features per program (a klein layer's 5.8k partial rows of 128 features: 8 programs, 23 steps each).
REDUCE_ROWS = 256
REDUCE_FEATURES = 32
REDUCE_WARPS = 4
# The tables kernel: rows per program (x all features: 4 fp64 angles per thread at D=128, 54-64 registers for
# sm_90), warps; positions on at most MAX_TABLE_AXES axes. Not timed on a GPU.
TABLE_BLOCK_ROWS = 4
TABLE_WARPS = 4
MAX_TABLE_AXES = 4


@triton.jit
def _tile(n_tokens, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
          BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    """This program's tile of the joint sequence: (its sample (int64), its rows of the joint sequence, head indices,
    features, the ``[tokens, heads, features]`` validity mask, the validity of the rows and of the features)."""
    batch = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    features = tl.arange(0, 2 * BLOCK_PAIRS)  # BLOCK_PAIRS pairs of adjacent features
    row_valid, feature_valid = rows < n_tokens, features < HEAD_DIM
    mask = row_valid[:, None, None] & (heads < HEADS)[None, :, None] & feature_valid[None, None, :]
    return batch, rows, heads, features, mask, row_valid, feature_valid


@triton.jit
def _inverse_rms(x, row_valid, heads, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``rsqrt(mean(x²) + eps)`` of each head vector ``[tokens, heads]``; 0 for the tile's padding tokens and heads
    (with eps 0 their zero vectors would give inf, and 0 · inf = NaN in the backward's sums over the tile)."""
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)
    return tl.where(row_valid[:, None] & (heads < HEADS)[None, :], rstd, 0.0)


@triton.jit
def _load_table(T, rows, features, row_valid, feature_valid, stride_row, stride_col, TABLE_PER_PAIR: tl.constexpr):
    """The tokens' rows of a cos or sin table as fp32 ``[tokens, 1, features]`` (shared by the program's heads): a
    value per feature, or with TABLE_PER_PAIR one per pair of features (column ``f // 2``). A column stride of 1
    is specialised by Triton: contiguous, vectorised loads. Offsets are int64 (a transposed table's column stride
    is its row count)."""
    cols = (features // 2 if TABLE_PER_PAIR else features).to(tl.int64) * stride_col
    table_mask = row_valid[:, None] & feature_valid[None, :]
    return tl.load(T + (rows.to(tl.int64)[:, None] * stride_row + cols[None, :])[:, None, :],
                   mask=table_mask[:, None, :], other=0.0).to(tl.float32)


@triton.jit
def _head_offsets(batch, tokens, heads, features, stride_b, stride_s, stride_h):
    """int64 offsets of the head vectors ``[batch, tokens, heads, :]`` of a ``[B, S, H, D]`` tensor."""
    return (batch * stride_b + tokens.to(tl.int64)[:, None, None] * stride_s
            + heads.to(tl.int64)[None, :, None] * stride_h + features[None, None, :])


@triton.jit
def _load_segments(X0, X1, batch, rows, n_prefix, heads, features, mask, stride_0b, stride_0s, stride_0h,
                   stride_1b, stride_1s, stride_1h, HAS_PREFIX: tl.constexpr):
    """The tile's head vectors as fp32 ``[tokens, heads, features]`` (0 outside the mask), each row from its
    segment: joint rows below ``n_prefix`` are the prefix ``X0``'s rows, the others ``X1``'s rows from 0. Returns
    them and which rows are the prefix's."""
    in_prefix = rows < n_prefix
    x = tl.load(X1 + _head_offsets(batch, rows - n_prefix, heads, features, stride_1b, stride_1s, stride_1h),
                mask=mask & ~in_prefix[:, None, None], other=0.0).to(tl.float32)
    if HAS_PREFIX:
        x += tl.load(X0 + _head_offsets(batch, rows, heads, features, stride_0b, stride_0s, stride_0h),
                     mask=mask & in_prefix[:, None, None], other=0.0).to(tl.float32)
    return x, in_prefix


@triton.jit
def _store_segments(Y0, Y1, y, batch, rows, n_prefix, in_prefix, heads, features, mask, stride_0b, stride_0s,
                    stride_0h, stride_1b, stride_1s, stride_1h, HAS_PREFIX: tl.constexpr):
    """The inverse of ``_load_segments``: each row of the tile's ``y`` stored in its segment, ``Y0`` (the prefix's
    rows) or ``Y1``."""
    tl.store(Y1 + _head_offsets(batch, rows - n_prefix, heads, features, stride_1b, stride_1s, stride_1h),
             y.to(Y1.dtype.element_ty), mask=mask & ~in_prefix[:, None, None])
    if HAS_PREFIX:
        tl.store(Y0 + _head_offsets(batch, rows, heads, features, stride_0b, stride_0s, stride_0h),
                 y.to(Y0.dtype.element_ty), mask=mask & in_prefix[:, None, None])


@triton.jit
def _tile_inputs(X0, X1, COS, SIN, n_prefix, n_tokens, stride_0b, stride_0s, stride_0h, stride_1b, stride_1s,
                 stride_1h, stride_cs, stride_c_col, stride_ss, stride_s_col, HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_PREFIX: tl.constexpr,
                 TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    """What the forward and the backward read first: this program's tile (``_tile``), its rows of the cos and sin
    tables, its head vectors and which rows are the prefix's (``_load_segments``)."""
    batch, rows, heads, features, mask, row_valid, feature_valid = _tile(
        n_tokens, HEADS, HEAD_DIM, BLOCK_PAIRS, BLOCK_TOKENS, HEAD_BLOCK)
    cos = _load_table(COS, rows, features, row_valid, feature_valid, stride_cs, stride_c_col, TABLE_PER_PAIR)
    sin = _load_table(SIN, rows, features, row_valid, feature_valid, stride_ss, stride_s_col, TABLE_PER_PAIR)
    x, in_prefix = _load_segments(X0, X1, batch, rows, n_prefix, heads, features, mask, stride_0b, stride_0s,
                                  stride_0h, stride_1b, stride_1s, stride_1h, HAS_PREFIX)
    return batch, rows, heads, features, mask, row_valid, feature_valid, cos, sin, x, in_prefix


@triton.jit
def _weights(W0, W1, in_prefix, features, feature_valid, PREFIX_WEIGHT: tl.constexpr, WEIGHT: tl.constexpr):
    """fp32 ``[tokens, 1, features]``: each row's norm weight (the prefix's for prefix rows), 1 for a segment
    without one (a product by 1 rounds nothing, so the weightless segment's result is unchanged)."""
    ones = tl.full(features.shape, 1.0, tl.float32)
    w0 = tl.load(W0 + features, mask=feature_valid, other=0.0).to(tl.float32) if PREFIX_WEIGHT else ones
    w1 = tl.load(W1 + features, mask=feature_valid, other=0.0).to(tl.float32) if WEIGHT else ones
    return tl.where(in_prefix[:, None, None], w0[None, None, :], w1[None, None, :])


@triton.jit
def _pairs(t, BLOCK_TOKENS: tl.constexpr, ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """``[tokens, ROWS, features]`` -> its features at even and at odd positions, each ``[tokens, ROWS, pairs]``."""
    return tl.split(tl.reshape(t, [BLOCK_TOKENS, ROWS, BLOCK_PAIRS, 2]))


@triton.jit
def _interleave(even, odd, BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Inverse of ``_pairs``: ``[tokens, heads, features]`` with ``even`` at even positions, ``odd`` at odd ones."""
    return tl.reshape(tl.join(even, odd), [BLOCK_TOKENS, HEAD_BLOCK, 2 * BLOCK_PAIRS])


# (the row counts are values here, not strides: one binary for every text and image length. Triton specialises
# ints on divisibility by 16 and on 1, which gave each form a binary per class of lengths, compiled at the first
# request whose lengths fell in it; the loads and stores keep their widths: sm_90, Triton 3.6)
@triton.jit(do_not_specialize=["n_prefix", "n_tokens"])
def _rms_norm_rope_kernel(
    X0, W0, X1, W1, COS, SIN, OUT, n_prefix, n_tokens, eps,
    stride_0b, stride_0s, stride_0h, stride_1b, stride_1s, stride_1h,
    stride_cs, stride_c_col, stride_ss, stride_s_col, stride_ob, stride_os, stride_oh,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    PREFIX_WEIGHT: tl.constexpr, WEIGHT: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
    TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr,
):
    """Forward. Rows ``pid(0) * BLOCK_TOKENS ..`` of the joint sequence (``n_tokens`` rows: the prefix
    ``X0 [B, n_prefix, H, D]``, then ``X1``) and heads ``pid(1) * HEAD_BLOCK ..`` of sample ``pid(2)``."""
    batch, rows, heads, features, mask, row_valid, feature_valid, cos, sin, x, in_prefix = _tile_inputs(
        X0, X1, COS, SIN, n_prefix, n_tokens, stride_0b, stride_0s, stride_0h, stride_1b, stride_1s, stride_1h,
        stride_cs, stride_c_col, stride_ss, stride_s_col, HEADS, HEAD_DIM, BLOCK_PAIRS, HAS_PREFIX, TABLE_PER_PAIR,
        BLOCK_TOKENS, HEAD_BLOCK)

    # RMS norm of each head vector (padding features are 0), rounded to the tensor's dtype (ROUND_BEFORE_WEIGHT:
    # also before the weight multiplies it, as diffusers' own RMSNorm does with half-precision weights)
    rstd = _inverse_rms(x, row_valid, heads, eps, HEADS, HEAD_DIM)
    normed = x * rstd[:, :, None]
    if PREFIX_WEIGHT or WEIGHT:
        if ROUND_BEFORE_WEIGHT:
            normed = normed.to(OUT.dtype.element_ty).to(tl.float32)
        normed = normed * _weights(W0, W1, in_prefix, features, feature_valid, PREFIX_WEIGHT, WEIGHT)
    normed = normed.to(OUT.dtype.element_ty).to(tl.float32)

    # rotation of each pair (a, b) = (x[2i], x[2i+1]): (a·cos[2i] - b·sin[2i], b·cos[2i+1] + a·sin[2i+1])
    first, second = _pairs(normed, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS)
    out = normed * cos + _interleave(-second, first, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS) * sin
    tl.store(OUT + _head_offsets(batch, rows, heads, features, stride_ob, stride_os, stride_oh),
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_prefix", "n_tokens"])  # (as the forward)
def _rms_norm_rope_bwd_kernel(
    DY, X0, W0, X1, W1, COS, SIN, DX0, DX1, DW_PARTIAL, n_prefix, n_tokens, eps,
    stride_dyb, stride_dys, stride_dyh, stride_0b, stride_0s, stride_0h, stride_1b, stride_1s, stride_1h,
    stride_cs, stride_c_col, stride_ss, stride_s_col, stride_dx0b, stride_dx0s, stride_dx0h, stride_dx1b,
    stride_dx1s, stride_dx1h,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    PREFIX_WEIGHT: tl.constexpr, WEIGHT: tl.constexpr, TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
):
    """Backward of one tile (the forward's): the rows' ``dX`` into their segment's gradient (``DX0``/``DX1``,
    shaped as ``X0``/``X1``, strides of their own) and, with a weight, this program's partial sums of each
    segment's ``dW`` over its rows and heads: row ``program`` of ``DW_PARTIAL [programs, 2, 2 * BLOCK_PAIRS]`` fp32
    (the prefix's, then x's). The forward's roundings pass the gradient unchanged (as autograd through diffusers'
    casts)."""
    batch, rows, heads, features, mask, row_valid, feature_valid, cos, sin, x, in_prefix = _tile_inputs(
        X0, X1, COS, SIN, n_prefix, n_tokens, stride_0b, stride_0s, stride_0h, stride_1b, stride_1s, stride_1h,
        stride_cs, stride_c_col, stride_ss, stride_s_col, HEADS, HEAD_DIM, BLOCK_PAIRS, HAS_PREFIX, TABLE_PER_PAIR,
        BLOCK_TOKENS, HEAD_BLOCK)
    dy = tl.load(DY + _head_offsets(batch, rows, heads, features, stride_dyb, stride_dys, stride_dyh), mask=mask,
                 other=0.0).to(tl.float32)

    # the rotation's transpose: d(normed)[2i] = dy[2i]·cos[2i] + dy[2i+1]·sin[2i+1],
    #                           d(normed)[2i+1] = dy[2i+1]·cos[2i+1] - dy[2i]·sin[2i]
    dy_first, dy_second = _pairs(dy, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS)
    sin_first, sin_second = _pairs(sin, BLOCK_TOKENS, 1, BLOCK_PAIRS)
    dnormed = dy * cos + _interleave(dy_second * sin_second, -dy_first * sin_first, BLOCK_TOKENS, HEAD_BLOCK,
                                     BLOCK_PAIRS)

    # the norm's: with n = x·r·w, r = rsqrt(mean(x²) + eps): dx = r·w·dn - x·r³·sum(x·w·dn) / D, dw = sum(dn·x·r)
    rstd = _inverse_rms(x, row_valid, heads, eps, HEADS, HEAD_DIM)
    dscaled = dnormed
    if PREFIX_WEIGHT or WEIGHT:
        dscaled = dnormed * _weights(W0, W1, in_prefix, features, feature_valid, PREFIX_WEIGHT, WEIGHT)
        program = (batch * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)  # int64
        per_head = tl.sum(dnormed * x * rstd[:, :, None], axis=1)  # [tokens, features]
        segment_width = 2 * BLOCK_PAIRS  # a program's partial row: the prefix's features, then x's
        partial = DW_PARTIAL + program * (2 * segment_width) + features
        tl.store(partial, tl.sum(tl.where(in_prefix[:, None], per_head, 0.0), axis=0))
        tl.store(partial + segment_width, tl.sum(tl.where(in_prefix[:, None], 0.0, per_head), axis=0))
    dot = tl.sum(x * dscaled, axis=2)
    dx = rstd[:, :, None] * dscaled - x * (rstd * rstd * rstd * dot / HEAD_DIM)[:, :, None]
    _store_segments(DX0, DX1, dx, batch, rows, n_prefix, in_prefix, heads, features, mask, stride_dx0b, stride_dx0s,
                    stride_dx0h, stride_dx1b, stride_dx1s, stride_dx1h, HAS_PREFIX)


@triton.jit(do_not_specialize=["n_partial"])  # (as the forward: a count of programs)
def _weight_grads_kernel(DW_PARTIAL, DW0, DW1, n_partial, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
                         PREFIX_WEIGHT: tl.constexpr, REDUCE_ROWS: tl.constexpr, REDUCE_FEATURES: tl.constexpr):
    """Program (weight, feature block), over the segments that have a weight (the prefix's first): that segment's
    weight gradient over REDUCE_FEATURES features, the sum of the backward programs' partial rows
    ``DW_PARTIAL [n_partial, 2, 2 * BLOCK_PAIRS]``, stored in the weight's dtype (``DW0``: the prefix's, ``DW1``:
    x's)."""
    segment = tl.program_id(0) + (0 if PREFIX_WEIGHT else 1)
    features = tl.program_id(1) * REDUCE_FEATURES + tl.arange(0, REDUCE_FEATURES)
    feature_valid = features < HEAD_DIM
    segment_width = 2 * BLOCK_PAIRS  # a partial row: the prefix's features, then x's
    columns = segment * segment_width + features
    totals = tl.zeros([REDUCE_ROWS, REDUCE_FEATURES], dtype=tl.float32)
    # the partial rows, REDUCE_ROWS at a time, added up elementwise (no reduction across the warps per step)
    for first in range(0, n_partial, REDUCE_ROWS):
        rows = first + tl.arange(0, REDUCE_ROWS)
        totals += tl.load(DW_PARTIAL + rows.to(tl.int64)[:, None] * (2 * segment_width) + columns[None, :],
                          mask=(rows < n_partial)[:, None] & feature_valid[None, :], other=0.0)
    total = tl.sum(totals, axis=0)
    if segment == 0:
        tl.store(DW0 + features, total.to(DW0.dtype.element_ty), mask=feature_valid)
    else:
        tl.store(DW1 + features, total.to(DW1.dtype.element_ty), mask=feature_valid)


@triton.jit(do_not_specialize=["n_rows"])  # (as the forward: the token count)
def _rope_tables_kernel(IDS, FREQS, COS, SIN, n_rows, stride_row, stride_col, DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, END0: tl.constexpr, END1: tl.constexpr, END2: tl.constexpr,
                        BLOCK_ROWS: tl.constexpr):
    """Rows ``pid * BLOCK_ROWS ..`` of the fp32 tables ``COS, SIN [n_rows, DIM]``: for feature f, the row's id on
    f's axis (features below END0 read column 0, below END1 column 1, below END2 column 2, the rest column 3) as
    fp32, times ``FREQS[f]`` in FREQS' dtype (the fp32 position converts exactly; the product is rounded once, as
    torch's promoted product is), its cosine and sine in that dtype, rounded to fp32."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    features = tl.arange(0, BLOCK_D)
    feature_valid = features < DIM
    axis = (features >= END0).to(tl.int64) + (features >= END1).to(tl.int64) + (features >= END2).to(tl.int64)
    mask = (rows < n_rows)[:, None] & feature_valid[None, :]
    position = tl.load(IDS + rows[:, None] * stride_row + axis[None, :] * stride_col, mask=mask, other=0)
    freq = tl.load(FREQS + features, mask=feature_valid, other=0.0)
    angle = position.to(tl.float32).to(freq.dtype) * freq[None, :]
    offsets = rows[:, None] * DIM + features[None, :]
    tl.store(COS + offsets, tl.cos(angle).to(tl.float32), mask=mask)
    tl.store(SIN + offsets, tl.sin(angle).to(tl.float32), mask=mask)


def _block_tokens() -> int:
    """Tokens per program of the norm + RoPE kernels: ``BLOCK_TOKENS``, or in the interpreter
    ``INTERPRETER_BLOCK_TOKENS``."""
    return INTERPRETER_BLOCK_TOKENS if INTERPRETED else BLOCK_TOKENS


def _table_block_rows() -> int:
    """Rows per program of the tables kernel: ``TABLE_BLOCK_ROWS``, or in the interpreter
    ``INTERPRETER_TABLE_BLOCK_ROWS``."""
    return INTERPRETER_TABLE_BLOCK_ROWS if INTERPRETED else TABLE_BLOCK_ROWS


def _shape_constants(dim: int) -> dict:
    return dict(HEAD_DIM=dim, BLOCK_PAIRS=max(1, next_power_of_2(dim) // 2), BLOCK_TOKENS=_block_tokens(),
                HEAD_BLOCK=HEAD_BLOCK)


class _Segments(NamedTuple):
    """One or two segments ``(x, weight)`` (x alone, or a prefix and x) as both passes hand them to their kernels."""
    prefix: Optional[torch.Tensor]
    prefix_weight: Optional[torch.Tensor]
    x: torch.Tensor
    weight: Optional[torch.Tensor]
    n_prefix: int
    tensors: tuple  # X0, W0, X1, W1, COS, SIN (x stands in for a missing prefix or weight: never read)
    strides: tuple  # (batch, token, head) of the prefix and of x, then (row, column) of cos and of sin
    constexprs: dict


def _segments(segments: list, cos: torch.Tensor, sin: torch.Tensor) -> _Segments:
    (prefix, prefix_weight), (x, weight) = segments if len(segments) == 2 else ((None, None), segments[0])
    first = prefix if prefix is not None else x
    dim = x.shape[3]
    return _Segments(
        prefix, prefix_weight, x, weight, 0 if prefix is None else prefix.shape[1],
        (first, x if prefix_weight is None else prefix_weight, x, x if weight is None else weight, cos, sin),
        (*first.stride()[:3], *x.stride()[:3], cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)),
        dict(HEADS=x.shape[2], HAS_PREFIX=prefix is not None, PREFIX_WEIGHT=prefix_weight is not None,
             WEIGHT=weight is not None, TABLE_PER_PAIR=cos.shape[1] != dim, **_shape_constants(dim)))


def _grid(n_tokens: int, heads: int, batch: int) -> tuple:
    return cdiv(n_tokens, _block_tokens()), cdiv(heads, HEAD_BLOCK), batch


@on_device_of("cos")
def rms_norm_rope(segments: list, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  round_before_weight: bool = False) -> torch.Tensor:
    """``[B, S_total, H, D]`` in the segments' dtype: the segments ``(x [B, S_i, H, D], weight [D] (contiguous) or
    None)`` (x alone, or a prefix and x), in order along the sequence, each RMS-normalised with its weight and
    rotated by its rows of ``cos/sin`` (``[S_total, D]`` or ``[S_total, D/2]``, any strides). The segments' last dim
    must be contiguous, D even; one launch for both."""
    seg = _segments(segments, cos, sin)
    batch, _, heads, dim = seg.x.shape
    n_tokens = cos.shape[0]
    out = torch.empty((batch, n_tokens, heads, dim), dtype=seg.x.dtype, device=cos.device)
    if n_tokens and batch:
        _rms_norm_rope_kernel[_grid(n_tokens, heads, batch)](
            *seg.tensors, out, seg.n_prefix, n_tokens, eps, *seg.strides, *out.stride()[:3],
            ROUND_BEFORE_WEIGHT=round_before_weight, **seg.constexprs, num_warps=NUM_WARPS, **COMPILE_OPTIONS,
        )
    return out


@on_device_of("cos")
def rms_norm_rope_backward(dy: torch.Tensor, segments: list, cos: torch.Tensor, sin: torch.Tensor,
                           eps: float) -> list:
    """Gradients of ``rms_norm_rope`` for the output gradient ``dy [B, S_total, H, D]`` (last dim contiguous): per
    segment ``(dx, dweight)`` (dx contiguous in x's dtype; dweight in the weight's dtype, None without a weight).
    One launch for both segments, then, with a weight, one launch that sums the programs' partial rows into each
    weight's gradient (one program per weight and feature block)."""
    seg = _segments(segments, cos, sin)
    batch, n_tokens, heads, dim = dy.shape
    block_pairs = seg.constexprs["BLOCK_PAIRS"]
    dx = torch.empty(seg.x.shape, dtype=seg.x.dtype, device=dy.device)
    dprefix = dx if seg.prefix is None else torch.empty(seg.prefix.shape, dtype=seg.prefix.dtype, device=dy.device)
    grid = _grid(n_tokens, heads, batch)
    n_programs = grid[0] * grid[1] * grid[2]
    weights = (seg.prefix_weight, seg.weight)
    weighted = any(w is not None for w in weights)
    partial = torch.empty((n_programs if weighted else 1, 2, 2 * block_pairs), dtype=torch.float32, device=dy.device)
    if n_programs:
        _rms_norm_rope_bwd_kernel[grid](
            dy, *seg.tensors, dprefix, dx, partial, seg.n_prefix, n_tokens, eps, *dy.stride()[:3], *seg.strides,
            *dprefix.stride()[:3], *dx.stride()[:3], **seg.constexprs, num_warps=NUM_WARPS, **COMPILE_OPTIONS,
        )
    dweights = [None if w is None else torch.empty(dim, dtype=w.dtype, device=dy.device) for w in weights]
    if weighted:  # (no program, no partial row: zeros)
        n_weights = sum(w is not None for w in weights)
        _weight_grads_kernel[(n_weights, cdiv(dim, REDUCE_FEATURES))](
            partial, *(g if g is not None else partial for g in dweights), n_programs,
            HEAD_DIM=dim, BLOCK_PAIRS=block_pairs, PREFIX_WEIGHT=seg.prefix_weight is not None,
            REDUCE_ROWS=REDUCE_ROWS, REDUCE_FEATURES=REDUCE_FEATURES, num_warps=REDUCE_WARPS, **COMPILE_OPTIONS,
        )
    grads = [(dx, dweights[1])]
    return grads if seg.prefix is None else [(dprefix, dweights[0])] + grads


@on_device_of("ids")
def rope_tables(ids: torch.Tensor, freqs: torch.Tensor, axes_dim: tuple) -> tuple:
    """fp32 ``(cos, sin)`` ``[S, D]`` of positions ``ids [S, n]`` (any strides, integer or float) on the axes
    ``axes_dim`` (at most MAX_TABLE_AXES sizes summing to D: the first ``axes_dim[0]`` features read column 0, the
    next ``axes_dim[1]`` column 1, ...) with each feature's frequency ``freqs [D]`` (contiguous, fp32 or fp64: the
    angle, its cosine and sine are computed in its dtype). One launch."""
    n_rows, dim = ids.shape[0], freqs.shape[0]
    cos, sin = (torch.empty((n_rows, dim), dtype=torch.float32, device=ids.device) for _ in range(2))
    if n_rows and dim:
        ends = [sum(axes_dim[:i + 1]) for i in range(len(axes_dim) - 1)]
        ends += [dim] * (MAX_TABLE_AXES - 1 - len(ends))
        block_rows = _table_block_rows()
        _rope_tables_kernel[(cdiv(n_rows, block_rows),)](
            ids, freqs, cos, sin, n_rows, ids.stride(0), ids.stride(1), DIM=dim, BLOCK_D=next_power_of_2(dim),
            END0=ends[0], END1=ends[1], END2=ends[2], BLOCK_ROWS=block_rows, num_warps=TABLE_WARPS,
            **COMPILE_OPTIONS,
        )
    return cos, sin


INTERPRETED = built_for_interpreter(_rms_norm_rope_kernel)  # how this module's kernels were built (ops.backend_for)
if not INTERPRETED:  # (the same binaries on disk for every process: _launch.hash_in_definition_order)
    hash_in_definition_order(globals())
