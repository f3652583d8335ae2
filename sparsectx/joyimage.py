"""JoyImage-Edit-Plus (``JoyImageEditPlusTransformer3DModel``) on a compacted patch sequence: the drop-in's pieces
for it.

The transformer takes each sample's patches as rows of ``hidden_states [B, N, C, pt, ph, pw]``: the target's first,
then each reference image's, padded to one length over the batch, with ``shape_list[b]`` the ``(t, h, w)`` grid of
each component (target first). Inside its forward it builds each component's RoPE table
(``_get_rotary_pos_embed_for_range``: the grid ``[t0, t0 + t) x [0, h) x [0, w)`` in row-major order, ``t0`` growing
by each component's ``t``), the key mask of the padding (from ``shape_list`` and ``encoder_hidden_states_mask``),
and runs double-stream blocks whose modulation is one vector per sample and whose norms and MLPs act per token.
So the forward on the kept rows alone equals the full forward with the dropped rows masked as keys in every
attention, once each kept row gets its own RoPE row, which no argument of the forward can say:

- ``compacted_shape_list``: each reference's entry becomes ``(1, 1, kept)``, so the forward's row counts (its
  padding mask, its table lengths) match the compacted rows;
- ``kept_rope_rows``: while the compacted forward runs, the model's ``_get_rotary_pos_embed_for_range`` returns,
  for each component it is asked for, the rows of the component's true table (built by the model's own method at
  the component's true grid) that are kept. The forward asks for each sample's components in order; each request
  is checked against the compacted grid expected at that point (``RuntimeError`` if a diffusers release builds
  them otherwise).

``probe_qk``: what the attention probe reads of the first block's attention (image rows before text rows in its
joint sequence; the text takes no RoPE). Written against diffusers 0.42.1; the tests check the compacted forward
against diffusers' own with the dropped rows masked.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Sequence

import torch

ROPE_METHOD = "_get_rotary_pos_embed_for_range"


def compacted_shape_list(shape_list: list, kept_refs: Sequence[int]) -> list:
    """``shape_list`` for the compacted rows: each sample's target grid as it is, each reference ``(1, 1, kept)``."""
    return [[tuple(shapes[0]), *[(1, 1, int(k)) for k in kept_refs]] for shapes in shape_list]


def _component_rows(shapes: Sequence[tuple], positions_host: torch.Tensor) -> list:
    """For each component (target, references) of one sample's true ``shapes``: its kept rows, numbered within the
    component (``positions_host``: the kept rows of the sample's whole patch sequence, sorted)."""
    rows, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        inside = positions_host[(positions_host >= offset) & (positions_host < offset + n)]
        rows.append(inside - offset)
        offset += n
    return rows


@contextlib.contextmanager
def kept_rope_rows(transformer: torch.nn.Module, true_shapes: Sequence[tuple], positions_host: torch.Tensor,
                   kept_refs: Sequence[int]):
    """Inside the block, ``transformer``'s RoPE method (``ROPE_METHOD``) serves the compacted forward (module
    docstring): ``true_shapes`` the ``(t, h, w)`` of each component as in ``shape_list`` (every sample's),
    ``positions_host`` the kept rows of the patch sequence, ``kept_refs`` the kept rows of each reference."""
    true_shapes = [tuple(int(v) for v in shape) for shape in true_shapes]
    expected = [true_shapes[0], *[(1, 1, int(k)) for k in kept_refs]]
    rows = _component_rows(true_shapes, positions_host)
    starts = [0, *itertools.accumulate(shape[0] for shape in true_shapes)]
    own = functools.partial(getattr(type(transformer), ROPE_METHOD), transformer)
    tables: dict = {}
    calls = [0]

    def kept_rows(start, stop) -> tuple:
        j = calls[0] % len(expected)
        calls[0] += 1
        asked = tuple(int(b) - int(a) for a, b in zip(start, stop))
        if asked != expected[j]:
            raise RuntimeError(f"{type(transformer).__name__}'s forward asked for the RoPE of a {asked} grid where "
                               f"sparsectx's compacted forward expects component {j}'s {expected[j]}: this diffusers "
                               "release builds the components' tables otherwise than 0.42.1 (sparsectx's written "
                               "against); run with every token kept or disable sparsectx")
        if j not in tables:
            t, h, w = true_shapes[j]
            cos, sin = own((starts[j], 0, 0), (starts[j] + t, h, w))
            index = rows[j].to(cos.device)
            tables[j] = (cos.index_select(0, index), sin.index_select(0, index))
        return tables[j]

    had = ROPE_METHOD in transformer.__dict__
    previous = transformer.__dict__.get(ROPE_METHOD)
    setattr(transformer, ROPE_METHOD, kept_rows)
    try:
        yield
    finally:
        if had:
            setattr(transformer, ROPE_METHOD, previous)
        else:
            transformer.__dict__.pop(ROPE_METHOD, None)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``_apply_rotary_emb_batched`` on one tensor ``[B, n, H, D]`` with tables ``[B, n, D]`` (pairs
    ``(2i, 2i + 1)`` rotated, in float32, back to ``x``'s dtype)."""
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    half = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos.unsqueeze(2) + half * sin.unsqueeze(2)).type_as(x)


def probe_qk(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb,
             target_rows, ref_rows) -> tuple:
    """``(text queries, target queries, reference keys)``, each ``[B, n, H, D]``, as diffusers'
    ``JoyImageEditPlusAttnProcessor`` computes them (fused QKV projection, per-head RMS norm, RoPE on the image rows
    only), for the image rows ``target_rows`` (queries) and ``ref_rows`` (keys)."""
    def part(x, linear, index, norm):
        return norm(linear(x).chunk(3, dim=-1)[index].unflatten(-1, (attn.heads, -1)))

    text = part(encoder_hidden_states, attn.txt_attn_qkv, 0, attn.txt_attn_q_norm)
    target = part(hidden_states[:, target_rows], attn.img_attn_qkv, 0, attn.img_attn_q_norm)
    refs = part(hidden_states[:, ref_rows], attn.img_attn_qkv, 1, attn.img_attn_k_norm)
    if image_rotary_emb is not None:
        cos, sin = (t.to(hidden_states.device) for t in image_rotary_emb)
        target = _rotated(target, cos[:, target_rows], sin[:, target_rows])
        refs = _rotated(refs, cos[:, ref_rows], sin[:, ref_rows])
    return text, target, refs
