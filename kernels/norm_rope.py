"""QK RMS norm and rotary embedding in one pass, forward and backward: what FLUX.1/FLUX.2 and Qwen-Image attention do
to their queries and keys between the projections and the attention, for one segment of the joint sequence per
launch.

Spec: ``sparsectx.reference.rms_norm_rope_ref`` (its autograd gives the backward's spec).

In diffusers these are an RMS norm kernel, a concatenation of the text and image streams and about eight
elementwise kernels of ``apply_rotary_emb`` (a negation, a stack, two upcasts to fp32, two products with the fp32
tables, a sum and the downcast), each a pass over the ``[B, S, H, D]`` tensor (and as many again backward). Here
one program reads a block of tokens x a block of heads once, normalises every head vector (fp32 statistics,
rounded to the tensor's dtype as the norm's output is in diffusers), rotates its pairs of adjacent features by the
token's cos/sin rows (read once per program, shared by its heads) and writes the result at its place in the joint
output. The backward rotates the output gradient back, then takes the norm's gradient; each program writes its
partial sum of the weight's gradient to its own row (summed on the host side: no atomics, deterministic).

Offsets are int64 (a ``[B, S, H*D]`` tensor of a long sequence passes 2**31 elements).
"""
import torch
import triton
import triton.language as tl

from ._launch import built_for_interpreter, cdiv, next_power_of_2, on_device_of

# Tokens and heads per program. A program moves BLOCK_TOKENS x HEAD_BLOCK head vectors (4096 elements at D=128) and
# BLOCK_TOKENS rows of both tables. Chosen by arithmetic (enough programs to fill an H200 at a few thousand tokens,
# 16 fp32 values per thread and tensor with 8 warps), not measured on a GPU.
BLOCK_TOKENS = 8
HEAD_BLOCK = 4
NUM_WARPS = 8


@triton.jit
def _tile(n_tokens, table_row0, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
          BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    """This program's tile of a segment: (its sample (int64), token offsets within the segment, head indices,
    features, the ``[tokens, heads, features]`` validity mask, the validity of the tokens and of the features, the
    int64 rows of its tokens in the joint sequence (of the tables and of the joint output))."""
    batch = tl.program_id(2).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    features = tl.arange(0, 2 * BLOCK_PAIRS)  # BLOCK_PAIRS pairs of adjacent features
    token_valid, feature_valid = tokens < n_tokens, features < HEAD_DIM
    mask = token_valid[:, None, None] & (heads < HEADS)[None, :, None] & feature_valid[None, None, :]
    return batch, tokens, heads, features, mask, token_valid, feature_valid, (table_row0 + tokens).to(tl.int64)


@triton.jit
def _inverse_rms(x, token_valid, heads, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``rsqrt(mean(x²) + eps)`` of each head vector ``[tokens, heads]``; 0 for the tile's padding tokens and heads
    (with eps 0 their zero vectors would give inf, and 0 · inf = NaN in the backward's sums over the tile)."""
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)
    return tl.where(token_valid[:, None] & (heads < HEADS)[None, :], rstd, 0.0)


@triton.jit
def _load_table(T, rows, features, token_valid, feature_valid, stride_row, stride_col, TABLE_PER_PAIR: tl.constexpr):
    """The tokens' rows of a cos or sin table as fp32 ``[tokens, 1, features]`` (shared by the program's heads): a
    value per feature, or with TABLE_PER_PAIR one per pair of features (column ``f // 2``). A column stride of 1
    is specialised by Triton: contiguous, vectorised loads. Column offsets are int64 (a transposed table's column
    stride is its row count)."""
    cols = (features // 2 if TABLE_PER_PAIR else features).to(tl.int64) * stride_col
    table_mask = token_valid[:, None] & feature_valid[None, :]
    return tl.load(T + (rows[:, None] * stride_row + cols[None, :])[:, None, :], mask=table_mask[:, None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _load_heads(X, batch, tokens, heads, features, mask, stride_b, stride_s, stride_h):
    """Head vectors ``X[batch, tokens, heads, :]`` as fp32 ``[tokens, heads, features]`` (0 outside the mask)."""
    offsets = (batch * stride_b + tokens.to(tl.int64)[:, None, None] * stride_s
               + heads.to(tl.int64)[None, :, None] * stride_h + features[None, None, :])
    return tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pairs(t, BLOCK_TOKENS: tl.constexpr, ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """``[tokens, ROWS, features]`` -> its features at even and at odd positions, each ``[tokens, ROWS, pairs]``."""
    return tl.split(tl.reshape(t, [BLOCK_TOKENS, ROWS, BLOCK_PAIRS, 2]))


@triton.jit
def _interleave(even, odd, BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Inverse of ``_pairs``: ``[tokens, heads, features]`` with ``even`` at even positions, ``odd`` at odd ones."""
    return tl.reshape(tl.join(even, odd), [BLOCK_TOKENS, HEAD_BLOCK, 2 * BLOCK_PAIRS])


@triton.jit
def _rms_norm_rope_kernel(
    X, W, COS, SIN, OUT, n_tokens, table_row0, eps,
    stride_xb, stride_xs, stride_xh, stride_cs, stride_c_col, stride_ss, stride_s_col, stride_ob, stride_os,
    stride_oh,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr, TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
):
    """Forward. Tokens ``pid(0) * BLOCK_TOKENS ..`` and heads ``pid(1) * HEAD_BLOCK ..`` of sample ``pid(2)`` of the
    segment ``X [B, n_tokens, HEADS, HEAD_DIM]``, whose tokens are the joint sequence's rows ``table_row0 ..``."""
    batch, tokens, heads, features, mask, token_valid, feature_valid, rows = _tile(
        n_tokens, table_row0, HEADS, HEAD_DIM, BLOCK_PAIRS, BLOCK_TOKENS, HEAD_BLOCK)
    cos = _load_table(COS, rows, features, token_valid, feature_valid, stride_cs, stride_c_col, TABLE_PER_PAIR)
    sin = _load_table(SIN, rows, features, token_valid, feature_valid, stride_ss, stride_s_col, TABLE_PER_PAIR)
    x = _load_heads(X, batch, tokens, heads, features, mask, stride_xb, stride_xs, stride_xh)

    # RMS norm of each head vector (padding features are 0), rounded to the tensor's dtype (ROUND_BEFORE_WEIGHT:
    # also before the weight multiplies it, as diffusers' own RMSNorm does with half-precision weights)
    rstd = _inverse_rms(x, token_valid, heads, eps, HEADS, HEAD_DIM)
    normed = x * rstd[:, :, None]
    if HAS_WEIGHT:
        if ROUND_BEFORE_WEIGHT:
            normed = normed.to(OUT.dtype.element_ty).to(tl.float32)
        weight = tl.load(W + features, mask=feature_valid, other=0.0).to(tl.float32)
        normed = normed * weight[None, None, :]
    normed = normed.to(OUT.dtype.element_ty).to(tl.float32)

    # rotation of each pair (a, b) = (x[2i], x[2i+1]): (a·cos[2i] - b·sin[2i], b·cos[2i+1] + a·sin[2i+1])
    first, second = _pairs(normed, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS)
    out = normed * cos + _interleave(-second, first, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS) * sin

    out_offsets = batch * stride_ob + rows[:, None, None] * stride_os + heads.to(tl.int64)[None, :, None] * stride_oh
    tl.store(OUT + out_offsets + features[None, None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_rope_bwd_kernel(
    DY, X, W, COS, SIN, DX, DW_PARTIAL, n_tokens, table_row0, eps,
    stride_dyb, stride_dys, stride_dyh, stride_xb, stride_xs, stride_xh, stride_cs, stride_c_col, stride_ss,
    stride_s_col, stride_dxb, stride_dxs, stride_dxh,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr, HEAD_BLOCK: tl.constexpr,
):
    """Backward of one tile (the forward's): ``dX`` of the segment and, with a weight, this program's partial sum of
    ``dW`` over its tokens and heads, into row ``program`` of ``DW_PARTIAL [programs, 2 * BLOCK_PAIRS]`` fp32. The
    forward's roundings pass the gradient unchanged (as autograd through diffusers' casts)."""
    batch, tokens, heads, features, mask, token_valid, feature_valid, rows = _tile(
        n_tokens, table_row0, HEADS, HEAD_DIM, BLOCK_PAIRS, BLOCK_TOKENS, HEAD_BLOCK)
    cos = _load_table(COS, rows, features, token_valid, feature_valid, stride_cs, stride_c_col, TABLE_PER_PAIR)
    sin = _load_table(SIN, rows, features, token_valid, feature_valid, stride_ss, stride_s_col, TABLE_PER_PAIR)
    x = _load_heads(X, batch, tokens, heads, features, mask, stride_xb, stride_xs, stride_xh)
    dy = _load_heads(DY, batch, rows, heads, features, mask, stride_dyb, stride_dys, stride_dyh)  # joint rows

    # the rotation's transpose: d(normed)[2i] = dy[2i]·cos[2i] + dy[2i+1]·sin[2i+1],
    #                           d(normed)[2i+1] = dy[2i+1]·cos[2i+1] - dy[2i]·sin[2i]
    dy_first, dy_second = _pairs(dy, BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS)
    sin_first, sin_second = _pairs(sin, BLOCK_TOKENS, 1, BLOCK_PAIRS)
    dnormed = dy * cos + _interleave(dy_second * sin_second, -dy_first * sin_first, BLOCK_TOKENS, HEAD_BLOCK,
                                     BLOCK_PAIRS)

    # the norm's: with n = x·r·w, r = rsqrt(mean(x²) + eps): dx = r·w·dn - x·r³·sum(x·w·dn) / D, dw = sum(dn·x·r)
    rstd = _inverse_rms(x, token_valid, heads, eps, HEADS, HEAD_DIM)
    dscaled = dnormed
    if HAS_WEIGHT:
        weight = tl.load(W + features, mask=feature_valid, other=0.0).to(tl.float32)
        dscaled = dnormed * weight[None, None, :]
        program = (batch * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)  # int64
        dw = tl.sum(tl.sum(dnormed * x * rstd[:, :, None], axis=1), axis=0)
        tl.store(DW_PARTIAL + program * (2 * BLOCK_PAIRS) + features, dw)
    dot = tl.sum(x * dscaled, axis=2)
    dx = rstd[:, :, None] * dscaled - x * (rstd * rstd * rstd * dot / HEAD_DIM)[:, :, None]
    dx_offsets = (batch * stride_dxb + tokens.to(tl.int64)[:, None, None] * stride_dxs
                  + heads.to(tl.int64)[None, :, None] * stride_dxh + features[None, None, :])
    tl.store(DX + dx_offsets, dx.to(DX.dtype.element_ty), mask=mask)


def _shape_constants(dim: int) -> dict:
    return dict(HEAD_DIM=dim, BLOCK_PAIRS=max(1, next_power_of_2(dim) // 2), BLOCK_TOKENS=BLOCK_TOKENS,
                HEAD_BLOCK=HEAD_BLOCK)


@on_device_of("cos")
def rms_norm_rope(segments: list, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  round_before_weight: bool = False) -> torch.Tensor:
    """``[B, S_total, H, D]`` in the segments' dtype: the segments ``(x [B, S_i, H, D], weight [D] (contiguous) or
    None)``, in order along the sequence, each RMS-normalised with its weight and rotated by its rows of
    ``cos/sin`` (``[S_total, D]`` or ``[S_total, D/2]``, any strides). The segments' last dim must be contiguous,
    D even; one launch per segment."""
    batch, _, heads, dim = segments[0][0].shape
    out = torch.empty((batch, cos.shape[0], heads, dim), dtype=segments[0][0].dtype, device=cos.device)
    row0 = 0
    for x, weight in segments:
        n_tokens = x.shape[1]
        if n_tokens and batch:
            grid = (cdiv(n_tokens, BLOCK_TOKENS), cdiv(heads, HEAD_BLOCK), batch)
            _rms_norm_rope_kernel[grid](
                x, weight if weight is not None else x, cos, sin, out, n_tokens, row0, eps,
                x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
                out.stride(0), out.stride(1), out.stride(2),
                HEADS=heads, HAS_WEIGHT=weight is not None, ROUND_BEFORE_WEIGHT=round_before_weight,
                TABLE_PER_PAIR=cos.shape[1] != dim, **_shape_constants(dim), num_warps=NUM_WARPS,
            )
        row0 += n_tokens
    return out


@on_device_of("cos")
def rms_norm_rope_backward(dy: torch.Tensor, segments: list, cos: torch.Tensor, sin: torch.Tensor,
                           eps: float) -> list:
    """Gradients of ``rms_norm_rope`` for the output gradient ``dy [B, S_total, H, D]`` (last dim contiguous): per
    segment ``(dx, dweight)`` (dx contiguous in x's dtype; dweight in the weight's dtype, None without a weight)."""
    batch, _, heads, dim = dy.shape
    constants = _shape_constants(dim)
    grads, row0 = [], 0
    for x, weight in segments:
        n_tokens = x.shape[1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grid = (cdiv(n_tokens, BLOCK_TOKENS), cdiv(heads, HEAD_BLOCK), batch)
        n_programs = grid[0] * grid[1] * grid[2]
        partial = torch.empty((n_programs if weight is not None else 1, 2 * constants["BLOCK_PAIRS"]),
                              dtype=torch.float32, device=x.device)
        if n_programs:
            _rms_norm_rope_bwd_kernel[grid](
                dy, x, weight if weight is not None else x, cos, sin, dx, partial, n_tokens, row0, eps,
                dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
                cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), dx.stride(0), dx.stride(1), dx.stride(2),
                HEADS=heads, HAS_WEIGHT=weight is not None, TABLE_PER_PAIR=cos.shape[1] != dim, **constants,
                num_warps=NUM_WARPS,
            )
        dweight = None
        if weight is not None:  # an empty segment has no program: its weight gets zeros
            dweight = (partial[:, :dim].sum(0) if n_programs else torch.zeros(dim, device=x.device)).to(weight.dtype)
        grads.append((dx, dweight))
        row0 += n_tokens
    return grads


INTERPRETED = built_for_interpreter(_rms_norm_rope_kernel)  # how this module's kernels were built (ops.backend_for)
