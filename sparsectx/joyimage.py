"""JoyImage-Edit-Plus (``JoyImageEditPlusTransformer3DModel``) and JoyImage-Edit (``JoyImageEditTransformer3DModel``)
on a compacted patch sequence: the drop-in's pieces for them.

JoyImage-Edit-Plus takes each sample's patches as rows of ``hidden_states [B, N, C, pt, ph, pw]``: the target's
first, then each reference image's, padded to one length over the batch, with ``shape_list[b]`` the ``(t, h, w)``
grid of each component (target first). Inside its forward it builds each component's RoPE table
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

JoyImage-Edit takes latents ``[B, items, C, T, H, W]`` (the reference first, the target last, one size), moves the
target first, patchifies the items as frames of one video grid and builds one RoPE table over that grid: the
dropped rows can only leave after the patch embedding, inside the forward, so ``compacted_edit_forward`` is its
forward with the kept rows (and their RoPE rows) taken there; ``patch_rows`` gives the selectors those rows.

``probe_qk``: what the attention probe reads of the first block's attention (image rows before text rows in the
joint sequence). Written against diffusers 0.42.1; the tests check the compacted forwards against diffusers' own
with the dropped rows masked.
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
    expected = compacted_shape_list([true_shapes], kept_refs)[0]
    rows = _component_rows(true_shapes, positions_host)
    starts = [0, *itertools.accumulate(shape[0] for shape in true_shapes)]
    own = functools.partial(getattr(type(transformer), ROPE_METHOD), transformer)
    tables: dict = {}
    calls = [0]

    # left out of a traced forward (torch.compile of the whole transformer): traced, its check of the grid asked
    # against the kept counts made dynamo guard on them, a new graph per kept count until the recompile limit
    @torch.compiler.disable
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
    """diffusers' JoyImage rotation (``_apply_rotary_emb``, ``_apply_rotary_emb_batched``) of one tensor
    ``[B, n, H, D]`` with tables ``[B or 1, n, D]``: pairs ``(2i, 2i + 1)`` rotated in float32, back to ``x``'s
    dtype."""
    real, imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    half = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos.unsqueeze(2) + half * sin.unsqueeze(2)).type_as(x)


def _table_rows(freqs, rows, device) -> tuple:
    """``(cos, sin)`` rows ``rows`` of a RoPE table, ``[B, n, D]`` from a batched ``[B, S, D]`` (JoyImage-Edit-Plus)
    or ``[1, n, D]`` from one ``[S, D]`` for the batch (JoyImage-Edit)."""
    cos, sin = (t.to(device) for t in freqs)
    if cos.ndim == 2:
        return cos[rows][None], sin[rows][None]
    return cos[:, rows], sin[:, rows]


def probe_qk(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_freqs, target_rows,
             ref_rows, text_freqs=None) -> tuple:
    """``(text queries, target queries, reference keys)``, each ``[B, n, H, D]``, as diffusers' JoyImage processors
    compute them (fused QKV projection, per-head RMS norm, RoPE: the image rows', and the text's where
    ``text_freqs`` is given), for the image rows ``target_rows`` (queries) and ``ref_rows`` (keys)."""
    def part(x, linear, index, norm):
        return norm(linear(x).chunk(3, dim=-1)[index].unflatten(-1, (attn.heads, -1)))

    device = hidden_states.device
    text = part(encoder_hidden_states, attn.txt_attn_qkv, 0, attn.txt_attn_q_norm)
    target = part(hidden_states[:, target_rows], attn.img_attn_qkv, 0, attn.img_attn_q_norm)
    refs = part(hidden_states[:, ref_rows], attn.img_attn_qkv, 1, attn.img_attn_k_norm)
    if image_freqs is not None:
        target = _rotated(target, *_table_rows(image_freqs, target_rows, device))
        refs = _rotated(refs, *_table_rows(image_freqs, ref_rows, device))
    if text_freqs is not None:
        text = _rotated(text, *(t.to(device)[None] for t in text_freqs))
    return text, target, refs


# ----------------------------------------------------------------------------------------------------------------
# JoyImage-Edit (JoyImageEditTransformer3DModel): one reference, as a frame of the target's video grid
# ----------------------------------------------------------------------------------------------------------------
def _target_first(hidden_states: torch.Tensor) -> torch.Tensor:
    """The latents' items ``[B, items, C, T, H, W]`` in the order its forward patchifies them: the target (the last
    item) first, then the references."""
    return torch.cat([hidden_states[:, -1:], hidden_states[:, :-1]], dim=1)


def patch_rows(hidden_states: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``[B, S, C * ph * pw]``: JoyImage-Edit's latents ``[B, items, C, T, H, W]`` (time patch 1) as the rows of the
    patch sequence its forward makes (target first, each frame's patches row-major), one feature vector per patch
    (what the selectors score)."""
    _, ph, pw = patch_size
    x = _target_first(hidden_states)
    b, n, c, t, h, w = x.shape
    x = x.reshape(b, n, c, t, h // ph, ph, w // pw, pw).permute(0, 1, 3, 4, 6, 2, 5, 7)
    return x.reshape(b, n * t * (h // ph) * (w // pw), c * ph * pw)


def compacted_edit_forward(model: torch.nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                           timestep: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                           return_dict: bool = True):
    """``JoyImageEditTransformer3DModel.forward`` (diffusers 0.42.1) on the kept rows ``positions`` (long, sorted,
    the target's first) of its patch sequence: the latents are patchified whole (the patch embedding, a
    convolution, sees each patch alone), then only the kept rows and their RoPE rows go through the blocks and the
    output head. The output has the input's shape, the target's rows written and the references' zeros (the pipeline
    reads the target)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    num_items = hidden_states.shape[1]
    if hidden_states.ndim != 6 or num_items < 2 or model.patch_size[0] != 1:
        raise ValueError("the compacted forward takes latents [B, items >= 2, C, T, H, W] and a time patch of 1")
    b, n, c, t, h, w = hidden_states.shape
    x = _target_first(hidden_states).permute(0, 2, 1, 3, 4, 5).reshape(b, c, n * t, h, w)
    tt, th, tw = n * t // model.patch_size[0], h // model.patch_size[1], w // model.patch_size[2]
    img = model.img_in(x).flatten(2).transpose(1, 2).index_select(1, positions)

    _, vec, txt = model.condition_embedder(timestep, encoder_hidden_states)
    if vec.shape[-1] > model.hidden_size:
        vec = vec.unflatten(1, (6, -1))
    vis_freqs, txt_freqs = model.get_rotary_pos_embed(
        vis_rope_size=[tt, th, tw], txt_rope_size=txt.shape[1] if model.rope_type == "mrope" else None)
    rows = positions.to(vis_freqs[0].device)
    vis_freqs = (vis_freqs[0].index_select(0, rows), vis_freqs[1].index_select(0, rows))

    for block in model.double_blocks:  # (each block's rows: the kept ones)
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            img, txt = model._gradient_checkpointing_func(block, img, txt, vec, (vis_freqs, txt_freqs))
        else:
            img, txt = block(hidden_states=img, encoder_hidden_states=txt, temb=vec,
                             image_rotary_emb=(vis_freqs, txt_freqs))

    img = model.proj_out(model.norm_out(img))
    n_target = tt * th * tw // n
    full = img.new_zeros((b, tt * th * tw, img.shape[-1]))
    full[:, :n_target] = img[:, :n_target]  # (the target's rows: kept, and first)
    out = model.unpatchify(full, tt, th, tw)
    out = out.reshape(b, out.shape[1], n, -1, h, w).permute(0, 2, 1, 3, 4, 5)  # (b, items, c, t, h, w)
    out = torch.cat([out[:, 1:], out[:, :1]], dim=1)  # the target back last
    if not return_dict:
        return (out,)
    return Transformer2DModelOutput(sample=out)
