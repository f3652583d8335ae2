"""Which reference tokens to keep: selectors (scores per token) and budgets (how many to keep per image).

A *selector* is called as ``selector(reference_latents [B, N, C], context) -> scores float [B, N]`` (higher = keep)
or ``-> keep mask bool [B, N]``. The ``N`` reference tokens are the concatenation of ``context.num_references``
images of ``context.ref_lengths`` tokens each, in sequence order. A *budget* turns scores into per-image counts and a
keep mask: every reference image keeps its own share (top-k within the image, ties to the lower index, the same
rule as ``sparsectx.compact_tokens``). Budgets may differ per image and per request.

Built-in selectors (``available_selectors()``):

- ``random``: i.i.d. uniform scores from ``context.generator`` (the training-time baseline; deterministic under a
  seed, and then the same for every sample of a batch, whatever its position).
- ``uniform``: a strided grid over each image: a low-discrepancy rank order from the image's first token (corner),
  whose top-k holds the power-of-two stride lattices (``uniform_scores``).
- ``edit``: spatially-aligned editing: the edit region (user mask and/or instruction-to-reference attention) plus
  a context ring around it, then an evenly spread remainder.
- ``subject``: subject-driven generation: foreground saliency of the reference latents and/or reference-to-target
  attention (ReCAST-style).
- ``attention``: generic attention mass that probe queries give each reference key.

Signals that selectors read from ``context.extra`` (all optional; a selector that needs one it lacks raises a
``ValueError`` naming it):

- ``"user_mask"`` bool ``[B, N]``: reference tokens the user marked as the edit region.
- ``"ref_keys"`` ``[B, N, H, D]``: reference keys at a probe layer (after norm and RoPE).
- ``"text_queries"`` ``[B, T, H, D]`` with optional ``"text_mask"`` bool ``[B, T]`` (False = padding).
- ``"target_queries"`` ``[B, Q, H, D]``: target (noisy latent) queries at the probe layer.
- ``"queries"`` ``[B, Q, H, D]`` with optional ``"query_mask"`` bool ``[B, Q]``: any probe queries (``attention``).
- ``"attention_probe"``: a callable ``(reference_latents, context) -> dict`` giving any of the tensors above; it is
  called at most once, only when a selector needs a tensor that is not in ``extra`` (so the probe pass costs
  nothing when no attention-based selector runs), and its result is cached in ``extra``.
- ``"ref_shapes"``: list of ``(h, w)`` per reference (row-major token order), the grid when ``reference_ids`` is
  None (e.g. Qwen-Image, which has no explicit ids).

Grid layout: with ``reference_ids [B, N, n_axes]``, the (h, w) axes are ``ID_HW_AXES[n_axes]`` (axes 1, 2 of FLUX.1's
(plane, h, w) and FLUX.2's (t, h, w, l)); with ``extra["ref_shapes"]``, row-major grids; otherwise each image is a
1D token sequence. The drop-in checks its host copy of the ids and, where each reference's ids are a row-major grid
(the pipelines' ids), adds their shapes as ``extra[IDS_GRID_SHAPES]``: the selectors then make the same grid from
those shapes, once per layout, instead of from the device ids (fewer launches; ``edit`` reads nothing back).
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import ops, reference
from ._warn import warn as _warn
from .ops import _device_values, _is_int, _is_numpy_array, _python_number

# ----------------------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------------------
ID_HW_AXES = {2: (0, 1), 3: (1, 2), 4: (1, 2)}  # n_axes of reference_ids -> which axes hold (h, w)
ID_STEP_TOLERANCE = 1e-3  # float ids within this of a whole step from their image's corner count as on it
LOW_DISCREPANCY_BITS = 16  # coordinates and 1D positions below 2**16 get distinct low-discrepancy codes
CONTEXT_WEIGHT = 0.5  # edit: weight of the dilated (ring) signal relative to the edit region itself
SPREAD_WEIGHT = 1e-3  # weight of the uniform order used to break ties (leftover budget goes to an even spread)
MASK_PAD_WEIGHT = 0.5  # select(): a selector's keep mask padded/capped by a budget ranks mask > spread order
DEFAULT_RING = 2  # edit: context ring radius in tokens (2 latent tokens = 32 pixels for FLUX)
DEFAULT_MAX_QUERIES = 1024  # probes subsample at most this many queries (evenly strided) per sample
COVERAGE_TOL = reference.COVERAGE_TOLERANCE  # adaptive budgets: the mass's slack against rounding (float64)


# ----------------------------------------------------------------------------------------------------------------
# selection context and the selector wrapper
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SelectionContext:
    """What a selector may know besides the reference latents.

    ``num_references`` images of ``ref_lengths`` tokens each (sequence order, ``sum == N``); ``reference_ids``
    ``[B, N, n_axes]`` position ids (``[N, n_axes]`` is taken as batch 1) or None: with 2 axes (h, w), with 3 or 4
    (FLUX's) (h, w) on axes 1 and 2; ids with another number of axes give no grid (each image is taken as 1D), and
    float ids must be finite and whole steps from their image's corner (refused otherwise: one host read where the
    grid is read from them); ``target_shape``
    (h, w) of the target in tokens or None; ``generator`` for random selectors; ``sample_generators``: one
    generator per sample, or None (a pipeline call given one generator per image, diffusers' per-image seeds: a
    random selector draws sample b's scores from ``sample_generators[b]``; ``generator`` is then the first
    sample's); ``extra``: free-form signals (see the module docstring; the context keeps a copy of the dict, where
    the probe's tensors are cached).
    """

    num_references: int
    ref_lengths: list
    reference_ids: Optional[torch.Tensor] = None
    target_shape: Optional[tuple] = None
    generator: Optional[torch.Generator] = None
    extra: dict = field(default_factory=dict)
    sample_generators: Optional[list] = None

    def __post_init__(self):
        if isinstance(self.num_references, bool) or not isinstance(self.num_references, int):
            raise TypeError(f"num_references must be a positive int, got {self.num_references!r}")
        if self.num_references < 1:
            raise ValueError(f"num_references must be a positive int, got {self.num_references!r}")
        if not isinstance(self.ref_lengths, (list, tuple)):
            raise TypeError(f"ref_lengths must be a list of num_references={self.num_references} ints, "
                            f"got {self.ref_lengths!r}")
        if len(self.ref_lengths) != self.num_references:
            raise ValueError(f"ref_lengths must be a list of num_references={self.num_references} ints, "
                             f"got {self.ref_lengths!r}")
        for n in self.ref_lengths:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"ref_lengths entries must be positive ints, got {self.ref_lengths!r}")
            if n < 1:
                raise ValueError(f"ref_lengths entries must be positive ints, got {self.ref_lengths!r}")
        self.ref_lengths = list(self.ref_lengths)
        if self.reference_ids is not None:
            if not isinstance(self.reference_ids, torch.Tensor):
                raise TypeError("reference_ids must be a [B, N, n_axes] (or [N, n_axes]) tensor or None, got "
                                f"{type(self.reference_ids).__name__}")
            if self.reference_ids.ndim not in (2, 3):
                raise ValueError("reference_ids must be a [B, N, n_axes] (or [N, n_axes]) tensor or None, got "
                                 f"shape {tuple(self.reference_ids.shape)}")
            if self.reference_ids.dtype == torch.bool or self.reference_ids.is_complex():
                raise TypeError(f"reference_ids must hold integer or float positions, got {self.reference_ids.dtype}")
            if self.reference_ids.ndim == 2:  # diffusers' Flux ids carry no batch axis
                self.reference_ids = self.reference_ids.unsqueeze(0)
            if self.reference_ids.shape[1] != sum(self.ref_lengths):
                raise ValueError(f"reference_ids has {self.reference_ids.shape[1]} tokens but ref_lengths sum "
                                 f"to {sum(self.ref_lengths)}")
        if self.target_shape is not None and (
                not isinstance(self.target_shape, (tuple, list)) or len(self.target_shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in self.target_shape)):
            raise ValueError(f"target_shape must be (h, w) positive ints or None, got {self.target_shape!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")
        self.extra = dict(self.extra)  # the context's own: the probe's tensors are cached there, not in the caller's
        if self.sample_generators is not None and (
                not isinstance(self.sample_generators, (list, tuple))
                or not all(isinstance(g, torch.Generator) for g in self.sample_generators)):
            raise TypeError("sample_generators must be a list of torch.Generator (one per sample) or None")


SelectorFn = Callable[[torch.Tensor, SelectionContext], torch.Tensor]


class Selector:
    """A selector with validated inputs and output: ``selector(reference_latents, context) -> [B, N]`` float scores
    (higher = keep) or bool keep mask. ``returns_scores``: known to return scores (so it needs a budget);
    ``signals``: the names of ``context.extra`` it can read, when known (then others are refused as misspelt);
    ``reads_generator``: whether it may draw from ``context.generator`` / ``sample_generators`` (True unless known
    otherwise: samples seeded differently are then selected each on its own). A function with the attribute
    ``draws_kept_count = True`` (``sparsectx.training.random_drop_selector``'s) returns keep masks whose kept counts
    are its own random draws: a budget, which would cap or pad every mask to one count, is refused with it."""

    def __init__(self, fn: SelectorFn, name: Optional[str] = None, returns_scores: bool = False,
                 signals: Optional[frozenset] = None, reads_generator: bool = True):
        if not callable(fn):
            raise TypeError(f"a selector must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.returns_scores = returns_scores
        self.draws_kept_count = getattr(fn, "draws_kept_count", False) is True
        self.signals = signals
        self.reads_generator = reads_generator  # False: deterministic (samples with other seeds select alike)

    def __call__(self, reference_latents: torch.Tensor, context: SelectionContext, *,
                 nan_check: bool = True) -> torch.Tensor:
        """The selector's checked output. ``nan_check=False`` leaves the NaN check (a host read) to the caller (an
        adaptive budget finds NaN in the host read of the scores' range it makes anyway)."""
        batch, n_tokens = _check_selector_inputs(reference_latents, context)
        out = self.fn(reference_latents, context)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"selector {self.name!r} must return a tensor, got {type(out).__name__}")
        if tuple(out.shape) != (batch, n_tokens):
            raise ValueError(f"selector {self.name!r} must return [B={batch}, N={n_tokens}], "
                             f"got {tuple(out.shape)}")
        if out.dtype != torch.bool and not out.is_floating_point():
            raise ValueError(f"selector {self.name!r} must return float scores or a bool mask, got {out.dtype}")
        if out.is_meta:
            raise ValueError(f"selector {self.name!r} returned a meta tensor: its scores hold no values")
        if out.is_floating_point() and out.dtype not in ops._SORTED_SCORE_DTYPES:
            out = out.float()  # fp8 scores (torch sorts no narrower float), as compact_tokens takes them: exact
        if nan_check and out.is_floating_point() and torch.isnan(out).any():
            raise ValueError(f"selector {self.name!r} returned NaN scores")
        if out.device != reference_latents.device:  # a user callable may score on another device (e.g. the CPU)
            out = out.to(reference_latents.device)
        return out

    def __repr__(self):
        return f"Selector({self.name!r})"


def _check_selector_inputs(reference_latents, context) -> tuple[int, int]:
    if not isinstance(reference_latents, torch.Tensor):
        raise TypeError(f"reference_latents must be a [B, N, C] tensor, got {type(reference_latents).__name__}")
    if reference_latents.ndim != 3:
        raise ValueError(f"reference_latents must be a [B, N, C] tensor, got shape {tuple(reference_latents.shape)}")
    if reference_latents.is_meta:
        raise ValueError("reference_latents is on the meta device: it has no values to select from")
    if not isinstance(context, SelectionContext):
        raise TypeError(f"context must be a SelectionContext, got {type(context).__name__}")
    batch, n_tokens, _ = reference_latents.shape
    if sum(context.ref_lengths) != n_tokens:
        raise ValueError(f"context.ref_lengths {context.ref_lengths} sum to {sum(context.ref_lengths)} but "
                         f"reference_latents has N={n_tokens} tokens")
    ids = context.reference_ids
    if ids is not None and ids.shape[0] not in (1, batch):
        raise ValueError(f"context.reference_ids must have batch 1 or {batch}, got {tuple(ids.shape)}")
    if context.sample_generators is not None and len(context.sample_generators) != batch:
        # (random_scores would fall back to the global RNG: other tokens at every call)
        raise ValueError(f"context.sample_generators has {len(context.sample_generators)} generators for a batch of "
                         f"{batch}: give one per sample, or None")
    return batch, n_tokens


_REGISTRY: dict[str, Selector] = {}

# every context.extra name a built-in selector reads (user signals and probe tensors)
USER_ONLY_SIGNALS = ("user_mask",)  # built-in signals only a user gives (the automatic probe adds the others)
BUILTIN_SIGNALS = frozenset({"user_mask", "text_queries", "text_mask", "target_queries", "queries", "query_mask",
                             "ref_keys", "ref_shapes", "attention_probe"})


def register_selector(name: str, fn: SelectorFn, *, overwrite: bool = False, returns_scores: bool = False,
                      signals: Optional[Sequence[str]] = None, reads_generator: bool = True) -> Selector:
    """Registers ``fn`` under ``name`` (``get_selector(name)`` then returns it). Returns the wrapped Selector.
    ``overwrite=True`` replaces a registered selector, a built-in one too (``enable``'s default ``"random"``
    included): keep ``get_selector(name)`` beforehand to register it back.
    ``returns_scores=True`` says ``fn`` always returns scores: ``enable(budget=None)`` with it is refused at once.
    ``signals``: every ``context.extra`` name ``fn`` reads; ``enable(signals=...)`` then refuses other names.
    ``reads_generator=False`` says ``fn`` draws no random numbers (a batch seeded per image still selects once)."""
    if not isinstance(name, str):
        raise TypeError(f"selector name must be a non-empty string, got {type(name).__name__}")
    if not name or name != name.strip():
        raise ValueError(f"selector name must be a non-empty string without surrounding spaces, got {name!r}")
    for flag, value in (("overwrite", overwrite), ("returns_scores", returns_scores),
                        ("reads_generator", reads_generator)):
        ops._check_flag(flag, value)
    if signals is not None:
        if isinstance(signals, (str, bytes)):
            raise TypeError(f"signals must be a list of names, got the string {signals!r} (write [{signals!r}])")
        if not isinstance(signals, Iterable):
            raise TypeError(f"signals must be a list of names, got {signals!r}")
        signals = tuple(signals)  # (a generator is read once)
        if not all(isinstance(s, str) for s in signals):
            raise TypeError(f"signals must be a list of names, got {signals!r}")
    if not callable(fn):
        raise TypeError(f"a selector must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a selector named {name!r} is already registered (pass overwrite=True to replace it)")
    if isinstance(fn, Selector):  # re-registered: this call's facts join the selector's own
        returns_scores = returns_scores or fn.returns_scores
        signals = fn.signals if signals is None else signals
        reads_generator = reads_generator and fn.reads_generator
        if (name == fn.name and returns_scores == fn.returns_scores and reads_generator == fn.reads_generator
                and (None if signals is None else frozenset(signals)) == fn.signals):
            # registered back as it was (``get_selector(name)`` kept beforehand): the same object, so a built-in
            # stays built-in (its known reads of the signals are keyed by the object)
            _REGISTRY[name] = fn
            return fn
        fn = fn.fn
    selector = Selector(fn, name, returns_scores, None if signals is None else frozenset(signals), reads_generator)
    _REGISTRY[name] = selector
    return selector


def available_selectors() -> list[str]:
    """Names of the registered selectors, sorted."""
    return sorted(_REGISTRY)


def get_selector(name_or_callable: Union[str, SelectorFn, Selector]) -> Selector:
    """A registered selector by name, or a user callable ``(reference_latents, context) -> scores|mask`` wrapped so
    that its output is validated: the selector it was registered as (the latest, if several), with what
    ``register_selector`` said of it, else one that may return either and read any signal and the generator."""
    if isinstance(name_or_callable, Selector):
        return name_or_callable
    if isinstance(name_or_callable, str):
        if name_or_callable not in _REGISTRY:
            raise ValueError(f"unknown selector {name_or_callable!r}; available: {available_selectors()}")
        return _REGISTRY[name_or_callable]
    if callable(name_or_callable):
        registered = [selector for selector in _REGISTRY.values() if selector.fn is name_or_callable]
        return registered[-1] if registered else Selector(name_or_callable)
    raise TypeError(f"selector must be a name or a callable, got {type(name_or_callable).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# layout helpers: image slices and token grids
# ----------------------------------------------------------------------------------------------------------------
def _image_slices(ref_lengths: Sequence[int]) -> list[tuple[int, int]]:
    bounds = [0]
    for n in ref_lengths:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


def _shared_constant(maxsize: Optional[int] = 64, typed: bool = False):
    """Decorator: ``functools.lru_cache`` for functions that make a constant tensor from hashable layout settings
    (lengths, shapes, a device), built as a plain tensor even when first asked for under inference mode (it is
    reused by later calls, which may record autograd). The tensor is shared by every caller: never modify it."""
    def decorate(make):
        @functools.lru_cache(maxsize=maxsize, typed=typed)
        @functools.wraps(make)
        def cached(*args):
            with torch.inference_mode(False):
                return make(*args)
        return cached
    return decorate


def _token_layout(ref_lengths: Sequence[int], device) -> torch.Tensor:
    """long ``[3, N]`` on ``device``: each token's image index, its image's first token and its image's length.
    Built on the host from the lengths (a handful of CPU ops, whatever the number of images) and copied once per
    layout and device (a selection's helpers all read it; the tensor is shared: never modify it)."""
    return _cached_token_layout(tuple(int(n) for n in ref_lengths), torch.device(device))


@_shared_constant(maxsize=64)
def _cached_token_layout(ref_lengths: tuple, device: torch.device) -> torch.Tensor:
    if len(ref_lengths) == 1:
        return _device_values([[0], [0], [ref_lengths[0]]], torch.long, device).expand(3, ref_lengths[0])
    lengths = torch.tensor(ref_lengths, device="cpu")
    image = torch.repeat_interleave(torch.arange(len(ref_lengths), device="cpu"), lengths,
                                    output_size=sum(ref_lengths))
    rows = torch.stack([image, (torch.cumsum(lengths, 0) - lengths)[image], lengths[image]])
    return _device_values(rows, None, device)


def _image_rows(x: torch.Tensor, ref_lengths: Sequence[int], fill=None) -> torch.Tensor:
    """``x [b, N, ...]`` as ``[b, n_refs, longest, ...]``: row i holds image i's tokens in order, then (past the
    image's end) ``fill``, or with ``fill=None`` copies of the image's first token, which leave ``amin`` / ``amax``
    unchanged. A view when every image has the same length; else one gather (its index built on the host, once
    per layout and device)."""
    n_refs, longest = len(ref_lengths), max(ref_lengths)
    if min(ref_lengths) == longest:
        return x.unflatten(1, (n_refs, longest))
    if fill is not None:  # padding slots read one extra token holding `fill`
        x = torch.cat([x, x.new_full((x.shape[0], 1, *x.shape[2:]), fill)], dim=1)
    index = _image_rows_index(tuple(int(n) for n in ref_lengths), fill is not None, x.device)
    return x.index_select(1, index).unflatten(1, (n_refs, longest))


@_shared_constant(maxsize=64)
def _image_rows_index(ref_lengths: tuple, padded: bool, device: torch.device) -> torch.Tensor:
    """``_image_rows``' gather index (long ``[n_refs · longest]``): image i's tokens, then its first token, or with
    ``padded`` the extra token after the N tokens (the tensor is shared: never modify it)."""
    slot = torch.arange(max(ref_lengths), device="cpu")
    lengths = torch.tensor(ref_lengths, device="cpu")[:, None]
    starts = torch.cumsum(lengths, 0) - lengths
    inside = slot < lengths
    index = torch.where(inside, starts + slot, sum(ref_lengths)) if padded else starts + slot * inside
    return _device_values(index.flatten(), None, device)


@_shared_constant(maxsize=64)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """long ``[n]``: 0 .. n-1 on ``device``, made once per length and device (the tensor is shared: never modify
    it)."""
    return torch.arange(n, device=device)


def _image_grid(context: SelectionContext, device) -> Optional[torch.Tensor]:
    """long ``[b, N, 2]`` (row, col) of each reference token inside its own image (origin 0), b = the batch of
    ``reference_ids`` read on the device, or 1 for a grid made from known shapes (``ref_shapes`` without ids, the
    drop-in's ``IDS_GRID_SHAPES`` with them: a cached tensor, never modify it), or None (1D)."""
    ids, lengths = context.reference_ids, context.ref_lengths
    if _grid_from_ids(context):
        n_axes = ids.shape[-1]
        if n_axes not in ID_HW_AXES:
            return None
        first, second = ID_HW_AXES[n_axes]
        hw = ids[..., first:second + 1] if second == first + 1 else ids[..., [first, second]]  # a view: no index op
        if hw.is_floating_point():
            # each image's origin subtracted first (a grid centred on 0, -1.5 .. 1.5, lies whole steps from its
            # corner: rounded first, its cells merged), then whole steps checked, with finiteness, in one host read
            # (integer ids need none)
            offsets = _from_image_origin(hw.to(device), lengths)
            whole = (offsets - offsets.round()).abs() <= ID_STEP_TOLERANCE
            finite, stepped = torch.stack([torch.isfinite(offsets).all(), whole.all()]).tolist()
            if not finite:
                raise ValueError("reference_ids hold non-finite positions (NaN or inf)")
            if not stepped:
                raise ValueError("reference_ids place an image's tokens at positions that are not whole steps from "
                                 "its corner (e.g. half steps): the spatial selectors need a grid of whole cells")
            return offsets.round().long()
        return _from_image_origin(hw.to(device=device, dtype=torch.long), lengths)
    shapes = _grid_shapes(context)
    if shapes is None:
        return None
    key = "ref_shapes" if ids is None else IDS_GRID_SHAPES
    if len(shapes) != context.num_references:
        raise ValueError(f"extra[{key!r}] must give (h, w) for each of the {context.num_references} references")
    for entry, n in zip(shapes, lengths):
        try:
            h, w = entry
        except (TypeError, ValueError):
            h = w = None
        h, w = _python_number(h), _python_number(w)
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0) or h * w != n:
            raise ValueError(f"extra[{key!r}] entry {entry!r} must be (h, w): two positive ints whose product is "
                             f"the reference's {n} tokens")
    return _shapes_grid(tuple((int(h), int(w)) for h, w in shapes), tuple(lengths), torch.device(device))


def _from_image_origin(hw: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """``hw [b, N, 2]`` minus each reference image's smallest (row, col)."""
    low = _image_rows(hw, lengths).amin(dim=2)  # [b, n_refs, 2]
    if len(lengths) == 1:
        return hw - low
    return hw - low.index_select(1, _token_layout(lengths, hw.device)[0])


def _grid_from_ids(context: SelectionContext) -> bool:
    """Whether the context's grid is read from its ``reference_ids`` (on the device), not made from known shapes."""
    return context.reference_ids is not None and context.extra.get(IDS_GRID_SHAPES) is None


def _grid_shapes(context: SelectionContext) -> Optional[list]:
    """The ``(h, w)`` of each reference's row-major grid where the grid is not read from ids: the drop-in's checked
    shapes of its ids, or ``extra["ref_shapes"]`` without ids; None: no grid (1D images)."""
    return context.extra.get(IDS_GRID_SHAPES if context.reference_ids is not None else "ref_shapes")


def row_major_shapes(hw: torch.Tensor, lengths: list) -> Optional[list]:
    """``(h, w)`` of each reference whose ids ``hw`` (host tensor of (row, column) ``[N, 2]``, the references in
    sequence order, ``lengths`` tokens each) are exactly a full ``h x w`` grid in row-major order (from any origin),
    as the pipelines make them; None when one is not. The drop-in puts the result in ``extra[IDS_GRID_SHAPES]``.
    Every check stays a host tensor until one ``tolist`` at the end."""
    if hw.ndim != 2 or hw.shape[1] != 2 or sum(lengths) != hw.shape[0]:
        raise ValueError(f"hw must be [N, 2] with N = sum(lengths) = {sum(lengths)}, got {tuple(hw.shape)}")
    exact = torch.ones((), dtype=torch.bool, device="cpu")
    if hw.is_floating_point():
        rounded = hw.round()
        exact = (hw == rounded).all()
        hw = rounded.long()
    checks = []
    for rows in hw.split(lengths):
        low = rows.amin(dim=0)
        size = rows.amax(dim=0) - low + 1  # (h, w) of the box the image's ids span
        cell = (rows[:, 0] - low[0]) * size[1] + rows[:, 1] - low[1]  # row-major position in that box
        full = (size.prod() == rows.shape[0]) & (cell == torch.arange(rows.shape[0], device="cpu")).all()
        checks.append(torch.cat([size, (full & exact).long()[None]]))
    table = torch.stack(checks).tolist()
    return [(h, w) for h, w, _ in table] if all(full for _, _, full in table) else None


def _layout_shapes(context: SelectionContext, grid: Optional[torch.Tensor]) -> Optional[tuple]:
    """The shapes of the context's ``_image_grid`` ``grid`` made from known shapes (None: no grid), as a cache key."""
    return None if grid is None else tuple((int(h), int(w)) for h, w in _grid_shapes(context))


@_shared_constant(maxsize=64)
def _shapes_grid(shapes: tuple, ref_lengths: tuple, device: torch.device) -> torch.Tensor:
    """``_image_grid`` of checked ``ref_shapes``: row-major grids built on the host (position p of an image of width
    w sits at (p // w, p % w)), copied once per shapes and device (the tensor is shared: never modify it)."""
    counts, total = torch.tensor(ref_lengths, device="cpu"), sum(ref_lengths)
    starts = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts, output_size=total)
    position = torch.arange(total, device="cpu") - starts
    width = torch.tensor([w for _, w in shapes], device="cpu").repeat_interleave(counts, output_size=total)
    return _device_values(torch.stack([position // width, position % width], dim=-1), None, device)[None]


WORD_BITS = 16  # _reversed_bits: bits reversed per table lookup (tables of 2**16 entries)


@_shared_constant(maxsize=None)
def _word_table(spread: bool, device: torch.device) -> torch.Tensor:
    """long ``[2**WORD_BITS]``: each word with its bits reversed (bit k -> bit WORD_BITS-1-k; ``spread``: to bit
    2·(WORD_BITS-1-k)), built on the host and copied to ``device`` once per process."""
    word = torch.arange(1 << WORD_BITS, device="cpu")
    table = torch.zeros_like(word)
    for k in range(WORD_BITS):
        table |= ((word >> k) & 1) << ((2 if spread else 1) * (WORD_BITS - 1 - k))
    return _device_values(table, None, device)


def _reversed_bits(x: torch.Tensor, bits: int, spread: bool) -> torch.Tensor:
    """The low ``bits`` bits of ``x`` reversed (bit i goes to bit ``bits - 1 - i``; ``spread``: to bit
    ``2·(bits - 1 - i)``), a word of WORD_BITS at a time through a table: a few ops per word, not per bit."""
    n_words = -(-bits // WORD_BITS)
    pad = WORD_BITS * n_words - bits
    if pad:  # the low `bits` bits as the top bits of whole words
        x = (x & ((1 << bits) - 1)) << pad
    table = _word_table(spread, x.device)
    word_mask = (1 << WORD_BITS) - 1
    out = None
    for k in range(n_words):  # word k of x lands, reversed, in word n_words-1-k of the result
        part = table[(x >> (WORD_BITS * k)) & word_mask if k else x & word_mask]
        shift = (2 if spread else 1) * WORD_BITS * (n_words - 1 - k)
        part = part << shift if shift else part
        out = part if out is None else out | part
    return out


def _bit_reverse(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The low ``bits`` bits of ``x`` reversed (bit i goes to bit ``bits - 1 - i``)."""
    return _reversed_bits(x, bits, spread=False)


def _bayer_code(row: torch.Tensor, col: torch.Tensor, bits: int) -> torch.Tensor:
    """Ordered-dither (Bayer) threshold of each grid cell: the cells with code < 4**j form the lattice of stride
    2**(bits-j), so thresholding at any level leaves an evenly spread subset."""
    # interleave bits of (row ^ col, row), low coordinate bits -> high code bits: bit i of row goes to code bit
    # 2·(bits-1-i), bit i of row ^ col to the bit above it
    return _reversed_bits(row, bits, spread=True) | (_reversed_bits(row ^ col, bits, spread=True) << 1)


def _rank_in_image(keys: torch.Tensor, ref_lengths: Sequence[int], layout: Optional[torch.Tensor] = None,
                   key_bits: Optional[int] = None) -> torch.Tensor:
    """Rank of each token's key inside its own image (0 = smallest; ties to the lower index), long [B, N].

    Images of one length: one stable sort per (sample, image) row. Else one stable sort for all images (a stable
    sort orders each image's tokens as a sort of that image alone would): keys given as ints in
    ``[0, 2**key_bits)`` are sorted packed with their image index (image in the high bits), so a token's rank is its
    position minus its image's start; other keys are sorted whole, and a token's rank is the count of its image's
    tokens before it in that order. ``layout``: ``_token_layout`` of ``ref_lengths``."""
    if min(ref_lengths) == max(ref_lengths):  # images of one length (one image too): a row per (sample, image)
        rows = keys.reshape(keys.shape[0] * len(ref_lengths), ref_lengths[0])
        order = torch.sort(rows, dim=1, stable=True).indices
        positions = _positions(rows.shape[1], keys.device).expand(order.shape)
        return torch.empty_like(order).scatter_(1, order, positions).view(keys.shape)
    image, start, _ = layout if layout is not None else _token_layout(ref_lengths, keys.device)
    if key_bits is not None:
        order = torch.sort(keys + (image << key_bits), dim=1, stable=True).indices
        positions = _positions(keys.shape[1], keys.device).expand(order.shape)
        return torch.empty_like(order).scatter_(1, order, positions) - start  # position in the image's run
    order = torch.sort(keys, dim=1, stable=True).indices
    image = image[order][:, None, :]  # [B, 1, N]: image of each token in sorted order
    # [B, n_refs, N]: the running count of each image's tokens, scanned along the last (contiguous) dim: a scan
    # along dim 1 of [B, N, n_refs] took 1.5 ms of CUDA time at 3 x 4096 tokens (H200, 2026-11-29), 30x the sort
    seen = (image == torch.arange(len(ref_lengths), device=keys.device)[:, None]).cumsum(dim=2)
    return torch.empty_like(order).scatter_(1, order, seen.gather(1, image)[:, 0] - 1)


# ----------------------------------------------------------------------------------------------------------------
# baseline selectors
# ----------------------------------------------------------------------------------------------------------------
def random_scores(reference_latents: torch.Tensor, context: SelectionContext) -> torch.Tensor:
    """i.i.d. U[0, 1) scores drawn from ``context.generator`` (on the generator's device, then moved): a random
    subset of any size, reproducible under a seed. Signal: none (the Sparse Context training distribution).

    With a generator, one row of N scores is drawn and shared by every sample, so a sample's selection does not
    depend on its position in the batch or on its batch-mates (a request run alone keeps what it keeps inside a
    batch, at any budget); with ``sample_generators`` (one per sample), sample b's row is the one its own generator
    draws (what the request would draw alone with that generator); without any, each sample draws its own row."""
    batch, n_tokens, _ = reference_latents.shape
    if context.sample_generators is not None and len(context.sample_generators) == batch:
        rows = [torch.rand(n_tokens, generator=g, device=g.device, dtype=torch.float32)
                for g in context.sample_generators]
        return torch.stack(rows).to(reference_latents.device)
    gen = context.generator
    draw_device = gen.device if gen is not None else reference_latents.device
    rows = 1 if gen is not None else batch
    scores = torch.rand((rows, n_tokens), generator=gen, device=draw_device, dtype=torch.float32)
    return scores.to(reference_latents.device).expand(batch, n_tokens).contiguous()  # writable, like any scores


def uniform_scores(reference_latents: torch.Tensor, context: SelectionContext) -> torch.Tensor:
    """Strided-grid scores in (0, 1]: ``1 - rank / L`` of a low-discrepancy order inside each image of L tokens.

    On a 2D grid (``reference_ids`` or ``extra["ref_shapes"]``) the order is the ordered-dither (Bayer) code of
    (row, col): the top-k of any k contains the lattice of stride s, a power of two, as soon as k reaches its size
    ``ceil(h/s)·ceil(w/s)`` (other strides are spread evenly, not contained). Without a grid it is the bit-reversed
    (van der Corput) position, the 1D analogue. The lattices start at the image's corner: on a side that is not a
    multiple of the stride, the last rows or columns lie up to a stride from a kept token (1D, 40 tokens, k = 4:
    positions 0, 8, 16, 32). Scores of all images lie on the same scale, so even a global top-k
    spreads its picks over the images in proportion to their sizes. Signal: none (deterministic, content-blind
    baseline).
    """
    scores = _uniform_scores(reference_latents, context, _image_grid(context, reference_latents.device))
    return scores.expand(reference_latents.shape[0], -1).clone(memory_format=torch.contiguous_format)  # writable


def _uniform_scores(reference_latents: torch.Tensor, context: SelectionContext, grid: Optional[torch.Tensor]):
    """``uniform_scores`` with the context's ``_image_grid`` (or None) given, at the grid's batch (1 without ids;
    it broadcasts over the samples). Without ids (or with ids the drop-in found to be row-major grids) the scores
    depend on the layout alone: made once per layout and device (a shared tensor: never modify it)."""
    lengths, device = context.ref_lengths, reference_latents.device
    if grid is not None and _grid_from_ids(context):
        return _grid_uniform_scores(grid, lengths, device)
    return _layout_uniform_scores(tuple(lengths), _layout_shapes(context, grid), device)


@_shared_constant(maxsize=64)
def _layout_uniform_scores(ref_lengths: tuple, shapes: Optional[tuple], device: torch.device) -> torch.Tensor:
    """``_uniform_scores`` ``[1, N]`` of the ``ref_shapes`` grids (checked), or of 1D images (None)."""
    grid = None if shapes is None else _shapes_grid(shapes, ref_lengths, device)
    return _grid_uniform_scores(grid, ref_lengths, device)


def _grid_uniform_scores(grid: Optional[torch.Tensor], ref_lengths: Sequence[int], device) -> torch.Tensor:
    """``_uniform_scores`` from the grid ``[b, N, 2]`` (None: 1D images): float32 ``[b, N]`` (b = 1 for 1D)."""
    layout = _token_layout(ref_lengths, device)
    _, start, length = layout
    if grid is not None:  # scored at the ids' own batch (usually 1)
        code = _bayer_code(*grid.unbind(-1), LOW_DISCREPANCY_BITS)
    else:
        code = _bit_reverse(_positions(sum(ref_lengths), device) - start, 2 * LOW_DISCREPANCY_BITS)[None]
    # codes are below 2**(2·LOW_DISCREPANCY_BITS): one sort of (image, code) ranks every image
    rank = _rank_in_image(code, ref_lengths, layout, key_bits=2 * LOW_DISCREPANCY_BITS).float()
    return 1.0 - rank / length  # the int64 length is divided as float32, like a float32 length


register_selector("random", random_scores, returns_scores=True, signals=BUILTIN_SIGNALS)
register_selector("uniform", uniform_scores, returns_scores=True, signals=BUILTIN_SIGNALS, reads_generator=False)


# ----------------------------------------------------------------------------------------------------------------
# signals shared by the task-aware selectors
# ----------------------------------------------------------------------------------------------------------------
def _probe_tensor(reference_latents, context: SelectionContext, name: str, selector: str,
                  required: bool = True) -> Optional[torch.Tensor]:
    """``extra[name]``, running ``extra["attention_probe"]`` once (result cached in ``extra``) when it is absent."""
    extra = context.extra
    if name not in extra and callable(extra.get("attention_probe")) and not extra.get("_probe_ran"):
        produced = extra["attention_probe"](reference_latents, context)
        if not isinstance(produced, dict):
            raise ValueError("extra['attention_probe'] must return a dict of probe tensors, "
                             f"got {type(produced).__name__}")
        for key, value in produced.items():
            extra.setdefault(key, value)
        extra["_probe_ran"] = True
    value = extra.get(name)
    if value is None and required:
        raise ValueError(f"selector {selector!r} needs context.extra[{name!r}] (or an extra['attention_probe'] "
                         "that provides it)")
    return value


def _check_qk(queries, keys, query_mask, batch: int, n_tokens: int, q_name: str):
    if not isinstance(queries, torch.Tensor) or queries.ndim != 4 or queries.shape[0] != batch:
        raise ValueError(f"extra[{q_name!r}] must be [B={batch}, Q, H, D], "
                         f"got {getattr(queries, 'shape', type(queries).__name__)}")
    for name, tensor in ((q_name, queries), ("ref_keys", keys)):
        if isinstance(tensor, torch.Tensor) and not tensor.is_floating_point():
            raise ValueError(f"extra[{name!r}] must be a float tensor, got {tensor.dtype}")
    if not isinstance(keys, torch.Tensor) or keys.ndim != 4 or tuple(keys.shape[:2]) != (batch, n_tokens) \
            or keys.shape[2:] != queries.shape[2:]:
        raise ValueError(f"extra['ref_keys'] must be [B={batch}, N={n_tokens}, H, D] with the heads and head dim "
                         f"of extra[{q_name!r}] {tuple(queries.shape)}, "
                         f"got {getattr(keys, 'shape', type(keys).__name__)}")
    if query_mask is not None and (not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool
                                   or tuple(query_mask.shape) != tuple(queries.shape[:2])):
        raise ValueError(f"the query mask for extra[{q_name!r}] must be bool [B, Q={queries.shape[1]}]")


def attention_mass(queries: torch.Tensor, keys: torch.Tensor, query_mask: Optional[torch.Tensor] = None, *,
                   softmax_scale: Optional[float] = None, max_queries: Optional[int] = DEFAULT_MAX_QUERIES
                   ) -> torch.Tensor:
    """Mean attention probability each key receives: ``mean over heads and valid queries of softmax_k(s·q·kᵀ)``,
    float32 ``[B, N]`` (each row sums to 1 when a sample has a valid query).

    ``queries [B, Q, H, D]``, ``keys [B, N, H, D]``; ``query_mask`` bool ``[B, Q]`` drops padding queries. At most
    ``max_queries`` evenly strided valid queries are used per sample (None = all). The softmax runs over the given
    keys only: the mass is each reference token's share of the attention the queries give the references. The
    strided queries include each sample's first and last valid query (``slot·(Q_valid-1)/(max_queries-1)``
    rounded half up), so an all-valid ``query_mask`` picks the queries that no mask picks.
    Queries and keys of different float dtypes are computed in the wider one. Not differentiable (selection is a
    top-k): the inputs are detached.

    Computed by ``sparsectx.ops.attention_key_mass`` (two Triton passes on a GPU that never write the scores;
    products accumulated in fp32, also from fp16 inputs whose q·kᵀ would overflow fp16). Cost:
    ``4·B·H·Q'·N·D`` flops (QKᵀ in each pass), Q' = min(Q, max_queries): at the klein-9B shapes (H=32, D=128,
    3 references of 4096 tokens, Q'=1024) 2·103 GFLOP.
    """
    _check_max_queries(max_queries)
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a float [B, ., H, D] tensor, got {type(t).__name__}")
        if t.ndim != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float [B, ., H, D] tensor, got {t.dtype} {tuple(t.shape)}")
    if keys.shape[0] != queries.shape[0] or keys.shape[2:] != queries.shape[2:]:
        raise ValueError(f"keys {tuple(keys.shape)} must have the batch, heads and head dim of queries "
                         f"{tuple(queries.shape)}")
    if query_mask is not None and (not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool
                                   or tuple(query_mask.shape) != tuple(queries.shape[:2])):
        raise ValueError(f"query_mask must be bool [B, Q] = {tuple(queries.shape[:2])}")
    if queries.dtype != keys.dtype:  # e.g. fp32 queries beside fp16 keys: both in the wider dtype
        common = torch.promote_types(queries.dtype, keys.dtype)
        queries, keys = queries.to(common), keys.to(common)
    batch, n_queries, heads, dim = queries.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    if max_queries is not None and n_queries > max_queries:
        queries, query_mask = _subsample_queries(queries, query_mask, max_queries)
        n_queries = max_queries
    if query_mask is not None:  # [B, Q]: the mean over each sample's valid queries
        weights = query_mask.float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    else:  # (the same fp32 division as above, by the exact count)
        weights = _mean_weights(batch, n_queries, queries.device)
    mass = ops.attention_key_mass(queries.detach(), keys.detach(), weights, softmax_scale=scale)
    return mass.float().mean(dim=1)


@_shared_constant(maxsize=64)
def _mean_weights(batch: int, n_queries: int, device: torch.device) -> torch.Tensor:
    """float32 ``[batch, n_queries]`` of ``1 / n_queries`` (an fp32 division), made once per shape and device (the
    tensor is shared: never modify it)."""
    return torch.ones((batch, n_queries), dtype=torch.float32, device=device).div_(max(n_queries, 1))


def _check_max_queries(max_queries) -> None:
    if max_queries is not None and (isinstance(max_queries, bool) or not isinstance(max_queries, numbers.Integral)):
        raise TypeError(f"max_queries must be None or an int >= 1, got {max_queries!r}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be None or an int >= 1, got {max_queries!r}")


def _subsample_queries(queries: torch.Tensor, query_mask: Optional[torch.Tensor], count: int) -> tuple:
    """``count`` evenly strided queries per sample, taken among its valid ones (``query_mask``): a sample with at
    most ``count`` valid queries keeps them all, the remaining slots masked out. Returns ``(queries, mask)``."""
    n_queries, device = queries.shape[1], queries.device
    slot = torch.arange(count, device=device)[None]
    if query_mask is None:
        return queries[:, _strided(slot, n_queries, count)[0]], None
    valid = query_mask.sum(dim=1, keepdim=True)  # [B, 1]
    order = torch.sort((~query_mask).to(torch.uint8), dim=1, stable=True).indices  # valid queries first, in order
    strided = _strided(slot, valid, count)  # evenly spread over the valid ones (an all-valid mask: as no mask)
    position = torch.where(valid > count, strided, slot).clamp(max=n_queries - 1)
    picked = order.gather(1, position)  # [B, count]
    gathered = queries.gather(1, picked[:, :, None, None].expand(-1, -1, *queries.shape[2:]))
    return gathered, slot < valid


def _strided(slot: torch.Tensor, n, count: int) -> torch.Tensor:
    """Position of each ``slot`` of ``count`` spread evenly over ``n`` items, the first and the last included:
    ``slot·(n-1)/(count-1)`` rounded half up, in integers (exact)."""
    if count == 1:
        return torch.zeros_like(slot)
    return torch.div(slot * (n - 1) * 2 + (count - 1), 2 * (count - 1), rounding_mode="floor")


def _normalise_per_image(signal: torch.Tensor, ref_lengths: Sequence[int]) -> torch.Tensor:
    """Min-max scaling of a float [B, N] signal to [0, 1] inside each image (a constant image maps to 0)."""
    signal = signal if signal.dtype == torch.float32 else signal.float()
    rows = _image_rows(signal, ref_lengths)  # [B, n_refs, longest]: all images' min and max in one op each
    low = rows.amin(dim=2, keepdim=True)
    span = rows.amax(dim=2, keepdim=True) - low
    if min(ref_lengths) == max(ref_lengths):  # rows is a view of the signal: scaled in place of the index_select
        return torch.where(span > 0, (rows - low) / span.clamp(min=torch.finfo(torch.float32).tiny),
                           0.0).view(signal.shape)
    low, span = low[..., 0], span[..., 0]
    if len(ref_lengths) > 1:  # each image's values at its tokens (one image: [B, 1] broadcasts)
        image = _token_layout(ref_lengths, signal.device)[0]
        low, span = low.index_select(1, image), span.index_select(1, image)
    return torch.where(span > 0, (signal - low) / span.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


# extra key set by the drop-in: the (h, w) of each reference when its ids' (h, w) axes are exactly that row-major grid
# (checked on the drop-in's host copy of the ids): the grid is then made from the shapes (made once per layout and
# cached) instead of from the device ids
IDS_GRID_SHAPES = "_ids_grid_shapes"
GRID_SPAN_LIMIT = 64  # _dilate: an image's id grid may span at most this many cells per token (else: not a grid)


_GRID_OF_CONTEXT = object()  # _dilate's default: the context's own _image_grid


def _dilate(signal: torch.Tensor, context: SelectionContext, radius: int, grid=_GRID_OF_CONTEXT) -> torch.Tensor:
    """Max of ``signal`` over the (2r+1)² neighbourhood of each token in its image's grid (a 2r+1 window along the
    token order without a grid). One small host read sizes every image's grid of ids (``ref_shapes`` give the
    sizes). ``grid``: the context's ``_image_grid`` when the caller has it already."""
    if radius <= 0:
        return signal
    batch, n_tokens = signal.shape
    lengths, device = context.ref_lengths, signal.device
    if grid is _GRID_OF_CONTEXT:
        grid = _image_grid(context, device)
    image, start, _ = _token_layout(lengths, device)
    # every image on its own plane of one canvas sized for the largest
    if grid is None:
        plane = (max(lengths),)
        cell = image * plane[0] + _positions(n_tokens, device) - start  # [N]: canvas cell of each token
    else:
        if not _grid_from_ids(context):  # the grid of known shapes
            sizes = [(int(h), int(w)) for h, w in _grid_shapes(context)]
        else:  # (h, w) of each image: the host read
            sizes = (_image_rows(grid, lengths).amax(dim=(0, 2)) + 1).tolist()
        for i, ((h, w), n) in enumerate(zip(sizes, lengths)):
            if h * w > GRID_SPAN_LIMIT * n:
                raise ValueError(f"the ids of reference {i} span a {h} x {w} grid for its {n} tokens: not a token "
                                 "grid (pass integer token positions as reference_ids, or extra['ref_shapes'])")
        plane = (max(h for h, _ in sizes), max(w for _, w in sizes))
        if len(lengths) * math.prod(plane) > 4 * sum(h * w for h, w in sizes):  # shapes far apart: image by image
            return torch.cat([_dilate_planes(signal[:, lo:hi], grid[:, lo:hi, 0] * w + grid[:, lo:hi, 1], (h, w),
                                             1, radius) for (lo, hi), (h, w) in zip(_image_slices(lengths), sizes)],
                             dim=1)
        cell = (image * plane[0] + grid[..., 0]) * plane[1] + grid[..., 1]  # [b, N]
    return _dilate_planes(signal, cell, plane, len(lengths), radius)


def _dilate_planes(signal: torch.Tensor, cell: torch.Tensor, plane: tuple, n_planes: int, radius: int):
    """Max pooling of ``signal [B, N]`` placed at ``cell`` ([b, N] or [N]) of ``n_planes`` planes of shape ``plane``
    (-inf elsewhere, as max pooling pads): one scatter, one pooling and one gather for all planes."""
    batch, n_tokens = signal.shape
    cell = cell.expand(batch, n_tokens)
    dense = signal.new_full((batch, n_planes * math.prod(plane)), -math.inf).scatter(1, cell, signal)
    pool = F.max_pool1d if len(plane) == 1 else F.max_pool2d
    pooled = pool(dense.view(batch * n_planes, 1, *plane), 2 * radius + 1, stride=1, padding=radius)
    return pooled.view(batch, n_planes * math.prod(plane)).gather(1, cell)  # (sized: the batch may be empty)


def _saliency(latents: torch.Tensor, context: SelectionContext, grid: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 ``[B, N]``: ``‖latent - background‖₂`` of each token of the float32 reference latents ``[B, N, C]``,
    the background its image's ``_border_background`` (subtracted image by image in the rows of images of one
    length: no per-token copy of the backgrounds)."""
    background = _border_background(latents, context, grid)
    lengths = context.ref_lengths
    if min(lengths) == max(lengths):
        return (_image_rows(latents, lengths) - background[:, :, None]).norm(dim=-1).flatten(1)
    return (latents - background.index_select(1, _token_layout(lengths, latents.device)[0])).norm(dim=-1)


def _border_background(latents: torch.Tensor, context: SelectionContext, grid: Optional[torch.Tensor]) -> torch.Tensor:
    """Background estimate ``[B, n_refs, C]`` of each image of the float32 reference latents ``[B, N, C]``: the mean
    latent of its border tokens (first/last row or column) on a grid (the context's ``_image_grid``), else (None) of
    the whole image."""
    lengths, device = context.ref_lengths, latents.device
    if grid is not None and _grid_from_ids(context):
        weight, count = _border_weight(grid, lengths, device)
    else:  # a grid of known shapes, or none: the weights depend on the layout alone
        weight, count = _layout_border_weight(tuple(lengths), _layout_shapes(context, grid), device)
    # the weighted sums [B, n_refs, C]: of all images at once when they have one length, else image by image, each
    # over its own slice
    weighted = latents * weight[..., None]
    if min(lengths) == max(lengths):
        sums = _image_rows(weighted, lengths).sum(dim=2)
    else:
        sums = torch.stack([weighted[:, lo:hi].sum(1) for lo, hi in _image_slices(lengths)], dim=1)
    return sums / count[..., None]


def _border_weight(grid: Optional[torch.Tensor], lengths: Sequence[int], device) -> tuple:
    """``(weight, count)``: float32 ``[b, N]``, 1 on the border tokens of each image of the grid ``[b, N, 2]`` (first
    or last row or column; every token without a grid), and float32 ``[b, n_refs]``, each image's border count (at
    least 1; integers, exact in float32)."""
    if grid is None:
        weight = torch.ones(1, sum(lengths), device=device, dtype=torch.float32)
    else:
        last = _image_rows(grid, lengths).amax(dim=2)  # [b, n_refs, 2]: each image's last row and column
        if len(lengths) > 1:
            last = last.index_select(1, _token_layout(lengths, device)[0])
        weight = ((grid == 0) | (grid == last)).any(dim=-1).float()  # first/last row or column
    return weight, _image_rows(weight, lengths, fill=0.0).sum(dim=2).clamp(min=1.0)


@_shared_constant(maxsize=64)
def _layout_border_weight(ref_lengths: tuple, shapes: Optional[tuple], device: torch.device) -> tuple:
    """``_border_weight`` of the ``ref_shapes`` grids (checked), or of 1D images (None), made once per layout and
    device (shared tensors: never modify them)."""
    grid = None if shapes is None else _shapes_grid(shapes, ref_lengths, device)
    return _border_weight(grid, ref_lengths, device)


# ----------------------------------------------------------------------------------------------------------------
# task-aware selectors
# ----------------------------------------------------------------------------------------------------------------
def edit_scores(reference_latents: torch.Tensor, context: SelectionContext, *, ring: int = DEFAULT_RING,
                max_queries: Optional[int] = DEFAULT_MAX_QUERIES) -> torch.Tensor:
    """Spatially-aligned editing (target and reference share their layout): keep where the edit happens, a context
    ring around it, then an evenly spread remainder.

    Signals: ``extra["user_mask"]`` (the user said where the edit is: exact, free) and/or the instruction's
    attention ``attention_mass(extra["text_queries"], extra["ref_keys"], extra.get("text_mask"))`` (the instruction
    tokens attend to the reference tokens they talk about: needs one probe layer of the first step). Given a
    ``user_mask``, the probe is not run (the user said where the edit is): the instruction's attention is used only
    if ``text_queries`` and ``ref_keys`` are given too, and then the edit region is their maximum (the mask wins
    where it is set). The region is scaled to [0, 1] per image, dilated
    by ``ring`` tokens for context (boundaries must blend), and ranked as
    ``region + CONTEXT_WEIGHT·dilated + SPREAD_WEIGHT·uniform``: top-k takes the region first, then its ring, then
    an even spread of the rest (global layout). Cost: the probe's attention mass (see ``attention_mass``) plus
    O(N) pooling.
    """
    # (checked first: a user's functools.partial(edit_scores, ring=...) is otherwise met deep in torch, or not at all)
    if isinstance(ring, bool) or not isinstance(ring, numbers.Integral) or ring < 0:
        raise ValueError(f"ring must be an int >= 0 (tokens of context around the edit region), got {ring!r}")
    _check_max_queries(max_queries)
    batch, n_tokens, _ = reference_latents.shape
    user_mask = context.extra.get("user_mask")
    if user_mask is None:
        queries = _probe_tensor(reference_latents, context, "text_queries", "edit", required=False)
    else:  # the user's region: no probe, their own instruction queries and keys only (both, or neither is used)
        given = context.extra.get("text_queries"), context.extra.get("ref_keys")
        queries = given[0] if all(t is not None for t in given) else None
    if user_mask is None and queries is None:
        raise ValueError("selector 'edit' needs context.extra['user_mask'] and/or extra['text_queries'] with "
                         "extra['ref_keys'] (or an extra['attention_probe'] that provides them)")
    region = torch.zeros((batch, n_tokens), dtype=torch.float32, device=reference_latents.device)
    if user_mask is not None:
        if not isinstance(user_mask, torch.Tensor) or user_mask.dtype != torch.bool \
                or tuple(user_mask.shape) != (batch, n_tokens):
            got = (f"{user_mask.dtype} {list(user_mask.shape)}" if isinstance(user_mask, torch.Tensor)
                   else type(user_mask).__name__)
            raise ValueError(f"extra['user_mask'] must be bool [B={batch}, N={n_tokens}], got {got}")
        if user_mask.is_meta:
            raise ValueError("extra['user_mask'] is on the meta device: it has no values to read")
        region = user_mask.to(region.device).float()
    if queries is not None:
        # the queries' mask as they came (the user's, or the probe's with its queries): a probe run for the keys alone
        # adds its own prompt's mask, which is not the mask of a user's text_queries
        text_mask = context.extra.get("text_mask")
        keys = _probe_tensor(reference_latents, context, "ref_keys", "edit")
        _check_qk(queries, keys, text_mask, batch, n_tokens, "text_queries")
        probe = _normalise_per_image(attention_mass(queries, keys, text_mask, max_queries=max_queries),
                                     context.ref_lengths)
        region = torch.maximum(region, probe.to(region.device))
    grid = _image_grid(context, reference_latents.device)  # read by the dilation and the spread
    dilated = _dilate(region, context, ring, grid)
    return region + CONTEXT_WEIGHT * dilated + SPREAD_WEIGHT * _uniform_scores(reference_latents, context, grid)


def subject_scores(reference_latents: torch.Tensor, context: SelectionContext, *, saliency: bool = True,
                   max_queries: Optional[int] = DEFAULT_MAX_QUERIES) -> torch.Tensor:
    """Subject-driven generation: keep the subject, drop the background.

    Signals: foreground saliency, ``‖latent - background‖₂`` with the background estimated as the mean latent of
    the image's border tokens (subjects are framed inside the picture; training-free, no probe), and, when
    ``extra["target_queries"]`` and ``extra["ref_keys"]`` are available, reference-to-target attention
    (ReCAST-style: the target queries attend to the reference keys they copy from, i.e. the subject). Each signal is
    min-max scaled per image and the available ones are averaged, plus ``SPREAD_WEIGHT·uniform`` to break ties
    evenly. ``saliency=False`` uses the attention alone. Cost: O(N·C) for saliency, ``attention_mass`` for the
    probe.
    """
    if not isinstance(saliency, bool):
        raise TypeError(f"saliency must be a bool, got {type(saliency).__name__}")
    _check_max_queries(max_queries)  # (before the probe runs, or where no probe tensor comes)
    batch, n_tokens, _ = reference_latents.shape
    grid = _image_grid(context, reference_latents.device)  # read by the background and the spread
    signals = []
    if saliency:
        latents = reference_latents.float()
        signals.append(_saliency(latents, context, grid))
    queries = _probe_tensor(reference_latents, context, "target_queries", "subject", required=not saliency)
    if queries is not None:
        keys = _probe_tensor(reference_latents, context, "ref_keys", "subject")
        _check_qk(queries, keys, None, batch, n_tokens, "target_queries")
        mass = attention_mass(queries, keys, max_queries=max_queries)
        signals.append(mass.to(reference_latents.device, torch.float32))
    # every signal scaled per image at once (its rows stacked), then averaged
    scaled = _normalise_per_image(torch.cat(signals), context.ref_lengths).view(len(signals), batch, n_tokens)
    return scaled.mean(dim=0) + SPREAD_WEIGHT * _uniform_scores(reference_latents, context, grid)


def attention_scores(reference_latents: torch.Tensor, context: SelectionContext, *,
                     max_queries: Optional[int] = DEFAULT_MAX_QUERIES) -> torch.Tensor:
    """Generic model-internal scores from one cheap probe: the attention mass probe queries give each reference
    key (``attention_mass``), from ``extra["queries"]`` (+ ``extra["query_mask"]``), or else from the available
    ``extra["text_queries"]`` / ``extra["target_queries"]`` together, and ``extra["ref_keys"]``.

    Cost of the probe's mass (``attention_mass``): ``4·B·H·Q'·N·D`` flops with Q' = min(Q, max_queries), 2·103
    GFLOP at the klein-9B shapes (H=32, D=128, N=3×4096, Q'=1024), besides the probe layer's own projections
    (measured: ``sparsectx bench --case selection``). Scores are raw masses (non-negative, summing to 1 per
    sample), so ``adaptive`` budgets read them as a distribution. A sample without a valid query (an all-False
    ``query_mask`` / ``text_mask``) has no attention to read: its scores are flat, ``1/N`` per token with
    ``SPREAD_WEIGHT·uniform`` breaking the ties, so it keeps an even spread (``adaptive``: about ``coverage·N``
    tokens, as any flat scores), not the image's first rows.
    """
    batch, n_tokens, _ = reference_latents.shape
    extra = context.extra
    query_names = ("queries", "text_queries", "target_queries")
    if all(extra.get(n) is None for n in query_names):
        _probe_tensor(reference_latents, context, "queries", "attention", required=False)  # a lazy probe, once
    # the queries given (or probed) before the keys' probe: a probe run for the keys alone adds its own "queries",
    # which must not take the place of the text or target queries a user gave
    given = {n: extra.get(n) for n in (*query_names, "query_mask", "text_mask")}
    if all(given[n] is None for n in query_names):
        raise ValueError("selector 'attention' needs context.extra['queries'] (or 'text_queries' / "
                         "'target_queries') and extra['ref_keys']")
    keys = _probe_tensor(reference_latents, context, "ref_keys", "attention")
    if given["queries"] is not None:
        queries, query_mask, name = given["queries"], given["query_mask"], "queries"
    else:
        parts = [(given[n], given[m] if m else None) for n, m in (("text_queries", "text_mask"),
                                                                   ("target_queries", None))
                 if given[n] is not None]
        for q, m in parts:
            _check_qk(q, keys, m, batch, n_tokens, "text_queries/target_queries")
        queries = torch.cat([q for q, _ in parts], dim=1)
        query_mask = torch.cat([m if m is not None else q.new_ones(q.shape[:2], dtype=torch.bool)
                                for q, m in parts], dim=1)
        name = "text_queries/target_queries"
    _check_qk(queries, keys, query_mask, batch, n_tokens, name)
    mass = attention_mass(queries, keys, query_mask, max_queries=max_queries).to(reference_latents.device)
    if query_mask is None and queries.shape[1] > 0:  # every sample has a valid query (the automatic probe's case)
        return mass
    # a sample whose queries are all masked out has a mass of zeros: flat scores with the even spread's order
    # (on the device: no host sync)
    spread = 1.0 + SPREAD_WEIGHT * _uniform_scores(reference_latents, context,
                                                   _image_grid(context, reference_latents.device))
    flat = spread / spread.sum(dim=1, keepdim=True)
    return torch.where(mass.sum(dim=1, keepdim=True) > 0, mass, flat.expand_as(mass))


register_selector("edit", edit_scores, returns_scores=True, signals=BUILTIN_SIGNALS, reads_generator=False)
register_selector("subject", subject_scores, returns_scores=True, signals=BUILTIN_SIGNALS, reads_generator=False)
register_selector("attention", attention_scores, returns_scores=True, signals=BUILTIN_SIGNALS, reads_generator=False)

# What each built-in selector reads of BUILTIN_SIGNALS. Each accepts them all (the signals given to enable serve a
# selector switched per call); a given signal the chosen one does not read is unused, and the drop-in warns (e.g. a
# user_mask with the default "random" selector, where "edit" was meant).
_BUILTIN_READS = {get_selector(name): frozenset(reads) for name, reads in (
    ("random", ()),
    ("uniform", ("ref_shapes",)),
    ("edit", ("user_mask", "text_queries", "text_mask", "ref_keys", "attention_probe", "ref_shapes")),
    ("subject", ("target_queries", "ref_keys", "attention_probe", "ref_shapes")),
    ("attention", ("queries", "query_mask", "text_queries", "text_mask", "target_queries", "ref_keys",
                   "attention_probe")))}


def is_builtin_selector(selector: Selector) -> bool:
    """Whether ``selector`` is one of the built-in selectors (``random``, ``uniform``, ``edit``, ``subject``,
    ``attention``), whose reads of the signals are known."""
    return selector in _BUILTIN_READS


def unread_signals(selector: Selector, names) -> tuple[list, list]:
    """``(unread, readers)``: the names among ``names`` that ``selector``, a built-in, does not read (sorted; [] for
    any other selector), and the built-in selectors that read at least one of them."""
    reads = _BUILTIN_READS.get(selector)
    unread = [] if reads is None else sorted(set(names) - reads)
    if not unread:
        return [], []
    readers = sorted(other.name for other, other_reads in _BUILTIN_READS.items() if other_reads & set(unread))
    return unread, readers


# ----------------------------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------------------------
class BudgetResult(NamedTuple):
    """``counts`` int64 ``[B, n_refs]`` kept per reference image, and the matching ``keep`` mask bool ``[B, N]``.
    ``compact_tokens(keep, ...)`` packs exactly this selection; ``per_sample`` (int64 ``[B]``) is the kept total of
    each request."""

    counts: torch.Tensor
    keep: torch.Tensor

    @property
    def per_sample(self) -> torch.Tensor:
        return self.counts.sum(dim=1)


PerImage = Union[int, float, Sequence, torch.Tensor]


def _broadcast_per_image(name: str, tensor: torch.Tensor, batch: int, n_refs: int) -> torch.Tensor:
    """``tensor`` broadcast to one value per (sample, reference image), or a ValueError naming ``name``."""
    try:
        return torch.broadcast_to(tensor, (batch, n_refs))
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not broadcast to [B={batch}, "
                         f"n_refs={n_refs}]") from None


def _check_per_image_setting(name: str, value) -> None:
    """Construction-time check of a count-or-ratio setting's type (tensor values are checked when the budget
    runs)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor, list, tuple)):
        raise TypeError(f"{name} must be an int, a float, a tensor or a list of them, got {type(value).__name__}")
    if isinstance(value, torch.Tensor) and value.is_meta:
        raise ValueError(f"{name} is a tensor on the meta device: it holds no values to keep by")
    if isinstance(value, (list, tuple)) and _holds_bool(value):  # (a ratio list is read as floats: True was 1.0)
        raise TypeError(f"{name} entries must be ints (counts) or floats (ratios), got a bool in {value!r}")


def _holds_bool(value) -> bool:
    """Whether nested lists (numpy arrays, tensors) hold a bool entry: Python, numpy or a bool tensor."""
    return any(entry.dtype == torch.bool if isinstance(entry, torch.Tensor) else
               entry.dtype == bool if ops._is_numpy(entry) else isinstance(entry, bool)
               for entry in _list_entries(value))


def _check_scalar_setting(name: str, value) -> None:
    """A Python-scalar count-or-ratio setting: a float ratio in [0, 1] or an int count >= 0."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int (count) or a float (ratio), got bool")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} ratio must lie in [0, 1], got {value}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} count must be >= 0, got {value}")


def _check_coverage(coverage) -> None:
    """``coverage``'s type, and its range when it is a Python scalar (a tensor's is checked where it is used)."""
    if isinstance(coverage, bool) or not isinstance(coverage, (numbers.Real, torch.Tensor)):
        raise TypeError(f"coverage must be a float or a tensor, got {type(coverage).__name__}")
    if isinstance(coverage, torch.Tensor) and (coverage.dtype == torch.bool or coverage.is_complex()):
        raise TypeError(f"coverage must be a float or a real tensor (a share of the score mass), got a tensor of "
                        f"{coverage.dtype}")
    if isinstance(coverage, torch.Tensor) and coverage.is_meta:
        raise ValueError("coverage is a tensor on the meta device: it holds no values to cover")
    if isinstance(coverage, numbers.Real) and not 0.0 <= coverage <= 1.0:  # numpy scalars too (NaN fails)
        raise ValueError(f"coverage must lie in [0, 1], got {coverage!r}")


def _entry_kinds(name: str, value) -> list:
    """Nested lists of Python/numpy numbers (or 0-d tensors): True where an entry is a ratio (float), False where it
    is a count (int). Bools are refused: a flag is neither."""
    if isinstance(value, (list, tuple)):
        return [_entry_kinds(name, v) for v in value]
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy bools are not Real either
        raise TypeError(f"{name} entries must be ints (counts) or floats (ratios), got {value!r}")
    return not isinstance(value, numbers.Integral)


def _list_setting(name: str, value, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A (nested) list setting as ``(values float64, is_ratio bool)`` tensors of the same shape: each entry keeps
    its own kind, so ``[1, 0.25]`` is one token of the first image and a quarter of the second."""
    kinds = _entry_kinds(name, value)
    try:
        values = _device_values(_as_floats(value), torch.float64, device)
        is_ratio = _device_values(kinds, torch.bool, device)
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be a rectangular list (one entry per image, or one list per request), "
                         f"got {value!r}") from None
    return values, is_ratio


def _written_scalars(value):
    """Nested lists (numpy arrays read as lists of their scalars) with their narrow-float scalars (``np.float32``,
    0-d float32/16 tensors) as the decimals they were written as (``ops.written_ratio``); every other entry (tensors
    of one or more dimensions, strings, ...) unchanged."""
    if isinstance(value, (list, tuple)) or (_is_numpy_array(value) and value.ndim >= 1):
        return [_written_scalars(v) for v in value]
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype in ops.NARROW_RATIO_DTYPES:
        return ops.written_ratio(value.item(), value.dtype)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return ops.budget_number(value)
    return value


def _as_floats(value):
    """Nested lists of numbers (or 0-d tensors) as floats; narrow floats as the decimals they were written as."""
    if isinstance(value, (list, tuple)):
        return [_as_floats(v) for v in value]
    value = _written_scalars(value)
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _per_image(name: str, value: PerImage, batch: int, ref_lengths: Sequence[int], device,
               allow_ratio: bool = True, allow_count: bool = True) -> torch.Tensor:
    """A count-or-ratio setting as an int64 ``[B, n_refs]`` count tensor. Floats are ratios of each image's length
    (rounded half up, as ``compact_tokens`` does; a float32/16 tensor's ratios as the decimals they were written as,
    ``ops.written_ratio``: one more host read), ints are counts (clamped to the image length). Tensors and lists
    broadcast to ``[B, n_refs]``: ``[n_refs]`` per image, ``[B, 1]`` per request, ``[B, n_refs]`` both; a tensor
    has one kind (its dtype), a list's entries each their own (``[1, 0.25]``: one token, then a quarter).
    Python scalars and lists are checked and turned into counts on the host (the same float64 arithmetic), then
    copied to the device at once (a scalar's counts once per process: shared, never modify them); tensors are
    checked with one small host read."""
    value = ops.budget_number(value)  # numpy scalars: their kind (a float32's ratio as written)
    scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
    if scalar:
        if isinstance(value, float) and not allow_ratio:
            raise TypeError(f"{name} must be an int count, got the float {value!r}")
        if isinstance(value, int) and not allow_count:
            raise TypeError(f"{name} must be a float ratio, got the int {value!r}")
        _check_scalar_setting(name, value)
        return _scalar_counts(value, batch, tuple(ref_lengths), torch.device(device))
    elif isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold ints (counts) or floats (ratios), got {value.dtype}")
        if value.dtype in ops.NARROW_RATIO_DTYPES:  # the decimals a narrow float's ratios were written as (a read)
            values = _written_values(value, device)
        else:
            values = value.to(device=device, dtype=torch.float64)
        is_ratio = torch.full(value.shape, value.is_floating_point(), device=device)
    elif isinstance(value, (list, tuple)):
        values, is_ratio = _list_setting(name, value, "cpu")  # host values: checked and converted on the host
    else:
        raise TypeError(f"{name} must be an int, a float, a tensor or a list of them, got {type(value).__name__}")
    # the kind before the range: a count budget given ratios reports the kind; one host read for all
    has_ratio, has_count, bad_ratio, bad_count = torch.stack([
        is_ratio.any(), (~is_ratio).any(),
        (is_ratio & ((values < 0) | (values > 1) | ~torch.isfinite(values))).any(),
        (~is_ratio & ((values < 0) | ~torch.isfinite(values))).any()]).tolist()
    if has_ratio and not allow_ratio:
        raise TypeError(f"{name} must be an int count, got floats")
    if has_count and not allow_count:
        raise TypeError(f"{name} must be a float ratio, got ints")
    if bad_ratio:
        raise ValueError(f"{name} ratios must lie in [0, 1]")
    if bad_count:
        raise ValueError(f"{name} counts must be >= 0")
    values = _broadcast_per_image(name, values, batch, len(ref_lengths))
    is_ratio = torch.broadcast_to(is_ratio, values.shape)
    lengths = _device_values(ref_lengths, torch.float64, values.device)
    # clamped to the image length while still float64: a count beyond int64 (2**63 and up) keeps the whole image
    counts = torch.where(is_ratio, torch.floor(values * lengths + 0.5), torch.minimum(values, lengths)).long()
    return _device_values(counts, None, device) if counts.device.type == "cpu" else counts  # host lists: one copy


def _written_values(tensor: torch.Tensor, device) -> torch.Tensor:
    """A narrow float tensor's values as the decimals they were written as (``ops.written_ratio``), float64 on
    ``device`` (one host read)."""
    written = [ops.written_ratio(v, tensor.dtype) for v in tensor.detach().flatten().tolist()]
    return _device_values(torch.tensor(written, dtype=torch.float64, device="cpu").view(tensor.shape), None, device)


@_shared_constant(maxsize=256, typed=True)  # typed: the count 1 and the ratio 1.0 are other settings
def _scalar_counts(value: Union[int, float], batch: int, ref_lengths: tuple, device: torch.device) -> torch.Tensor:
    """``_per_image`` of a checked Python scalar: int64 ``[batch, n_refs]``, made on the host and copied once per
    setting, batch, layout and device (the tensor is shared: never modify it)."""
    if batch == 0:  # (a list of no rows would lose the image dimension)
        return torch.zeros((0, len(ref_lengths)), dtype=torch.long, device=device)
    row = [min(math.floor(value * n + 0.5) if isinstance(value, float) else value, n) for n in ref_lengths]
    return _device_values([row] * batch, torch.long, device)


def _topk_per_image(scores: torch.Tensor, ref_lengths: Sequence[int], counts: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: the ``counts[b, i]`` highest scores inside image i of sample b (ties to the lower index):
    ``ops.ranked_keep_mask`` (on a GPU one sort and one kernel, whatever the number of images)."""
    return ops.ranked_keep_mask(scores, list(ref_lengths), counts)[0]


class _NaNScores(ValueError):
    """Scores holding NaN, found by a budget (``select`` names the selector that returned them)."""


class _InfScores(ValueError):
    """Scores holding +inf, found by an adaptive budget (``select`` names the selector that returned them)."""

    WHY = ("their mass is undefined (an adaptive budget reads the selector's scores as a distribution: return finite "
           "scores, or use a ratio or count budget)")


def _check_scores(scores, nan: bool = True) -> None:
    """``scores`` a float [B, N] tensor, and (``nan``: one host read) without NaN."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a float [B, N] tensor, got {type(scores).__name__}")
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float [B, N] tensor, got {scores.dtype} {tuple(scores.shape)}")
    if scores.is_meta:
        raise ValueError("scores are on the meta device: they have no values to rank")
    if nan and torch.isnan(scores).any():
        raise _NaNScores("scores contain NaN")


def _check_ref_lengths(ref_lengths, n_tokens: int) -> list[int]:
    """``ref_lengths`` as a list summing to ``n_tokens`` (None = a single image)."""
    if ref_lengths is None:
        return [n_tokens]
    if not isinstance(ref_lengths, (list, tuple)) \
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in ref_lengths):
        raise TypeError(f"ref_lengths must be a non-empty list of positive ints, got {ref_lengths!r}")
    if not ref_lengths or not all(n > 0 for n in ref_lengths):
        raise ValueError(f"ref_lengths must be a non-empty list of positive ints, got {ref_lengths!r}")
    if sum(ref_lengths) != n_tokens:
        raise ValueError(f"ref_lengths {list(ref_lengths)} sum to {sum(ref_lengths)} but scores has N={n_tokens}")
    return list(ref_lengths)


class FixedBudget:
    """Budget keeping a fixed count per image: ``budget(scores, ref_lengths) -> BudgetResult``."""

    def __init__(self, name: str, value: PerImage, ratio: bool):
        self.name, self.value, self.ratio = name, value, ratio

    def __call__(self, scores: torch.Tensor, ref_lengths: Optional[Sequence[int]] = None, *,
                 nan_checked: bool = False) -> BudgetResult:
        """``nan_checked``: the caller has checked that ``scores`` hold no NaN (a ``Selector``'s output): no second
        check (a host read)."""
        _check_scores(scores, nan=not nan_checked)
        ref_lengths = _check_ref_lengths(ref_lengths, scores.shape[1])
        counts = self.counts(scores.shape[0], ref_lengths, scores.device)
        keep = _topk_per_image(scores, ref_lengths, counts)
        # (a scalar's counts are a shared constant: the result gets its own copy)
        return BudgetResult(counts.clone() if isinstance(self.value, numbers.Real) else counts, keep)

    def counts(self, batch: int, ref_lengths: Sequence[int], device) -> torch.Tensor:
        """int64 ``[batch, n_refs]``: the count each image keeps (``_per_image``; a scalar's: a shared tensor)."""
        value = self.value
        if self.ratio and isinstance(value, numbers.Real):
            value = float(ops.budget_number(value))  # 0/1 ints stay ratios; a scalar needs no host read
        elif self.ratio and not isinstance(value, torch.Tensor):
            try:  # (a list: ratios given as 0/1 ints stay ratios; a tensor's kind is its dtype's)
                value = torch.tensor(_written_scalars(value), dtype=torch.float64, device="cpu")
            except (TypeError, ValueError) as error:
                raise ValueError(f"{self.name} must be a ratio, one per image, or one row of them per request, got "
                                 f"{value!r} ({error})") from None
        return _per_image(self.name, value, batch, ref_lengths, device, allow_ratio=self.ratio,
                          allow_count=not self.ratio)

    def settings(self) -> dict:
        return {"value": self.value}

    def replace(self, **settings) -> "FixedBudget":
        return FixedBudget(self.name, settings.get("value", self.value), self.ratio)

    def __repr__(self):
        return f"{self.name}({self.value!r})"


def fixed_ratio(ratio: PerImage) -> FixedBudget:
    """Keep ``round-half-up(ratio · L)`` tokens of each image of L tokens; ``ratio`` a float in [0, 1] or a tensor
    broadcasting to ``[B, n_refs]`` (``[n_refs]`` per image, ``[B, 1]`` per request)."""
    return _fixed_ratio(ratio, "fixed_ratio: ratio")


def _fixed_ratio(ratio: PerImage, name: str) -> FixedBudget:
    """``fixed_ratio``, its errors naming ``name`` (``as_budget``: the caller's budget)."""
    _check_per_image_setting(name, ratio)
    if isinstance(ratio, numbers.Real) and not 0.0 <= ops.budget_number(ratio) <= 1.0:  # numpy scalars too
        raise ValueError(f"{name} must lie in [0, 1], got {ratio!r}")
    return FixedBudget("fixed_ratio", ratio, ratio=True)


def fixed_count(count: PerImage) -> FixedBudget:
    """Keep ``count`` tokens of each image (clamped to its length); an int or an int tensor broadcasting to
    ``[B, n_refs]``."""
    return _fixed_count(count, "fixed_count: count")


def _fixed_count(count: PerImage, name: str) -> FixedBudget:
    """``fixed_count``, its errors naming ``name`` (``as_budget``: the caller's budget)."""
    _check_per_image_setting(name, count)
    if isinstance(count, numbers.Real) and not isinstance(count, numbers.Integral):  # numpy floats too
        raise TypeError(f"{name} must be an int >= 0, got {count!r}")
    if isinstance(count, numbers.Real) and count < 0:
        raise ValueError(f"{name} must be an int >= 0, got {count!r}")
    return FixedBudget("fixed_count", count, ratio=False)


MASS_MODES = reference.MASS_MODES


def adaptive_budget(scores: torch.Tensor, coverage: Union[float, torch.Tensor] = 0.9, floor: PerImage = 0,
                    cap: PerImage = 1.0, ref_lengths: Optional[Sequence[int]] = None, *,
                    mass: str = "auto") -> BudgetResult:
    """Adaptive budget: per reference image and per request, the smallest set of top-scored tokens whose score mass
    reaches ``coverage`` of the image's mass, clamped to ``[floor, cap]``.

    ``scores`` float ``[B, N]`` (N = sum(ref_lengths); None = one image). The mass is ``scores / sum`` for
    non-negative scores and ``softmax(scores)`` otherwise (``mass="auto"``; force one with ``"linear"`` or
    ``"softmax"``). ``coverage`` in [0, 1] (0 keeps nothing before the floor), a float or a tensor broadcasting to
    ``[B, n_refs]``. ``floor`` and ``cap`` are counts (int) or ratios of each image's length (float), scalars or
    tensors broadcasting to ``[B, n_refs]``; where floor > cap, cap wins (a ratio against a count, or tensors; a
    floor above a cap of the same kind, given as numbers, is refused as a mistake). A peaked score distribution
    keeps few tokens, a flat one many. The count is non-decreasing in ``coverage``. The mass is summed in float64 and
    compared with a slack of ``COVERAGE_TOL`` (1e-9) against rounding: tokens holding less than that share of an image's
    mass in all may be left out even at ``coverage=1`` (e.g. softmax mass of scores 30 below the top's). Host reads: the
    NaN/+inf check of the scores, and the range check of tensor settings; everything else stays on the device.
    """
    if mass not in MASS_MODES:
        raise ValueError(f"mass must be one of {MASS_MODES}, got {mass!r}")
    _check_floor_below_cap(floor, cap)
    _check_scores(scores, nan=False)
    # the NaN, +inf and sign checks from one host read of the scores' range, raised in this order
    lowest, highest = _score_range(scores)
    if math.isnan(lowest):
        raise _NaNScores("scores contain NaN")
    ref_lengths = _check_ref_lengths(ref_lengths, scores.shape[1])
    if highest == math.inf:
        raise _InfScores(f"scores contain +inf: {_InfScores.WHY}")
    if lowest < 0 and mass == "linear":
        raise ValueError("mass='linear' needs scores >= 0 (use 'softmax' or 'auto' for signed scores)")
    if mass == "auto" and not lowest < 0:  # no row has a negative score: 'auto' is linear for every row
        mass = "linear"
    cov, low, high = _adaptive_settings(coverage, floor, cap, scores.shape[0], ref_lengths, scores.device)
    # the mass keeps the scores' order: the counts and the keep mask from one ranking
    keep, counts = ops.ranked_keep_mask(scores, ref_lengths, coverage=cov, low=low, high=high, tolerance=COVERAGE_TOL,
                                        mass=mass)
    return BudgetResult(counts, keep)


def _score_range(scores: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``scores`` as Python floats, in one host read (both NaN when a score is NaN: ``aminmax``
    propagates it; ``(inf, -inf)`` when there are no scores)."""
    if not scores.numel():
        return math.inf, -math.inf
    return tuple(torch.stack(torch.aminmax(scores)).tolist())


def _adaptive_settings(coverage, floor: PerImage, cap: PerImage, batch: int, ref_lengths: Sequence[int], device):
    """``adaptive_budget``'s settings checked: ``(coverage, floor, cap)``, the counts int64 ``[B, n_refs]``, the
    coverage a Python float (given one) or a float64 ``[B, n_refs]`` tensor (its range checked with one host read)."""
    _check_coverage(coverage)
    # a narrow float's coverage as the decimal written, as the ratios are (float32's 0.3 is 0.30000001, above 0.3
    # of the mass by more than COVERAGE_TOL: one token more)
    if isinstance(coverage, torch.Tensor):
        if coverage.dtype in ops.NARROW_RATIO_DTYPES:  # (a host read)
            cov = _written_values(coverage, device)
        else:
            cov = coverage.to(device=device, dtype=torch.float64)
        if bool((~torch.isfinite(cov) | (cov < 0) | (cov > 1)).any()):
            raise ValueError(f"coverage must lie in [0, 1], got {coverage!r}")
        cov = _broadcast_per_image("coverage", cov, batch, len(ref_lengths))
    else:
        cov = float(ops.budget_number(coverage))
    return cov, _per_image("floor", floor, batch, ref_lengths, device), _per_image("cap", cap, batch, ref_lengths,
                                                                                   device)


class AdaptiveBudget:
    """``adaptive_budget`` with its settings bound: ``budget(scores, ref_lengths) -> BudgetResult``."""

    def __init__(self, coverage, floor, cap, mass):
        self.coverage, self.floor, self.cap, self.mass = coverage, floor, cap, mass

    def __call__(self, scores: torch.Tensor, ref_lengths: Optional[Sequence[int]] = None) -> BudgetResult:
        return adaptive_budget(scores, self.coverage, self.floor, self.cap, ref_lengths, mass=self.mass)

    def sized_on_mask(self, mask: torch.Tensor, ref_lengths: Sequence[int]) -> BudgetResult:
        """Counts for a selector's keep mask: ``ceil(coverage · marked)`` tokens of each image with ``marked``
        tokens in the mask (each marked token an equal share of the mass, whatever ``mass`` says), within floor
        and cap; an image with nothing marked keeps its floor (the uniform mass of an all-zero score row does not
        apply: nothing is there to cover)."""
        scores = mask.float()  # a bool mask's scores: no NaN, +inf or negative to read for
        _check_scores(scores, nan=False)
        ref_lengths = _check_ref_lengths(ref_lengths, mask.shape[1])
        cov, low, high = _adaptive_settings(self.coverage, self.floor, self.cap, mask.shape[0], ref_lengths,
                                            mask.device)
        counts = ops.ranked_keep_mask(scores, ref_lengths, coverage=cov, low=low, high=high,
                                      tolerance=COVERAGE_TOL)[1]
        marked = _image_rows(mask, ref_lengths, fill=False).sum(dim=2)  # [B, n_refs]
        counts = torch.where(marked > 0, counts, torch.minimum(low, high))
        return BudgetResult(counts, _topk_per_image(scores, ref_lengths, counts))

    def settings(self) -> dict:
        return {"coverage": self.coverage, "floor": self.floor, "cap": self.cap}

    def replace(self, **settings) -> "AdaptiveBudget":
        merged = {**self.settings(), **settings}
        return AdaptiveBudget(merged["coverage"], merged["floor"], merged["cap"], self.mass)

    def __repr__(self):
        return f"adaptive(coverage={self.coverage!r}, floor={self.floor!r}, cap={self.cap!r}, mass={self.mass!r})"


def budget_for_batch(budget, batch: int):
    """``budget`` for a batch of ``batch`` samples made of R requests of ``batch // R`` consecutive samples each
    (diffusers' ``num_images_per_prompt`` order, as a per-request budget list): a budget object's tensor settings
    with R > 1 rows (``[R, 1]`` per request, ``[R, n_refs]`` per request and image) get each row repeated over its
    request's samples. ``ValueError`` when R does not divide the batch. Other budgets are returned as is."""
    if not isinstance(budget, (FixedBudget, AdaptiveBudget)):
        return budget
    expanded = {}
    for name, value in budget.settings().items():
        rows = _request_rows(value)
        if rows is None or rows in (1, batch):
            continue
        if batch % rows:
            raise ValueError(f"budget {budget!r}: its {name} has {rows} rows (one per request), which does not "
                             f"divide the batch of {batch} samples")
        if isinstance(value, torch.Tensor):
            expanded[name] = value.repeat_interleave(batch // rows, dim=0)
        else:
            expanded[name] = [row for row in value for _ in range(batch // rows)]
    return budget.replace(**expanded) if expanded else budget


def _request_rows(value) -> Optional[int]:
    """How many rows (requests) a per-request setting has: a 2-d tensor's first dim, or a list of lists' length;
    None for other settings."""
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.ndim == 2 else None
    if isinstance(value, (list, tuple)) and value and all(isinstance(row, (list, tuple)) for row in value):
        return len(value)
    return None


def _typed_row(row) -> list:
    """A list setting's row with each entry's kind (``[1] == [1.0]`` in Python, but 1 is one token and 1.0 all)."""
    return [(type(_python_number(entry)), entry) for entry in row]


def budget_request_count(budget) -> Optional[int]:
    """How many requests a budget object's per-request settings name (their rows, R > 1; the largest where settings
    differ), or None: the other budgets name none (a per-request budget list names its own length)."""
    if not isinstance(budget, (FixedBudget, AdaptiveBudget)):
        return None
    rows = [_request_rows(value) or 0 for value in budget.settings().values()]
    return max(rows) if rows and max(rows) > 1 else None


def budget_same_per_sample(budget) -> bool:
    """Whether ``budget`` (as ``budget_for_batch`` gives it) sets every sample alike: the rows of each per-request
    setting are equal. Other budgets (numbers, lists of numbers, callables) are the same for every sample."""
    if not isinstance(budget, (FixedBudget, AdaptiveBudget)):
        return True
    for value in budget.settings().values():
        if (_request_rows(value) or 0) < 2:
            continue
        same = torch.equal(value, value[:1].expand_as(value)) if isinstance(value, torch.Tensor) else \
            all(_typed_row(row) == _typed_row(value[0]) for row in value)
        if not same:
            return False
    return True


def budget_first_sample(budget):
    """``budget`` with its per-sample tensor settings (``[B, ...]``, B > 1) cut to the first sample's row, for a
    selection made once for a batch whose samples share everything; other budgets are returned as is."""
    if not isinstance(budget, (FixedBudget, AdaptiveBudget)):
        return budget
    cut = {name: value[:1] for name, value in budget.settings().items() if (_request_rows(value) or 0) > 1}
    return budget.replace(**cut) if cut else budget


def adaptive(coverage: Union[float, torch.Tensor] = 0.9, floor: PerImage = 0, cap: PerImage = 1.0, *,
             mass: str = "auto") -> AdaptiveBudget:
    """A budget for ``select`` and ``enable``: ``adaptive_budget`` with these settings (see there). Per image and
    request, the fewest top-scored tokens whose score mass reaches ``coverage`` (a float in [0, 1], or a tensor
    broadcasting to ``[B, n_refs]``), kept between ``floor`` and ``cap`` (ratios of the image's tokens, or counts;
    one value, one per image, or a tensor); ``mass``: how scores become a distribution (``"linear"``: scores / their
    sum, ``"softmax"``, ``"auto"``: linear for rows without a negative score, else softmax)."""
    if mass not in MASS_MODES:
        raise ValueError(f"mass must be one of {MASS_MODES}, got {mass!r}")
    _check_coverage(coverage)
    for name, value in (("floor", floor), ("cap", cap)):
        _check_per_image_setting(name, value)
        for entry in _list_entries(value):  # numpy scalars too, as their kind; a list's entries before floor vs cap
            if isinstance(entry, numbers.Real):
                _check_scalar_setting(name, ops.budget_number(entry))
    _check_floor_below_cap(floor, cap)
    return AdaptiveBudget(coverage, floor, cap, mass)


def _list_entries(value) -> list:
    """The entries of nested lists (``value`` itself when it is not a list)."""
    if isinstance(value, (list, tuple)):
        return [entry for v in value for entry in _list_entries(v)]
    return [value]


def _check_floor_below_cap(floor, cap) -> None:
    """``ValueError`` for a floor above its cap where both are of one kind (two ratios or two counts, as numbers,
    per-image lists or per-request lists of them), known without the image sizes: the cap would win silently. A
    ratio against a count depends on the image's size, and there the cap wins (``adaptive_budget``), as it does for
    tensor settings."""
    def per_request(value) -> Optional[list]:  # [[per image] per request], or None for a tensor setting
        if isinstance(value, torch.Tensor):
            return None
        if _request_rows(value) is not None:
            return [list(row) for row in value]
        return [list(value)] if isinstance(value, (list, tuple)) else [[value]]

    def broadcast(a: list, b: list) -> list:  # pairs of two lists, one of which may have one entry
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return []  # (refused where the budget meets the batch or the images: lists of other lengths)
        return list(zip(a * (len(b) if len(a) == 1 else 1), b * (len(a) if len(b) == 1 else 1)))

    floors, caps = per_request(floor), per_request(cap)
    if floors is None or caps is None:
        return
    # rows per request or per sample (num_images_per_prompt), each mapped onto the batch in blocks of consecutive
    # samples: counts one of which divides the other agree on the blocks (each row repeated to the larger count);
    # others (2 and 3 rows) disagree on which samples form a request (per-image lists meet the images later)
    small, large = sorted((len(floors), len(caps)))
    if large % small:
        raise ValueError(f"floor {floor!r} and cap {cap!r} give {len(floors)} and {len(caps)} rows: per-request "
                         "settings need row counts that divide one another (one row per request, per sample, or "
                         "one for all)")
    floors, caps = ([row for row in rows for _ in range(large // len(rows))] for rows in (floors, caps))
    for request_floors, request_caps in broadcast(floors, caps):
        for f, c in broadcast(request_floors, request_caps):
            if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in (f, c)):
                continue  # (a tensor inside a list: the cap wins where it meets the batch)
            f, c = ops.budget_number(f), ops.budget_number(c)  # (numpy float32 0.3 is 0.3, as the budget reads it)
            if isinstance(f, numbers.Integral) == isinstance(c, numbers.Integral) and f > c:
                raise ValueError(f"floor {floor!r} is above cap {cap!r}: the cap would win (both "
                                 f"{'counts' if isinstance(f, numbers.Integral) else 'ratios'})")


BudgetSpec = Union[float, int, FixedBudget, AdaptiveBudget, Callable[..., BudgetResult]]


def refuse_budget_factory(budget) -> None:
    """``TypeError`` for a budget factory given uncalled (``budget=adaptive``): it is callable, so it would be taken
    for a budget callable and fail at the first selection, after the probe, with an error not naming ``budget``."""
    if any(budget is factory for factory in (adaptive, fixed_ratio, fixed_count, adaptive_budget)):
        raise TypeError(f"budget=sparsectx.selection.{budget.__name__} is a budget's factory, not a budget: call it, "
                        f"e.g. budget={_FACTORY_EXAMPLES[budget.__name__]}")


_FACTORY_EXAMPLES = {"adaptive": "adaptive(coverage=0.9)", "fixed_ratio": "fixed_ratio(0.1)",
                     "fixed_count": "fixed_count(256)", "adaptive_budget": "adaptive(coverage=0.9)"}


def as_budget(budget: BudgetSpec) -> Callable[..., BudgetResult]:
    """A float (numpy floats included) is ``fixed_ratio``, an int (numpy ints included) ``fixed_count``; a budget
    object or callable ``(scores, ref_lengths) -> BudgetResult`` is returned as is."""
    if isinstance(budget, bool) or not (isinstance(budget, numbers.Real) or callable(budget)):
        raise TypeError("budget must be a float ratio, an int count or a budget callable, got "
                        f"{type(budget).__name__}")
    refuse_budget_factory(budget)
    budget = ops.budget_number(budget)  # a numpy float32's ratio as the decimal it was written as
    # (errors name the budget as the caller wrote it, not the helper it becomes)
    if isinstance(budget, numbers.Integral):
        return _fixed_count(int(budget), f"budget {budget!r}: count")
    if isinstance(budget, numbers.Real):
        return _fixed_ratio(float(budget), f"budget {budget!r}: ratio")
    return budget


def mask_ranking(mask: torch.Tensor, reference_latents: torch.Tensor, context: SelectionContext) -> torch.Tensor:
    """float ``[B, N]``: a selector's keep mask as scores a budget can rank: the mask's tokens first, then the
    others, each part in the ``uniform`` (evenly spread) order. A budget's top-k of it caps the mask or pads it."""
    spread = _uniform_scores(reference_latents, context, _image_grid(context, reference_latents.device))
    return mask.float() + MASK_PAD_WEIGHT * spread


def apply_budget(chosen: torch.Tensor, reference_latents: torch.Tensor, context: SelectionContext,
                 budget: Optional[BudgetSpec], *, checked: bool = False) -> torch.Tensor:
    """Keep mask bool ``[B, N]`` from a selector's output ``chosen`` (scores or a keep mask) and ``budget``, per
    reference image (top-k, ties to the lower index, as ``compact_tokens``).

    ``budget``: a float (``fixed_ratio``), an int (``fixed_count`` per image), ``adaptive(...)`` or any callable
    ``(scores, ref_lengths) -> BudgetResult``; None only for a keep mask, which is then returned as is. With a
    budget, a keep mask sizes the budget (``adaptive`` keeps its ``coverage`` share of the mask's tokens, within its
    floor and cap) and ranks by ``mask_ranking``, so the budget caps it (or pads it with evenly spread tokens).
    ``checked``: ``chosen`` is a ``Selector``'s output, already checked for NaN scores (a fixed budget then skips
    its own NaN check, a host read)."""
    if budget is None:
        if chosen.dtype != torch.bool:
            raise ValueError("budget is required: the selector returned scores (budget=None keeps a selector's keep "
                             "mask as given)")
        return chosen
    budget = as_budget(budget)
    scores = chosen.float() if chosen.dtype == torch.bool else chosen
    if chosen.dtype == torch.bool and isinstance(budget, AdaptiveBudget):
        result = budget.sized_on_mask(chosen, context.ref_lengths)
    elif isinstance(budget, FixedBudget):  # a mask's scores hold no NaN either
        result = budget(scores, context.ref_lengths, nan_checked=checked or chosen.dtype == torch.bool)
    else:
        result = budget(scores, context.ref_lengths)
    if not isinstance(result, BudgetResult):
        raise ValueError(f"budget {budget!r} must return a sparsectx.selection.BudgetResult, got "
                         f"{type(result).__name__}")
    _check_budget_result(result, budget, chosen.shape, len(context.ref_lengths))
    if chosen.dtype != torch.bool:
        return result.keep
    # a keep mask: the budget is sized on the mask alone (an adaptive budget covers that share of the mask's
    # tokens), then the mask ranks first and the uniform order pads or caps it
    ranking = mask_ranking(chosen, reference_latents, context)
    return _topk_per_image(ranking, context.ref_lengths, result.counts.to(ranking.device))


def _check_budget_result(result: BudgetResult, budget, shape: torch.Size, n_refs: int) -> None:
    """``ValueError`` naming ``budget`` unless its result has the documented types and shapes (checked on the host:
    that ``keep`` holds ``counts`` tokens per image is the budget's promise, not read back)."""
    batch, n_tokens = shape
    counts, keep = result
    if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point or counts.dtype.is_complex \
            or counts.dtype == torch.bool or tuple(counts.shape) != (batch, n_refs):
        raise ValueError(f"budget {budget!r} returned counts {_described(counts)}: expected an integer tensor "
                         f"[B={batch}, n_refs={n_refs}]")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (batch, n_tokens):
        raise ValueError(f"budget {budget!r} returned keep {_described(keep)}: expected a bool tensor "
                         f"[B={batch}, N={n_tokens}]")


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} of shape {list(value.shape)}"
    return type(value).__name__


def select(reference_latents: torch.Tensor, context: SelectionContext, selector="uniform",
           budget: Optional[BudgetSpec] = 0.25) -> torch.Tensor:
    """Keep mask bool ``[B, N]`` over the reference tokens: the selector's output (scores or a keep mask), then the
    budget applied per reference image (``apply_budget``: each image keeps its own share; None only for a selector
    that returns a keep mask, returned as is; a keep mask with a budget is capped or padded to it). The drop-in
    (``sparsectx.enable``) selects the same way, after turning its list forms into budget objects and repeating
    per-request rows over each request's samples; here give a ratio, a count, or ``fixed_ratio`` / ``fixed_count`` /
    ``adaptive`` with one value, one per image, or one row per sample. A ``context.extra`` name the selector is
    known not to read (a misspelt signal, which it would ignore) is refused, as ``enable(signals=...)`` does, except
    the built-in signal names (``BUILTIN_SIGNALS``), which the automatic probe adds to a context it ran on; a
    ``user_mask`` a built-in selector does not read is warned about, as ``enable`` does."""
    selector = get_selector(selector)
    _check_selector_inputs(reference_latents, context)
    if selector.signals is not None:
        # names the built-in probe may have added to a context used before are not the user's
        unknown = sorted(name for name in context.extra if not str(name).startswith("_")
                         and name not in selector.signals and name not in BUILTIN_SIGNALS)
        if unknown:
            raise ValueError(f"selector {selector.name!r} reads no signal named {unknown} (context.extra); its "
                             f"signals are {sorted(selector.signals)}")
    # a user's mask the selector does not read (the probe never adds one): e.g. "uniform" where "edit" was meant
    unread, readers = unread_signals(selector, [name for name in USER_ONLY_SIGNALS if name in context.extra])
    if unread:
        _warn(f"selector {selector.name!r} does not read the signals {unread} in context.extra: they are unused "
              f"(the selectors that read them: {readers})", UserWarning)
    return selected_keep(selector, reference_latents, context, budget)


def check_budget_for(selector: Selector, budget) -> None:
    """``ValueError`` for a budget given to a selector that draws its own kept counts (a random drop selector: the
    budget would cap or pad each of its masks to one count, every call alike, in place of its random ratios)."""
    if budget is not None and selector.draws_kept_count:
        raise ValueError(f"selector {selector.name!r} draws how many tokens each image keeps: budget {budget!r} "
                         "would cap or pad its masks to one count at every call; pass budget=None")


def _check_budget_settings(budget, batch: int, ref_lengths: Sequence[int]) -> None:
    """A fixed or adaptive budget's settings resolved on the host for ``batch`` samples, so that a bad one is
    refused before the selector (and a probe it reads) runs. A tensor setting on a device is checked for its shape
    only here (its values are read where the budget applies them: no wait for the device here)."""
    def on_host(value):
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return torch.zeros(value.shape, dtype=value.dtype)  # (zeros: a valid ratio, count and coverage)
        return value

    if isinstance(budget, FixedBudget):
        budget.replace(value=on_host(budget.value)).counts(batch, ref_lengths, "cpu")
    elif isinstance(budget, AdaptiveBudget):
        _adaptive_settings(on_host(budget.coverage), on_host(budget.floor), on_host(budget.cap), batch, ref_lengths,
                           "cpu")


def selected_keep(selector: Selector, reference_latents: torch.Tensor, context: SelectionContext,
                  budget: Optional[BudgetSpec]) -> torch.Tensor:
    """``apply_budget(selector(reference_latents, context), ..., checked=True)`` (``select`` and the drop-in), with
    one host read fewer under an adaptive budget: it finds NaN scores in its own read of their range, and they are
    refused naming the selector all the same. Its inputs are checked by its callers (``select``; the drop-in builds
    them)."""
    check_budget_for(selector, budget)
    if budget is not None:  # a bad budget is refused before the selector (and a probe it reads) runs
        budget = as_budget(budget)
        _check_budget_settings(budget, reference_latents.shape[0], context.ref_lengths)
    elif selector.returns_scores:
        raise ValueError(f"budget is required: selector {selector.name!r} returns scores (budget=None keeps a "
                         "selector's keep mask as given)")
    checks_nan = isinstance(budget, AdaptiveBudget)
    chosen = selector(reference_latents, context, nan_check=not checks_nan)
    try:
        return apply_budget(chosen, reference_latents, context, budget, checked=True)
    except _NaNScores:
        if not checks_nan:
            raise
        raise ValueError(f"selector {selector.name!r} returned NaN scores") from None
    except _InfScores:
        raise ValueError(f"selector {selector.name!r} returned +inf scores: {_InfScores.WHY}") from None
