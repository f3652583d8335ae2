"""Plain-torch reference implementations: the specification every kernel is tested against.

Nothing here is fast. Every function computes in the dtype of its inputs (pass float64 tensors for the exact
reference, or the kernel's dtype for "what PyTorch itself gets in that dtype"), loops over samples where that keeps
the semantics obvious, and supports autograd through ordinary torch ops.

Conventions (shared with ``sparsectx.ops``):
- packed varlen tensors are ``[total, ...]`` with ``cu_seqlens`` int32 ``[B+1]`` (flash-attn's convention);
- ``index`` int32 ``[total]`` gives, for each packed row, its position inside its own sample.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Budget = Union[int, float, Sequence[Union[int, float]], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# token compaction
# ----------------------------------------------------------------------------------------------------------------
def budget_to_counts(budget: Budget, batch: int, n_tokens: int) -> list[int]:
    """Per-sample number of kept tokens. int = count, float = ratio of N rounded half-up, or one of either per sample.

    (Validation with clear errors happens in ``sparsectx.ops``; this is the arithmetic.)
    """
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist() if budget.ndim else budget.item()
    values = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
    counts = []
    for b in values:
        if isinstance(b, float) and isinstance(n_tokens, torch.SymInt):  # traced with a dynamic N: stays symbolic
            counts.append(torch.sym_min(n_tokens, math.floor(b * n_tokens + 0.5)))
        elif isinstance(b, float):
            counts.append(min(n_tokens, int(math.floor(b * n_tokens + 0.5))))
        else:
            counts.append(int(b))
    return counts


def topk_keep_mask(scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """bool[B, N]: the ``counts[b]`` highest scores of each row; ties go to the lower index."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    for b, k in enumerate(counts):
        keep[b, order[b, :k]] = True
    return keep


MASS_MODES = ("auto", "linear", "softmax")  # how score_mass reads scores as a distribution


def score_mass(scores: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """Scores ``[R, L]`` as a distribution per row, float64.

    ``linear``: ``max(score, 0) / their sum`` (the clipped scores first scaled by the row's largest, so that a sum
    of scores near float64's max stays finite), uniform (``1 / L``) where the clipped scores do not sum above 0;
    ``softmax``: the softmax of the scores, uniform for a row of -inf (as any row of equal scores); ``auto``:
    softmax for a row with a negative score, linear otherwise. (+inf and NaN scores have no defined mass.)"""
    scores = scores.double()
    tiny = torch.finfo(torch.float64).tiny
    uniform = 1.0 / max(scores.shape[1], 1)
    if mode != "linear":  # (each mode computes only what it returns)
        soft = torch.softmax(scores, dim=1)
        soft = torch.where(torch.isnan(soft), uniform, soft)  # NaN only from a row of -inf (without NaN and +inf)
        if mode == "softmax":
            return soft
    clipped = scores.clamp(min=0.0)
    if clipped.shape[1]:
        clipped = clipped / clipped.amax(dim=1, keepdim=True).clamp(min=tiny)
    total = clipped.sum(dim=1, keepdim=True)
    linear = torch.where(total > 0, clipped / total.clamp(min=tiny), uniform)
    if mode == "linear":
        return linear
    return torch.where((scores < 0).any(dim=1, keepdim=True), soft, linear)


# adaptive counts: the share of the mass is compared in float64 with this slack against rounding (a coverage of 0.8
# over ten equal scores is reached by 8 tokens, whatever the order of the sums)
COVERAGE_TOLERANCE = 1e-9


def ranked_keep_mask_ref(scores: torch.Tensor, ref_lengths: Sequence[int], counts: Optional[torch.Tensor] = None,
                         coverage: Union[float, torch.Tensor, None] = None, low: Optional[torch.Tensor] = None,
                         high: Optional[torch.Tensor] = None, tolerance: float = COVERAGE_TOLERANCE,
                         mass: str = "linear") -> tuple:
    """``(keep bool [B, N], counts int64 [B, n_refs])``: per sample and reference image (the images lie one after
    another in the N tokens, ``ref_lengths``), the image's ``count`` highest scores kept (ties to the lower index).

    ``counts`` ``[B, n_refs]`` gives each count; without it the count is adaptive: the tokens whose mass ranked
    above them (the image's ``score_mass(scores, mass)`` of the tokens before them in the descending order) lies
    below ``coverage - tolerance``, at least one when ``coverage > 0`` and none when it is 0, then clamped to
    ``[low, high]`` (``min(max(count, low), high)``). ``coverage`` a float or a float64 ``[B, n_refs]`` tensor;
    ``low`` / ``high`` int64 ``[B, n_refs]``."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    kept = []
    start = 0
    for i, length in enumerate(ref_lengths):
        rows = scores[:, start:start + length]
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices
        if counts is None:
            share = score_mass(rows, mass).gather(1, order)
            before = torch.cumsum(share, dim=1) - share
            cov = coverage[:, i:i + 1] if isinstance(coverage, torch.Tensor) else torch.tensor(
                coverage, dtype=torch.float64, device=scores.device)
            needed = (before < cov - tolerance).sum(dim=1, keepdim=True)
            needed = torch.where(cov > 0, needed.clamp(min=1), 0)
            count = torch.minimum(torch.maximum(needed[:, 0], low[:, i]), high[:, i])
        else:
            count = counts[:, i].long()
        ranked_kept = torch.arange(length, device=scores.device)[None] < count[:, None]
        keep[:, start:start + length] = torch.zeros_like(ranked_kept).scatter_(1, order, ranked_kept)
        kept.append(count)
        start += length
    return keep, torch.stack(kept, dim=1) if kept else torch.zeros((scores.shape[0], 0), dtype=torch.long,
                                                                 device=scores.device)


def compact_ref(keep: torch.Tensor, *tensors: torch.Tensor):
    """Kept positions per sample in original order, packed.

    Returns ``(index int32[total], cu_seqlens int32[B+1], packed tensors [total, ...])``.
    """
    batch = keep.shape[0]
    positions = [torch.nonzero(keep[b], as_tuple=False).flatten() for b in range(batch)]
    # (every tensor made on the mask's device: not torch's default device, which a `with torch.device(...)` sets)
    counts = torch.tensor([len(p) for p in positions], dtype=torch.int64, device=keep.device)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=keep.device)
    cu_seqlens[1:] = torch.cumsum(counts, 0).to(torch.int32)
    index = torch.cat(positions).to(torch.int32) if batch else torch.zeros(0, dtype=torch.int32, device=keep.device)
    packed = [t[keep] for t in tensors]  # row-major boolean indexing: sample by sample, positions in order
    return index.to(keep.device), cu_seqlens.to(keep.device), packed


def scatter_ref(packed: torch.Tensor, index: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int,
                fill: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """Inverse of ``compact_ref``: rows back to ``[B, N, ...]``; elsewhere ``fill`` (a scalar or a ``[B, N, ...]``
    tensor whose values are kept). Rows whose index lies outside ``[0, N)`` are skipped (their gradient is
    zero)."""
    batch = cu_seqlens.numel() - 1
    if isinstance(fill, torch.Tensor):
        out = fill.clone()
    else:
        out = packed.new_full((batch, n_tokens, *packed.shape[1:]), fill)
    pieces = []
    for b in range(batch):
        lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        pos = index[lo:hi].long()
        valid = (pos >= 0) & (pos < n_tokens)
        row = out[b].index_put((pos[valid],), packed[lo:hi][valid])
        pieces.append(row)
    return torch.stack(pieces) if pieces else out


def _flat_rows(index: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """For each packed row, its row ``b * N + index`` in the ``[B * N, ...]`` view, or ``B * N`` (one row past the
    end) when it is not valid: past ``cu_seqlens[-1]``, or its index outside ``[0, N)``."""
    batch = cu_seqlens.numel() - 1
    rows = torch.arange(index.numel(), device=index.device)
    sample = torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), rows, right=True)
    position = index.to(torch.int64)
    valid = (rows < cu_seqlens[-1]) & (position >= 0) & (position < n_tokens)
    return torch.where(valid, sample * n_tokens + position, batch * n_tokens)


def gather_rows_ref(payload: torch.Tensor, index: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[rows, ...]``: row r holds ``payload[b, index[r]]`` for the sample b whose range of ``cu_seqlens`` holds r;
    zeros for rows past ``cu_seqlens[-1]`` and for indices outside ``[0, N)``. Shapes never depend on the data."""
    batch, n_tokens, *rest = payload.shape
    flat = payload.reshape(batch * n_tokens, *rest)
    with_zero_row = torch.cat([flat, flat.new_zeros((1, *rest))])
    return with_zero_row[_flat_rows(index, cu_seqlens, n_tokens)]


_NO_INDEX_PUT = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def scatter_rows_ref(packed: Optional[torch.Tensor], index: torch.Tensor, cu_seqlens: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, N, ...]`` with ``out[b, index[r]]`` replaced by ``packed[r]`` (zeros when ``packed`` is None)
    for every valid packed row r (as in ``gather_rows_ref``); a new tensor, differentiable in both."""
    if out.dtype in _NO_INDEX_PUT:  # unsigned ints torch can not index_put: the same bits as signed ints
        signed = _NO_INDEX_PUT[out.dtype]
        return scatter_rows_ref(None if packed is None else packed.view(signed), index, cu_seqlens,
                                out.view(signed)).view(out.dtype)
    batch, n_tokens, *rest = out.shape
    flat = out.reshape(batch * n_tokens, *rest)
    with_spare_row = torch.cat([flat, flat.new_zeros((1, *rest))])  # invalid rows all land in the spare row
    rows = packed if packed is not None else flat.new_zeros((index.numel(), *rest))
    written = with_spare_row.index_put((_flat_rows(index, cu_seqlens, n_tokens),), rows.to(out.dtype))
    return written[:-1].view(out.shape)


# ----------------------------------------------------------------------------------------------------------------
# sparse joint attention
# ----------------------------------------------------------------------------------------------------------------
def _ref_rows(ref_index, cu_seqlens_ref, b: int, packed: bool):
    """Sample b's reference rows: a slice of the packed tensor, or its buffer rows ``ref_index[...]``."""
    r0, r1 = int(cu_seqlens_ref[b]), int(cu_seqlens_ref[b + 1])
    return slice(r0, r1) if packed else ref_index[r0:r1].long()


def _ref_select(ref, b: int, rows):
    """Rows ``rows`` of sample b's references (packed ``[Tref, H, D]``: the rows themselves)."""
    return ref[rows] if ref.ndim == 3 else ref[b, rows]


def _softmax_seen(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row whose scores are all -inf sees no key and gets zeros (not NaN), as the
    kernels give it (with lse -inf); so does every row when there is no key at all."""
    if scores.shape[-1] == 0:
        return torch.zeros_like(scores)
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(torch.isneginf(scores.amax(dim=-1, keepdim=True)), 0.0)


def sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    ref_k: Optional[torch.Tensor] = None,
    ref_v: Optional[torch.Tensor] = None,
    ref_index: Optional[torch.Tensor] = None,
    cu_seqlens_ref: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
):
    """Bidirectional varlen attention in which sample b's keys are its own packed keys followed by
    ``ref_k[b, ref_index[cu_seqlens_ref[b]:cu_seqlens_ref[b+1]]]`` (same for values), or, when ``ref_index`` is
    None, by the packed rows ``ref_k[cu_seqlens_ref[b]:cu_seqlens_ref[b+1]]``.

    q ``[Tq, H, D]``, k/v ``[Tk, H, D]``, ref_k/ref_v ``[B, R, H, D]`` (or packed ``[Tref, H, D]``). Returns
    ``(out [Tq, H, D], lse [H, Tq])``; ``lse`` is the natural-log log-sum-exp of the scaled scores, ``-inf`` for a
    query that sees no key (whose output is then zero) and for rows of q past ``cu_seqlens_q[-1]``. ``lse`` is fp32
    whatever the inputs' dtype, as the op returns it (computed in the inputs' dtype, then rounded: in float64 it is
    the exact value to fp32's precision, e.g. 4e-5 at an lse of 3000).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    batch = cu_seqlens_q.numel() - 1
    outs, lses = [], []
    for b in range(batch):
        q_b = q[int(cu_seqlens_q[b]):int(cu_seqlens_q[b + 1])]
        k_b = k[int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])]
        v_b = v[int(cu_seqlens_k[b]):int(cu_seqlens_k[b + 1])]
        if ref_k is not None:
            sel = _ref_rows(ref_index, cu_seqlens_ref, b, ref_index is None)
            k_b = torch.cat([k_b, _ref_select(ref_k, b, sel)])
            v_b = torch.cat([v_b, _ref_select(ref_v, b, sel)])
        scores = torch.einsum("qhd,khd->hqk", q_b, k_b) * scale  # [H, q, k]
        if k_b.shape[0] == 0:
            outs.append(torch.zeros_like(q_b))
            lses.append(torch.full(scores.shape[:2], -math.inf, dtype=torch.float32, device=q.device))
            continue
        lse = torch.logsumexp(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, -1)
        probs = _softmax_seen(scores)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v_b))
        lses.append(lse.float())
    # rows of q past cu_seqlens_q[-1] (a caller's padding) belong to no sample: output zero, lse -inf
    tail = q.shape[0] - int(cu_seqlens_q[-1])
    outs.append(q.new_zeros((tail, *q.shape[1:])))
    lses.append(torch.full((q.shape[1], tail), -math.inf, dtype=torch.float32, device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=1)


def masked_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                         softmax_scale: Optional[float] = None, query_mask: Optional[torch.Tensor] = None):
    """Dense layout ``[B, S, H, D]``: each query attends to the keys of its sample where ``key_mask[b]`` is True.
    Queries that see no key, and queries where ``query_mask`` is False, output zero; a NaN score of a kept query
    and key makes that query's output NaN, as in the kernels. Dropped keys' and values' contents are never read
    (a NaN or inf there changes nothing, as in the kernels), nor are skipped queries' (their gradients are zero)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dropped = ~key_mask[:, :, None, None]
    k, v = k.masked_fill(dropped, 0), v.masked_fill(dropped, 0)  # (a zero probability times NaN is NaN)
    if query_mask is not None:  # (a NaN in a skipped query's scores made its and every key's gradient NaN)
        q = q.masked_fill(~query_mask[:, :, None, None], 0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", _softmax_seen(scores), v)
    if query_mask is not None:
        out = out.masked_fill(~query_mask[:, :, None, None], 0.0)
    return out


KEY_MASS_CHUNK_ELEMENTS = 1 << 25  # attention_key_mass_ref holds at most this many scores at a time


def attention_key_mass_ref(q: torch.Tensor, k: torch.Tensor, query_weights: torch.Tensor,
                           softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Dense ``q [B, Q, H, D]``, ``k [B, N, H, D]``, ``query_weights [B, Q]``: ``[B, H, N]`` with
    ``mass[b, h, n] = sum_q query_weights[b, q] * softmax_n(scale * q[b, q, h]·k[b, n, h])`` (the softmax over the
    given keys; a query whose scores are all -inf gives no mass). Computed in the inputs' dtype, in chunks of heads
    (and of queries, when one head alone is larger) of at most ``KEY_MASS_CHUNK_ELEMENTS`` scores: exact, since
    each query's softmax stays in one chunk."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    batch, n_queries, heads, _ = q.shape
    n_keys = k.shape[1]
    weights = query_weights.to(q.dtype)
    queries_per_chunk = max(1, min(n_queries, KEY_MASS_CHUNK_ELEMENTS // max(1, batch * n_keys)))
    heads_per_chunk = max(1, KEY_MASS_CHUNK_ELEMENTS // max(1, batch * queries_per_chunk * n_keys))
    mass = q.new_zeros((batch, heads, n_keys))
    if n_keys == 0:  # no key to give mass to (the loop's max over no key would fail)
        return mass
    for h0 in range(0, heads, heads_per_chunk):
        h1 = h0 + heads_per_chunk
        for q0 in range(0, n_queries, queries_per_chunk):
            q1 = q0 + queries_per_chunk
            scores = torch.einsum("bqhd,bkhd->bhqk", q[:, q0:q1, h0:h1], k[:, :, h0:h1]) * scale
            mass[:, h0:h1] += torch.einsum("bhqk,bq->bhk", _softmax_seen(scores), weights[:, q0:q1])
    return mass


def sparse_attention_bwd_ref(dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, *, ref_k=None, ref_v=None,
                             ref_index=None, cu_seqlens_ref=None, softmax_scale=None):
    """Explicit gradients of ``sparse_attention_ref`` for upstream grads ``dout [Tq,H,D]`` and ``dlse [H,Tq]``:
    ``(dq, dk, dv, dref_k, dref_v)`` (the last two None without a reference buffer). Computed in the inputs' dtype
    (pass float64 for the exact reference). The backward kernel implements these same formulas:
    P = softmax(scale·QKᵀ), dV = Pᵀ dO, dP = dO Vᵀ, Δ = rowsum(dO∘O) − dlse, dS = P∘(dP − Δ), dQ = scale·dS K,
    dK = scale·dSᵀ Q; reference rows of dK/dV go back to their place in the buffer."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dref_k = torch.zeros_like(ref_k) if ref_k is not None else None
    dref_v = torch.zeros_like(ref_v) if ref_v is not None else None
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        k_b, v_b = k[k0:k1], v[k0:k1]
        sel = None
        if ref_k is not None:
            sel = _ref_rows(ref_index, cu_seqlens_ref, b, ref_index is None)
            k_b, v_b = torch.cat([k_b, _ref_select(ref_k, b, sel)]), torch.cat([v_b, _ref_select(ref_v, b, sel)])
        if k_b.shape[0] == 0 or q1 == q0:
            continue
        q_b, do_b = q[q0:q1], dout[q0:q1].to(q.dtype)
        probs = _softmax_seen(torch.einsum("qhd,khd->hqk", q_b, k_b) * scale)  # [H, q, k]
        o_b = torch.einsum("hqk,khd->qhd", probs, v_b)
        dv_b = torch.einsum("hqk,qhd->khd", probs, do_b)
        dp = torch.einsum("qhd,khd->hqk", do_b, v_b)
        delta = (do_b * o_b).sum(-1).transpose(0, 1) - dlse[:, q0:q1].to(q.dtype)  # [H, q]
        ds = probs * (dp - delta[..., None])
        dq[q0:q1] = torch.einsum("hqk,khd->qhd", ds, k_b) * scale
        dk_b = torch.einsum("hqk,qhd->khd", ds, q_b) * scale
        n_own = k1 - k0
        dk[k0:k1], dv[k0:k1] = dk_b[:n_own], dv_b[:n_own]
        if sel is not None:
            target = (sel,) if ref_k.ndim == 3 else (b, sel)
            dref_k[target] = dk_b[n_own:]
            dref_v[target] = dv_b[n_own:]
    return dq, dk, dv, dref_k, dref_v


# ----------------------------------------------------------------------------------------------------------------
# QK norm and rotary embedding
# ----------------------------------------------------------------------------------------------------------------
def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, dim: int, wide: torch.dtype) -> tuple:
    """The tables as ``[1, S, 1, D]`` in ``wide``, for ``[B, S, H, D]`` head vectors: a value per feature (tables of
    one value per pair repeated for both of its features)."""
    if cos.shape[-1] != dim:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return cos.to(wide)[None, :, None, :], sin.to(wide)[None, :, None, :]


def rope_tables_ref(ids: torch.Tensor, freqs: torch.Tensor, axes_dim) -> tuple:
    """fp32 ``(cos, sin)`` ``[S, D]``: for feature f on axis a (the first ``axes_dim[0]`` features on axis 0, the
    next ``axes_dim[1]`` on axis 1, ...), the cosine and sine of ``float32(ids[s, a]) * freqs[f]`` computed in
    freqs' dtype (promotion: the fp32 position is exact in fp64), rounded to fp32. With diffusers' frequencies these
    are FLUX's ``pos_embed`` tables (``FluxPosEmbed`` / ``Flux2PosEmbed``), value for value."""
    positions = ids.float()
    bounds = [0]
    for size in axes_dim:
        bounds.append(bounds[-1] + size)
    angles = torch.cat([positions[:, a:a + 1] * freqs[start:end]
                        for a, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))], dim=1)
    return angles.cos().float(), angles.sin().float()


def rms_norm_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      eps: Optional[float] = None, prefix: Optional[torch.Tensor] = None,
                      prefix_weight: Optional[torch.Tensor] = None, round_before_weight: bool = False) -> torch.Tensor:
    """What a FLUX.1/FLUX.2 (or Qwen-Image) attention does to its queries or keys between the projection and the
    attention: each head vector of ``x [B, S, H, D]`` through ``torch.nn.RMSNorm(D)`` (``weight``, ``eps``;
    computed in fp32 or wider and rounded to x's dtype), with ``prefix [B, S0, H, D]`` (the text stream, normalised
    with ``prefix_weight``) joined before it on the sequence, then diffusers' ``apply_rotary_emb`` (``use_real``,
    pairs of adjacent features ``(x[2i], x[2i+1])`` rotated by ``cos/sin [S0 + S, D]``: ``out = x·cos + rot(x)·sin``
    with ``rot(x)[2i] = -x[2i+1]``, ``rot(x)[2i+1] = x[2i]``), computed in fp32 or wider and rounded to x's dtype.
    Tables ``[S0 + S, D/2]`` hold one value per pair (the real and imaginary parts of Qwen-Image's complex
    frequencies: the same rotation as its complex product). ``round_before_weight``: the norm of diffusers' own
    ``RMSNorm`` class instead (Qwen-Image), which rounds the normalised vector to x's dtype before the weight
    multiplies it. Returns ``[B, S0 + S, H, D]``."""
    dim = x.shape[-1]
    wide = torch.promote_types(x.dtype, torch.float32)

    def norm(t, w):
        if not round_before_weight or w is None:
            return torch.nn.functional.rms_norm(t, (dim,), w, eps)
        upcast = t.to(wide)
        step = eps if eps is not None else torch.finfo(wide).eps  # torch.nn.RMSNorm's default
        normed = (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + step)).to(t.dtype)
        return (normed.to(wide) * w.to(wide)).to(t.dtype)

    joint = norm(x, weight) if prefix is None else torch.cat([norm(prefix, prefix_weight), norm(x, weight)], dim=1)
    pairs = joint.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = _rope_tables(cos, sin, dim, wide)
    return (joint.to(wide) * cos + rotated.to(wide) * sin).to(x.dtype)


def rms_norm_rope_bwd_ref(dy: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          weight: Optional[torch.Tensor] = None, eps: Optional[float] = None,
                          prefix: Optional[torch.Tensor] = None, prefix_weight: Optional[torch.Tensor] = None):
    """Explicit gradients of ``rms_norm_rope_ref`` for the output gradient ``dy [B, S0 + S, H, D]``:
    ``(dx, dweight, dprefix, dprefix_weight)`` (None for what is not given), computed in fp32 or wider. The
    forward's roundings pass the gradient unchanged (as autograd through casts), so ``round_before_weight`` does
    not enter. The backward kernel implements these formulas: the rotation's transpose
    ``dn[2i] = dy[2i]·cos[2i] + dy[2i+1]·sin[2i+1]``, ``dn[2i+1] = dy[2i+1]·cos[2i+1] - dy[2i]·sin[2i]``; then with
    ``n = x·r·w``, ``r = rsqrt(mean(x²) + eps)``: ``dx = r·w·dn - x·r³·sum(x·w·dn) / D``, ``dw = sum(dn·x·r)`` over
    every token and head."""
    dim = x.shape[-1]
    wide = torch.promote_types(x.dtype, torch.float32)
    step = eps if eps is not None else torch.finfo(wide).eps
    cos, sin = _rope_tables(cos, sin, dim, wide)
    dy = dy.to(wide)
    scaled = (dy * sin).unflatten(-1, (-1, 2))
    dnormed = dy * cos + torch.stack([scaled[..., 1], -scaled[..., 0]], dim=-1).flatten(-2)

    def segment(t, w, rows):
        t = t.to(wide)
        dn = dnormed[:, rows]
        rstd = torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + step)
        g = dn if w is None else dn * w.to(wide)
        dt = rstd * g - t * rstd.pow(3) * (t * g).sum(-1, keepdim=True) / dim
        dw = None if w is None else (dn * t * rstd).sum(dim=(0, 1, 2)).to(w.dtype)
        return dt, dw

    n_prefix = 0 if prefix is None else prefix.shape[1]
    dx, dweight = segment(x, weight, slice(n_prefix, None))
    dprefix = dprefix_weight = None
    if prefix is not None:
        dprefix, dprefix_weight = segment(prefix, prefix_weight, slice(0, n_prefix))
        dprefix = dprefix.to(prefix.dtype)
    return dx.to(x.dtype), dweight, dprefix, dprefix_weight
