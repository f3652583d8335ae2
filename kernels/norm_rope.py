"""QK RMS norm and rotary embedding in one pass: what FLUX.1/FLUX.2 and Qwen-Image attention do to their queries and
keys between the projections and the attention, for one segment of the joint sequence per launch.

Spec: ``sparsectx.reference.rms_norm_rope_ref``.

In diffusers these are an RMS norm kernel, a concatenation of the text and image streams and about eight
elementwise kernels of ``apply_rotary_emb`` (a negation, a stack, two upcasts to fp32, two products with the fp32
tables, a sum and the downcast), each a pass over the ``[B, S, H, D]`` tensor. Here one program reads a block of
tokens x a block of heads once, normalises every head vector (fp32 statistics, rounded to the tensor's dtype as
the norm's output is in diffusers), rotates its pairs of adjacent features by the token's cos/sin rows (read once
per program, shared by its heads) and writes the result at its place in the joint output.

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
def _rms_norm_rope_kernel(
    X, W, COS, SIN, OUT, n_tokens, table_row0, eps,
    stride_xb, stride_xs, stride_xh, stride_cs, stride_c_col, stride_ss, stride_s_col, stride_ob, stride_os,
    stride_oh,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_PAIRS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr, TABLE_PER_PAIR: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
):
    """Tokens ``pid(0) * BLOCK_TOKENS ..`` and heads ``pid(1) * HEAD_BLOCK ..`` of sample ``pid(2)`` of the segment
    ``X [B, n_tokens, HEADS, HEAD_DIM]``; its tokens are the joint sequence's rows ``table_row0 ..`` (of the tables
    and of the output). The tables hold a value per feature, or with TABLE_PER_PAIR one per pair of features
    (column ``f // 2``). Tiles are ``[tokens, heads, pairs, 2]``: the last axis holds a pair's two features."""
    batch = tl.program_id(2).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    features = tl.arange(0, 2 * BLOCK_PAIRS)  # BLOCK_PAIRS pairs of adjacent features
    feature_valid = features < HEAD_DIM
    token_valid = tokens < n_tokens
    rows = (table_row0 + tokens).to(tl.int64)  # rows of the joint sequence

    # the tokens' cos/sin rows, [tokens, 1, features]: shared by every head of the program
    table_mask = (token_valid[:, None] & feature_valid[None, :])[:, None, :]
    table_cols = features // 2 if TABLE_PER_PAIR else features
    cos_cols = table_cols * stride_c_col  # (a column stride of 1 is specialised: contiguous, vectorised loads)
    sin_cols = table_cols * stride_s_col
    cos = tl.load(COS + (rows[:, None] * stride_cs + cos_cols[None, :])[:, None, :], mask=table_mask,
                  other=0.0).to(tl.float32)
    sin = tl.load(SIN + (rows[:, None] * stride_ss + sin_cols[None, :])[:, None, :], mask=table_mask,
                  other=0.0).to(tl.float32)

    # the head vectors, [tokens, heads, features]
    mask = token_valid[:, None, None] & (heads < HEADS)[None, :, None] & feature_valid[None, None, :]
    token_offsets = tokens.to(tl.int64)[:, None, None] * stride_xs
    head_offsets = heads.to(tl.int64)[None, :, None] * stride_xh
    x = tl.load(X + batch * stride_xb + token_offsets + head_offsets + features[None, None, :], mask=mask,
                other=0.0).to(tl.float32)

    # RMS norm of each head vector (padding features are 0), rounded to the tensor's dtype (ROUND_BEFORE_WEIGHT:
    # also before the weight multiplies it, as diffusers' own RMSNorm does with half-precision weights)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=2) / HEAD_DIM + eps)
    normed = x * rstd[:, :, None]
    if HAS_WEIGHT:
        if ROUND_BEFORE_WEIGHT:
            normed = normed.to(OUT.dtype.element_ty).to(tl.float32)
        weight = tl.load(W + features, mask=feature_valid, other=0.0).to(tl.float32)
        normed = normed * weight[None, None, :]
    normed = normed.to(OUT.dtype.element_ty).to(tl.float32)

    # rotation of each pair (a, b) = (x[2i], x[2i+1]): (a·cos[2i] - b·sin[2i], b·cos[2i+1] + a·sin[2i+1])
    first, second = tl.split(tl.reshape(normed, [BLOCK_TOKENS, HEAD_BLOCK, BLOCK_PAIRS, 2]))
    swapped = tl.reshape(tl.join(-second, first), [BLOCK_TOKENS, HEAD_BLOCK, 2 * BLOCK_PAIRS])
    out = normed * cos + swapped * sin

    out_offsets = batch * stride_ob + rows[:, None, None] * stride_os + heads.to(tl.int64)[None, :, None] * stride_oh
    tl.store(OUT + out_offsets + features[None, None, :], out.to(OUT.dtype.element_ty), mask=mask)


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
                HEADS=heads, HEAD_DIM=dim, BLOCK_PAIRS=max(1, next_power_of_2(dim) // 2),
                HAS_WEIGHT=weight is not None, ROUND_BEFORE_WEIGHT=round_before_weight,
                TABLE_PER_PAIR=cos.shape[1] != dim, BLOCK_TOKENS=BLOCK_TOKENS, HEAD_BLOCK=HEAD_BLOCK,
                num_warps=NUM_WARPS,
            )
        row0 += n_tokens
    return out


INTERPRETED = built_for_interpreter(_rms_norm_rope_kernel)  # how this module's kernels were built (ops.backend_for)
