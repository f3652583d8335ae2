"""Z-Image Omni (diffusers' ``ZImageTransformer2DModel`` called in omni mode) with reference tokens dropped.

In omni mode the forward takes, per sample, a list of images ``x[b] = [reference, ..., target]`` (latents
``[C, F, H, W]``), one caption segment per image, and optionally one SigLIP feature map per reference. It patchifies
each image (``_patchify_image``, rows in ``(F, H, W)`` order), pads each image's rows to a multiple of
``SEQ_MULTI_OF`` with a pad token, runs its noise refiner over the images' rows, then its main layers over
``[caption, images, siglip]``. Every row carries its own RoPE position ids and its own modulation (clean for the
references, noisy for the target), and each sample is its own sequence (padded to the batch's longest, masked).

So the forward on a sample's kept rows equals the full forward with its dropped rows masked as keys, in the noise
refiner and in every main layer. This module removes the dropped rows right after the model's own
``patchify_and_embed_omni`` (with their position ids, pad flags and noise flags) and reads the target's rows out of
the shorter sequence for the model's own ``unpatchify``: diffusers' forward runs otherwise unchanged. The pad rows
of each image are kept (the model attends to them like any row), and so are the SigLIP rows (their positions do not
depend on the latent rows).

The spec of the layout (``patch_rows``, ``image_grids``) is the model's ``_patchify_image``: one row per
``pF x pH x pW`` patch, features ``pF * pH * pW * C``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Optional, Sequence

import torch

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF: each image's rows are padded to a multiple of it


def is_omni(x) -> bool:
    """Whether the forward's ``x`` is omni mode's nested list (a list of images per sample)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple))


def image_grids(x, patch_size: int, f_patch_size: int) -> list:
    """Each sample's images as token grids ``(F // pF, H // pH, W // pW)``, None for a missing image (diffusers
    gives it pad rows only). ``ValueError`` naming ``x`` for an image that is not ``[C, F, H, W]`` or not divisible
    by the patch."""
    grids = []
    for b, images in enumerate(x):
        sample = []
        for j, image in enumerate(images):
            if image is None:
                sample.append(None)
                continue
            if not isinstance(image, torch.Tensor) or image.ndim != 4:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"x[{b}][{j}] must be an image's latents [C, F, H, W], got {got}")
            _, f, h, w = image.shape
            if f % f_patch_size or h % patch_size or w % patch_size:
                raise ValueError(f"x[{b}][{j}] of shape {tuple(image.shape)} is not divisible by the patch "
                                 f"(f_patch_size={f_patch_size}, patch_size={patch_size})")
            sample.append((f // f_patch_size, h // patch_size, w // patch_size))
        grids.append(sample)
    return grids


def padded_length(rows: int) -> int:
    """An image's rows with the model's pad rows (up to a multiple of ``SEQ_MULTI_OF``)."""
    return rows + (-rows) % SEQ_MULTI_OF


def patch_rows(x, patch_size: int, f_patch_size: int) -> torch.Tensor:
    """``[B, S, pF * pH * pW * C]``: each sample's images patchified in the model's row order, one after another,
    without the model's pad rows (the rows the layout's positions index). The samples' images must have the same
    grids (the layout checks it first)."""
    samples = []
    for images in x:
        rows = []
        for image in images:
            c, f, h, w = image.shape
            patches = image.reshape(c, f // f_patch_size, f_patch_size, h // patch_size, patch_size,
                                    w // patch_size, patch_size)
            rows.append(patches.permute(1, 3, 5, 2, 4, 6, 0).reshape(-1, f_patch_size * patch_size ** 2 * c))
        samples.append(torch.cat(rows))
    return torch.stack(samples)


def _image_starts(grids: Sequence[tuple]) -> tuple:
    """``(lengths, starts, padded_starts)`` of a sample's images: rows per image, and where each image starts
    without and with the model's pad rows (one entry more than images)."""
    lengths = [math.prod(grid) for grid in grids]
    starts = torch.tensor([0, *itertools.accumulate(lengths)])
    padded_starts = torch.tensor([0, *itertools.accumulate(map(padded_length, lengths))])
    return lengths, starts, padded_starts


def padded_positions(grids: Sequence[tuple], positions: torch.Tensor) -> torch.Tensor:
    """long (host): the row of each layout position (host, over the unpadded rows, ``patch_rows``) in the sample's
    padded image sequence (the model's ``x`` after ``patchify_and_embed_omni``)."""
    _, starts, padded_starts = _image_starts(grids)
    image = torch.searchsorted(starts[1:], positions, right=True)  # the image of each position
    return positions + (padded_starts[image] - starts[image])


def kept_x_rows(grids: Sequence[tuple], kept: torch.Tensor) -> torch.Tensor:
    """long ``[R]`` (host): the rows of one sample's padded image sequence that stay: those of the kept layout
    positions ``kept`` (host, ascending) and every pad row, in sequence order."""
    lengths, _, padded_starts = _image_starts(grids)
    pads = [torch.arange(int(padded_starts[j]) + n, int(padded_starts[j + 1])) for j, n in enumerate(lengths)]
    return torch.cat([padded_positions(grids, kept), *pads]).sort().values


@contextlib.contextmanager
def compacted(model: torch.nn.Module, kept_rows: Sequence[tuple]):
    """While active, the model's omni forward runs each sample ``b`` on the rows ``kept_rows[b]`` (``(host,
    device)`` copies of ``kept_x_rows``) of its padded image sequence: ``patchify_and_embed_omni`` returns those rows
    only (with their position ids, pad and noise flags), and ``unpatchify`` reads the target, the last image, from
    the end of the shorter span of image rows. (Instance attributes shadowing
    the class's methods, removed on exit.)"""
    cls = type(model)
    spans = []  # per sample: (first row of the target in the compacted image rows, rows of the compacted images)

    def patchify_and_embed_omni(all_x, all_cap_feats, all_siglip_feats, patch_size, f_patch_size, noise_mask):
        out = list(cls.patchify_and_embed_omni(model, all_x, all_cap_feats, all_siglip_feats, patch_size,
                                               f_patch_size, noise_mask))
        x_out, x_size, x_pos, x_pad, x_noise = (out[i] for i in (0, 3, 4, 7, 11))
        spans.clear()
        for b, (rows, index) in enumerate(kept_rows):
            index = index.to(x_out[b].device)
            x_out[b] = x_out[b].index_select(0, index)
            x_pos[b] = x_pos[b].index_select(0, index)
            x_pad[b] = x_pad[b].index_select(0, index)
            flags = x_noise[b]
            x_noise[b] = [flags[r] for r in rows.tolist()]
            f, h, w = x_size[b][-1]
            target_rows = padded_length((f // f_patch_size) * (h // patch_size) * (w // patch_size))
            spans.append((rows.numel() - target_rows, rows.numel()))
        return tuple(out)

    def unpatchify(x, size, patch_size, f_patch_size, x_pos_offsets=None):
        if x_pos_offsets is None:
            return cls.unpatchify(model, x, size, patch_size, f_patch_size, x_pos_offsets)
        targets = []
        for b, rows in enumerate(x):
            target_start, n_rows = spans[b]
            first = x_pos_offsets[b][0]  # (the caption's rows: the images follow them)
            target = rows[first + target_start:first + n_rows]
            targets += cls.unpatchify(model, [target], [[size[b][-1]]], patch_size, f_patch_size,
                                      [(0, target.shape[0])])
        return targets

    model.patchify_and_embed_omni = patchify_and_embed_omni
    model.unpatchify = unpatchify
    try:
        yield
    finally:
        del model.patchify_and_embed_omni
        del model.unpatchify


def rotated(x: torch.Tensor, freqs_cis: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [B, n, H, D]`` through Z-Image's RoPE with the rows' complex frequencies ``freqs_cis [B, n, D / 2]`` (as
    its ``ZSingleStreamAttnProcessor``: in fp32, autocast off, back in ``x``'s dtype); ``x`` itself without them."""
    if freqs_cis is None:
        return x
    with torch.amp.autocast("cuda", enabled=False):
        complex_x = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(complex_x * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def probe_qk(attn, hidden_states: torch.Tensor, freqs_cis: Optional[torch.Tensor], text: torch.Tensor,
             target: torch.Tensor, refs: torch.Tensor) -> tuple:
    """``(text_queries, target_queries, ref_keys)``, each ``[B, n, H, D]``, of Z-Image's attention (projection,
    per-head norm and RoPE, as ``ZSingleStreamAttnProcessor`` computes them) computed for the rows ``text`` /
    ``target`` / ``refs`` only (long ``[B, n]`` per sample: every row op commutes with the gather)."""
    def project(index, linear, norm):
        rows = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        out = linear(rows).unflatten(-1, (attn.heads, -1))
        if norm is not None:
            out = norm(out)
        freqs = None if freqs_cis is None else freqs_cis.gather(1, index[..., None].expand(-1, -1,
                                                                                          freqs_cis.shape[-1]))
        return rotated(out, freqs)

    return (project(text, attn.to_q, attn.norm_q), project(target, attn.to_q, attn.norm_q),
            project(refs, attn.to_k, attn.norm_k))
