"""GLM-Image (``GlmImageTransformer2DModel``) with a compacted reference KV cache: the drop-in's pieces for it.

GLM-Image conditions on reference images through a KV cache (``GlmImageKVCache``, one ``GlmImageLayerKVCache`` per
block). Before the denoising loop its pipeline runs one forward per reference image with the caches in ``"write"``
mode: the image's latents ``[1, C, H, W]`` alone (no text: ``encoder_hidden_states`` of 0 tokens), its AR prior
tokens ``prior_token_id`` one per patch, timestep 0; every block stores its keys and values (after the QK norms and
RoPE) for the current sample, appended to the sample's earlier images. The denoising steps run in ``"read"`` mode:
every block's text and target queries attend to the cached keys of their sample, then to their own. So a reference
token is a row of its image's write forward and a cached key of every block; the write forward on the kept rows
alone stores exactly the keys and values the full write forward would store for those rows had the dropped rows
been masked as keys (the blocks act per token but in attention, the modulation is one vector per image), and the
denoising steps then attend to the kept keys only: the dropped tokens leave the write forward and every step.

``compacted``: while the forward runs, the image projector's output keeps the kept rows only and the output
projection's rows are written back at their positions (zeros elsewhere: the pipeline discards a write forward's
output), so the forward's final reshape to the image still holds; its RoPE table (``image_rotary_emb``, an argument
of the forward) and its prior tokens are passed with the kept rows (``kept_arguments``). diffusers' forward otherwise
runs as it is. ``WrittenImages`` tells which reference image of which sample a write forward stores (budgets may
differ per image and per request). Written against diffusers 0.42.1 (0.39-0.41 ship the same model); the tests
check the compacted cache and steps against diffusers' own with the dropped rows masked.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import NamedTuple, Optional

import torch

WRITE, READ = "write", "read"  # GlmImageLayerKVCache.mode of a forward that stores its keys and values, that reads


def cache_mode(kv_caches) -> Optional[str]:
    """What a forward does with its ``kv_caches``: ``"write"`` where a layer stores (its image is a reference),
    else ``"read"`` where a layer reads, else the layers' mode (``"skip"``) or None (``GlmImageKVCache.set_mode``
    sets every layer's; a forward whose layers differ is run by diffusers as they are)."""
    if kv_caches is None:
        return None
    modes = {cache.mode for cache in kv_caches.caches}
    for mode in (WRITE, READ):
        if mode in modes:
            return mode
    return modes.pop() if len(modes) == 1 else None


def grid(latents: torch.Tensor, patch_size: int) -> tuple:
    """``(h, w)`` of a ``[B, C, H, W]`` latent in patches (the image projector drops a partial patch)."""
    return latents.shape[-2] // patch_size, latents.shape[-1] // patch_size


def patch_rows(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, h * w, C * p * p]``: the patches of ``[B, C, H, W]`` latents in the image projector's order (row-major
    over the grid, each patch's features channel-major), the rows the selectors read."""
    b, c = latents.shape[:2]
    h, w = grid(latents, patch_size)
    x = latents[..., :h * patch_size, :w * patch_size].reshape(b, c, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * patch_size * patch_size)


def kept_arguments(model: torch.nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                   prior_token_id: torch.Tensor, prior_token_drop: torch.Tensor,
                   image_rotary_emb=None) -> dict:
    """The forward's per-row arguments for the kept rows ``positions`` (long, sorted): the RoPE table's rows (the
    model's own table for the latents' grid, or the one given) and the prior tokens' (their last dim the rows)."""
    if image_rotary_emb is None:
        image_rotary_emb = model.rope(hidden_states)
    cos, sin = image_rotary_emb
    rows = positions.to(cos.device)
    return dict(image_rotary_emb=(cos.index_select(0, rows), sin.index_select(0, rows)),
                prior_token_id=prior_token_id.index_select(-1, positions.to(prior_token_id.device)),
                prior_token_drop=prior_token_drop.index_select(-1, positions.to(prior_token_drop.device)))


@contextlib.contextmanager
def compacted(model: torch.nn.Module, positions: torch.Tensor, n_rows: int, kv_caches=None):
    """While the block runs, the model's image projector returns its kept rows ``positions`` of ``n_rows`` and its
    output projection's rows go back to their positions of ``n_rows`` (zeros elsewhere). With no row kept, the
    forward runs on the first row and ``kv_caches`` store none of it (diffusers' RoPE can not take an empty
    sequence, and the sample's slot must still be made, of the dtype the model's keys have), the output all zeros."""
    stores_none = not positions.numel()
    if stores_none:
        positions = positions.new_zeros(1)

    def kept(module, args, output):
        return output.index_select(1, positions.to(output.device))

    def back(module, args, output):
        full = output.new_zeros((output.shape[0], n_rows, *output.shape[2:]))
        return full if stores_none else full.index_copy_(1, positions.to(output.device), output)

    handles = [model.image_projector.register_forward_hook(kept), model.proj_out.register_forward_hook(back)]
    caches = kv_caches.caches if stores_none else []
    for cache in caches:  # (an instance attribute over the class's method, removed below)
        cache.store = functools.partial(_store_no_row, type(cache).store.__get__(cache))
    try:
        yield positions
    finally:
        for handle in handles:
            handle.remove()
        for cache in caches:
            del cache.store


def _store_no_row(store, k: torch.Tensor, v: torch.Tensor) -> None:
    store(k[:, :0], v[:, :0])


class Written(NamedTuple):
    """Where a write forward's image lies in its request's references: the cache's sample slot it writes, the
    image's place among the slot's images and its first row among the slot's image rows (before any was dropped);
    ``image`` and ``row`` None when not known (``WrittenImages``)."""

    slot: int
    image: Optional[int]
    row: Optional[int]


class WrittenImages:
    """Which reference image of which sample slot each write forward stores: per ``GlmImageKVCache``, the images and
    rows written so far for each slot and the cache tensor that write left (a cache cleared, or written by a forward
    not counted here, since is not counted on)."""

    def __init__(self):
        self._written = weakref.WeakKeyDictionary()  # kv_caches -> {slot: (images, rows, ref of its k cache)}

    def index(self, kv_caches) -> Written:
        """``Written`` of the write forward about to run on ``kv_caches``."""
        first = kv_caches.caches[0]
        slot = first.current_sample_idx
        if len(first.k_caches) <= slot:  # nothing stored for the slot yet
            return Written(slot, 0, 0)
        return Written(slot, *(self.written(kv_caches, slot) or (None, None)))

    def written(self, kv_caches, slot: int) -> Optional[tuple]:
        """``(images, rows)`` the counted write forwards stored in ``kv_caches``' sample ``slot``, or None when not
        known (nothing counted, or the slot's cache tensor is not the one the last counted write left)."""
        first = kv_caches.caches[0]
        images, rows, stored = self._written.get(kv_caches, {}).get(slot, (None, None, None))
        if stored is None or len(first.k_caches) <= slot or stored() is not first.k_caches[slot]:
            return None
        return images, rows

    def record(self, kv_caches, written: Written, n_rows: int) -> None:
        """After a write forward of an image of ``n_rows`` rows: the slot's images and rows so far, and the cache
        tensor it left."""
        first = kv_caches.caches[0]
        if written.image is None or len(first.k_caches) <= written.slot:
            return
        self._written.setdefault(kv_caches, {})[written.slot] = (
            written.image + 1, written.row + n_rows, weakref.ref(first.k_caches[written.slot]))


def image_signal(name: str, value, written: Written, n_rows: int):
    """A per-token signal (``[B or 1, N]``, e.g. ``user_mask``) for the write forward of one image: given over the
    request's every reference row (its last dim the slot's rows so far and more), the image's columns; given per
    request (a first dim above 1), the slot's row. A value of the image's own width is taken as it is."""
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return value
    if value.shape[0] > 1:
        if written.slot >= value.shape[0]:
            raise ValueError(f"signals[{name!r}] has {value.shape[0]} rows (one per request), but this KV-cache write "
                             f"forward stores request {written.slot + 1}'s references")
        value = value[written.slot:written.slot + 1]
    if value.shape[1] == n_rows:
        return value
    if written.row is None or value.shape[1] < written.row + n_rows:
        raise ValueError(f"signals[{name!r}] has {value.shape[1]} columns: give one per row of the image (its "
                         f"{n_rows} rows) or one per reference row of the request, its images in order (this image's "
                         f"rows start at {written.row if written.row is not None else 'a row not known'})")
    return value[:, written.row:written.row + n_rows]


def per_slot_caches(kv_caches, batch: int) -> Optional[list]:
    """A read step whose cache slots (one per request) hold different numbers of rows: diffusers' read concatenates
    the slots into one batch and fails there. ``[(rows, caches)]``: the batch rows reading each slot (diffusers' rule:
    ``batch // slots`` consecutive samples each) and a ``GlmImageKVCache`` holding that slot alone, one forward each.
    None where one forward reads them (one slot, slots of one length, a batch the slots do not divide: diffusers says
    why) and for a forward that does not read."""
    if cache_mode(kv_caches) != "read":
        return None
    slots = len(kv_caches.caches[0].k_caches)
    if slots <= 1 or batch % slots or len({k.shape[1] for k in kv_caches.caches[0].k_caches}) == 1:
        return None
    repeat, parts = batch // slots, []
    for slot in range(slots):
        alone = type(kv_caches)(kv_caches.num_layers)
        for layer, cache in zip(alone.caches, kv_caches.caches):
            layer.k_caches, layer.v_caches, layer.mode = [cache.k_caches[slot]], [cache.v_caches[slot]], cache.mode
        parts.append((list(range(slot * repeat, (slot + 1) * repeat)), alone))
    return parts
