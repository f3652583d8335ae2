"""Random-ratio drop masks for training with Sparse Context.

The recipe: for each sample (and each reference image) draw a keep ratio r ~ U[r_min, r_max] (or pick one from a
list), keep a random r-subset of that image's reference tokens, and always keep the prefix (text and target
tokens). The model thus sees every budget it will meet at inference. Dropped tokens stay in diffusers' dense
``[B, S, H, D]`` layout; ``sparsectx.masked_attention`` skips them as keys (and, by default, as queries: their
outputs are zero, as if they had been removed from the sequence; only the prefix outputs feed the loss).

On a diffusers transformer (FLUX.1 Kontext, FLUX.2 / klein, Qwen-Image-Edit(-Plus), LongCat-Image-Edit, Bria FIBO
Edit, JoyImage-Edit-Plus)::

    enable_drop_training(transformer, ratio_range=(0.05, 1.0), generator=torch.Generator().manual_seed(0))
    transformer.train()                                                          # masks are drawn in train mode
    loss = ((transformer(**batch).sample[:, :n_target] - target) ** 2).mean()
    disable_drop_training(transformer)                                           # original processors back

``enable_drop_training`` installs sparsectx's attention processors (``sparsectx.processors``). At each forward in
training mode it finds the reference tokens (``img_ids`` / ``img_shapes``, as ``sparsectx.enable`` does), draws
one drop mask per sample and reference image, and every attention layer of that forward runs
``masked_attention`` with it. Text and target tokens are always kept (with ``ref_lengths``: the tokens it does not
count). In eval mode, or when a draw keeps every
token, the original processors run (bit-exact with the unpatched model).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from typing import Callable, Optional, Sequence

import torch

from ._warn import warn as _warn
from . import integration
from .ops import _as_device, _device_values, _eager_under_compile, _python_number, budget_number, masked_attention

DEFAULT_RATIO_RANGE = (0.05, 1.0)  # the keep ratios a trained model should handle, 5% to all tokens


def _is_int(value) -> bool:
    """A Python int (or a numpy integer, as ``_python_number`` turns it into one), not a bool."""
    value = _python_number(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A Python int or float (or a numpy number), not a bool."""
    value = _python_number(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_layout(batch, ref_lengths, n_prefix) -> list[int]:
    """``ref_lengths`` as a list of Python ints, after checking the three arguments."""
    # a value of the wrong type is a TypeError, one out of range a ValueError
    if not _is_int(batch):
        raise TypeError(f"batch must be an int >= 0, got {batch!r}")
    if batch < 0:  # (an empty batch, e.g. a data-parallel rank's last split: an empty mask)
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if not isinstance(ref_lengths, (list, tuple)) or not all(_is_int(n) for n in ref_lengths):
        raise TypeError(f"ref_lengths must be a non-empty list of positive ints, got {ref_lengths!r}")
    if not ref_lengths or not all(n > 0 for n in ref_lengths):
        raise ValueError(f"ref_lengths must be a non-empty list of positive ints, got {ref_lengths!r}")
    if not _is_int(n_prefix):
        raise TypeError(f"n_prefix must be an int >= 0, got {n_prefix!r}")
    if n_prefix < 0:
        raise ValueError(f"n_prefix must be an int >= 0, got {n_prefix!r}")
    return [int(n) for n in ref_lengths]


def _check_ratio_range(ratio_range) -> tuple[float, float]:
    if not isinstance(ratio_range, (tuple, list)) or len(ratio_range) != 2 \
            or not all(_is_real(r) for r in ratio_range) \
            or not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
        raise ValueError(f"ratio_range must be (r_min, r_max) with 0 <= r_min <= r_max <= 1, got {ratio_range!r}")
    # (a narrow numpy float as the decimal written, as the ops' budgets read it: np.float32(0.45) keeps 0.45's count)
    return float(budget_number(ratio_range[0])), float(budget_number(ratio_range[1]))


def _check_ratios(ratios, ratio_range) -> None:
    """``ratios`` replace the draw from ``ratio_range``: a range other than the default given with them would be
    ignored, so it is refused."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios \
            or not all(_is_real(r) and 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of keep ratios in [0, 1], got {ratios!r}")
    if _check_ratio_range(ratio_range) != DEFAULT_RATIO_RANGE:
        raise ValueError(f"ratio_range {tuple(ratio_range)!r} and ratios {list(ratios)!r} were both given: the ratios "
                         "replace the range (which would be ignored); give one of them")


def _check_draw_settings(generator, per_image, ratio_range) -> None:
    """The types of a draw's generator and per_image, and the ratio range (checked even when ``ratios`` replace it:
    a bad range is a mistake either way)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _check_python_bool("per_image", per_image)
    _check_ratio_range(ratio_range)


def _check_python_bool(name: str, value) -> None:
    """``TypeError`` unless ``value`` is a Python bool (a numpy bool is named with its module: "must be a bool, got
    bool" read as a paradox)."""
    if not isinstance(value, bool):
        kind = type(value)
        raise TypeError(f"{name} must be a Python bool, got "
                        f"{kind.__name__ if kind.__module__ == 'builtins' else kind.__module__ + '.' + kind.__name__}")


def _draw_ratios(shape: tuple, ratio_range, ratios, generator, device) -> torch.Tensor:
    """float64 keep ratios of ``shape``: from ``ratios`` (uniform choice) if given, else U[r_min, r_max]."""
    if ratios is not None:
        _check_ratios(ratios, ratio_range)
        pick = torch.randint(len(ratios), shape, generator=generator, device=device)
        return _device_values([float(budget_number(r)) for r in ratios], torch.float64, device)[pick]
    low, high = _check_ratio_range(ratio_range)
    return low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def random_drop_mask(batch: int, ref_lengths: Sequence[int], n_prefix: int,
                     ratio_range: tuple = DEFAULT_RATIO_RANGE, generator: Optional[torch.Generator] = None, *,
                     ratios: Optional[Sequence[float]] = None, per_image: bool = True,
                     device=None) -> torch.Tensor:
    """Keep mask bool ``[B, S]`` for the dense layout ``S = n_prefix + sum(ref_lengths)``: the first ``n_prefix``
    tokens (text + target) are always kept; reference image i (``ref_lengths[i]`` tokens, in order after the
    prefix) keeps ``round-half-up(r · L_i)`` tokens chosen uniformly at random.

    ``r`` is drawn per sample and, with ``per_image=True``, per reference image: from U[``ratio_range``] or, when
    ``ratios`` is given, uniformly from that list. Everything is drawn from ``generator`` (on its device; the mask is
    then moved to ``device``, default the generator's device), so a seed fixes the mask.
    """
    ref_lengths = _check_layout(batch, ref_lengths, n_prefix)
    _check_draw_settings(generator, per_image, ratio_range)
    if device is not None:
        device = _as_device(device)
    draw_device = generator.device if generator is not None else torch.device(device or "cpu")
    n_refs = len(ref_lengths)
    rates = _draw_ratios((batch, n_refs if per_image else 1), ratio_range, ratios, generator, draw_device)
    lengths = _device_values(ref_lengths, None, draw_device)
    counts = torch.minimum(torch.floor(rates * lengths + 0.5).long(), lengths)  # [B, n_refs]
    # (float32 whatever torch's default dtype: a seed fixes the mask)
    noise = torch.rand((batch, sum(ref_lengths)), generator=generator, device=draw_device, dtype=torch.float32)
    keep = torch.ones((batch, n_prefix + sum(ref_lengths)), dtype=torch.bool, device=draw_device)
    start = n_prefix
    for i, length in enumerate(ref_lengths):
        part = noise[:, start - n_prefix:start - n_prefix + length]
        # rank of each token's random key inside its image: the `count` smallest ranks are a uniform subset
        rank = torch.empty_like(part, dtype=torch.long).scatter_(
            1, torch.argsort(part, dim=1), torch.arange(length, device=draw_device).expand(batch, -1))
        keep[:, start:start + length] = rank < counts[:, i:i + 1]
        start += length
    return keep.to(device) if device is not None else keep


def random_drop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref_lengths: Sequence[int],
                          n_prefix: int, ratio_range: tuple = DEFAULT_RATIO_RANGE,
                          generator: Optional[torch.Generator] = None, *, ratios: Optional[Sequence[float]] = None,
                          per_image: bool = True, keep_mask: Optional[torch.Tensor] = None,
                          drop_queries: bool = True, softmax_scale: Optional[float] = None):
    """Attention of the dense layout ``q, k, v [B, S, H, D]`` with a random drop mask (``random_drop_mask``, or
    ``keep_mask`` when given) through ``sparsectx.masked_attention``. Returns ``(out [B, S, H, D], keep_mask)``.

    Dropped tokens are never keys; with ``drop_queries`` they are not computed as queries either (zero output, no
    cost), which equals removing them from the sequence. Gradients flow to q, k and v: zero at dropped tokens for k
    and v, and for q with ``drop_queries`` (without it, dropped tokens are queries and get q's gradient). Use the same
    ``keep_mask`` in every layer of one step: pass the returned mask on. An empty batch (B=0) gives empty outputs.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a [B, S, H, D] tensor, got {type(q).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be a [B, S, H, D] tensor, got shape {tuple(q.shape)}")
    if not isinstance(drop_queries, bool):  # ("no" was read as True)
        raise TypeError(f"drop_queries must be a bool, got {type(drop_queries).__name__}")
    # the draw's settings are checked with a keep_mask too (which they do not draw): a bad one is a mistake either way
    _check_draw_settings(generator, per_image, ratio_range)
    if ratios is not None:
        _check_ratios(ratios, ratio_range)
    batch, seq = q.shape[:2]
    ref_lengths = _check_layout(batch, ref_lengths, n_prefix)
    if n_prefix + sum(ref_lengths) != seq:
        raise ValueError(f"n_prefix + sum(ref_lengths) = {n_prefix + sum(ref_lengths)} must equal q's sequence "
                         f"length S={seq}")
    if keep_mask is None:
        keep_mask = random_drop_mask(batch, ref_lengths, n_prefix, ratio_range, generator, ratios=ratios,
                                     per_image=per_image, device=q.device)
    elif not isinstance(keep_mask, torch.Tensor):  # (masked_attention's own errors would name its key_mask)
        raise TypeError(f"keep_mask must be None or a bool [B, S] tensor, got {type(keep_mask).__name__}")
    elif keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != (batch, seq) or keep_mask.device != q.device:
        raise ValueError(f"keep_mask must be a bool [B={batch}, S={seq}] tensor on {q.device}, got "
                         f"{keep_mask.dtype} {tuple(keep_mask.shape)} on {keep_mask.device}")
    out = masked_attention(q, k, v, keep_mask, query_mask=keep_mask if drop_queries else None,
                           softmax_scale=softmax_scale)
    return out, keep_mask


def random_drop_selector(ratio_range: tuple = DEFAULT_RATIO_RANGE, generator: Optional[torch.Generator] = None, *,
                         ratios: Optional[Sequence[float]] = None, per_image: bool = True) -> Callable:
    """A selector that draws ``random_drop_mask``'s reference part, for training with the dropped reference tokens
    removed from the whole sequence (give it ``budget=None``: a budget, which would cap or pad its masks to one
    count, is refused). Each image keeps ``round-half-up(r · L)`` of its L tokens, r drawn per sample
    (and per image with ``per_image``) from U[``ratio_range``] or, when ``ratios`` is given, uniformly from that
    list::

        sparsectx.enable(transformer, budget=None, selector=random_drop_selector((0.05, 1.0), generator))
        transformer.train()
        loss = ((transformer(**batch)[0][:, :n_target] - target) ** 2).mean()  # a new mask at each forward

    The drop-in then runs every block (MLPs and projections too) on the target, text and kept reference tokens only,
    as at inference. With ``skip_dropped_queries`` (the default) drop training (``enable_drop_training``) computes
    the same target and text outputs and the same gradients, but carries the dropped tokens through every layer.
    A transformer enabled alone selects anew at each forward in train mode (even on input tensors given before),
    and a recomputation of that forward (a checkpoint around the transformer, reentrant or not) reuses its selection and
    moves torch's global generators as the selection did (so a LoRA adapter's dropout after it redraws the forward's
    masks).
    Samples that share their references share one draw (the batch runs as one group); other samples run as one group
    each (FLUX.2 with ``attention="sparsectx"``: packed into one sequence when they share their timestep). Draws
    come from ``generator`` (on its device); without one, from a generator seeded once from the drop-in's first
    selection (``enable(..., seed=...)``: the drop-in hands each selection a fresh generator of that seed, which
    would repeat one mask at every step), or from torch's global generator when the drop-in has no seed.
    """
    _check_draw_settings(generator, per_image, ratio_range)
    if ratios is not None:
        _check_ratios(ratios, ratio_range)
    ratio_range, ratios = tuple(ratio_range), None if ratios is None else list(ratios)
    seeded = []  # the generator seeded from the drop-in's first selection, when none is given

    def random_drop(reference_latents: torch.Tensor, context) -> torch.Tensor:
        draws = generator
        if draws is None and context.generator is not None:
            if not seeded:
                seeded.append(torch.Generator(context.generator.device).manual_seed(context.generator.initial_seed()))
            draws = seeded[0]
        return random_drop_mask(reference_latents.shape[0], context.ref_lengths, 0, ratio_range, draws,
                                ratios=ratios, per_image=per_image, device=reference_latents.device)

    random_drop.draws_kept_count = True  # a budget with it is refused (it would replace the random ratios)
    return random_drop


# ----------------------------------------------------------------------------------------------------------------
# drop training on a diffusers transformer
# ----------------------------------------------------------------------------------------------------------------
class _DropTrainingPatch(integration.ForwardPatch):
    """Draws the drop mask of each training forward and hands it to the processors through their shared state."""

    attr = integration.DROP_TRAINING_ATTR

    def __init__(self, transformer: torch.nn.Module, family: str):
        super().__init__(transformer, family)
        from . import processors  # deferred: imports diffusers' model modules

        self.state = processors.AttentionState(delegate_when_unmasked=True)
        self.original_processors = processors.install_processors(transformer, self.state)
        self.ratio_range = DEFAULT_RATIO_RANGE
        self.ref_lengths: Optional[list] = None
        self.generator: Optional[torch.Generator] = None
        self.recent = integration.RecentForwards()  # records: each forward's (mask, kept prefix), for recomputation
        # host masks of the latest draws (latest last), recognised in a recomputation's redraw, and the
        # skip_dropped_queries each of those forwards ran with
        self.recent_draws: collections.deque = collections.deque(maxlen=integration.RECENT_FORWARDS)
        self.recent_draw_skips: collections.deque = collections.deque(maxlen=integration.RECENT_FORWARDS)
        self.last_keep: Optional[torch.Tensor] = None  # the latest forward's image keep mask (last_drop_mask)
        self.warned_eval = False  # warned once that a forward with gradients in eval mode dropped nothing

    def uninstall(self) -> None:
        self.recent.release("disable_drop_training")
        super().uninstall()
        from . import processors

        processors.restore_processors(self.transformer, self.original_processors, self.state)
        self.state.image_keep, self.state.image_kept_prefix = None, 0
        self.recent_draws.clear()
        self.recent_draw_skips.clear()
        self.last_keep = None

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # (without fullgraph, dynamo runs this function eagerly, and compiles the model's forward it calls)
            raise RuntimeError("torch.compile(transformer, fullgraph=True) can not trace drop training's mask draw "
                               "(host-side, once per forward, in train and eval mode alike): compile the blocks "
                               "instead (transformer.compile_repeated_blocks(fullgraph=True)) or compile without "
                               "fullgraph")
        call = self.bind(args, kwargs)
        recomputing = integration.in_backward()  # inside a backward pass: a checkpoint's recomputation
        if recomputing or self.transformer.training:
            # a recomputation gets its forward's mask whatever the mode is now (an eval pass, or train(), may come
            # between a forward and its backward)
            mask = self._mask_for(call, recomputing)
        else:
            mask = (None, 0)
            self._note_eval_forward(call)
        if mask[0] is not None:
            self._reinstall_replaced_processors()
            if torch.is_grad_enabled():
                integration.refuse_composable_checkpoint(self.transformer, "drop training")
        if not recomputing:  # last_drop_mask: the latest forward's mask, not that of a forward recomputed since
            self.last_keep = mask[0]
        # the processors read this forward's mask while it runs (and not after: an attention layer called on its
        # own later, in eval mode, ran with it); gradient checkpointing recomputes blocks during backward, possibly
        # after other forwards drew other masks or settings changed: each checkpointed block of this forward runs
        # (and is recomputed) with this forward's mask and settings, and only while drop training is still enabled
        # (a recomputed forward also runs with its forward's skip_dropped_queries, which enabling again may change)
        skip = mask[2] if len(mask) > 2 else self.state.skip_dropped_queries
        scope = integration.state_scope(self.state, image_keep=mask[0], image_kept_prefix=mask[1],
                                        skip_dropped_queries=skip)
        with scope(), self.checkpointed_in(functools.partial(self._enabled_scope, scope, mask[0] is not None)):
            return self.original_forward(**call)

    def _reinstall_replaced_processors(self) -> None:
        """Before a forward that drops tokens: processors set on the transformer since enable (``set_attn_processor``,
        ``unload_ip_adapter``, ``from_pipe``) would ignore the mask, so sparsectx's go back over them (they become
        the originals disable restores); processors sparsectx can not replace raise ``RuntimeError``."""
        from . import processors

        if processors.processors_installed(self.transformer, self.original_processors):
            return
        unsupported = processors.unsupported_processors(self.transformer)
        if unsupported:
            raise RuntimeError(f"drop training: attention processors {unsupported} were set on the transformer after "
                               "enable_drop_training and can not attend with its drop mask; set them before "
                               "enabling, or disable drop training first")
        processors.restore_processors(self.transformer, self.original_processors, self.state)
        self.original_processors = processors.install_processors(self.transformer, self.state)

    @contextlib.contextmanager
    def _enabled_scope(self, scope: Callable, masked: bool):
        """``scope()`` for a recomputed block; a forward that dropped tokens needs drop training still enabled (a
        forward that kept every token ran the original processors, which disable puts back) and sparsectx's
        processors, which go back over any set since that forward (``set_attn_processor`` before the backward),
        as before a forward."""
        if masked and getattr(self.transformer, self.attr, None) is not self:
            raise RuntimeError("drop training was disabled between a forward and its backward: gradient "
                               "checkpointing recomputes that forward's blocks with its drop mask, which needs "
                               "sparsectx's processors; call disable_drop_training after the backward")
        if masked:
            self._reinstall_replaced_processors()
        with scope():
            yield

    def _note_eval_forward(self, call: dict) -> None:
        """An eval-mode forward that may be recomputed (gradients on, outside a backward: a checkpoint around the
        transformer, then ``train()`` before its backward) is remembered as one that dropped nothing, unless a live
        forward on the same input is remembered (a training forward whose backward may still come, and an eval
        forward with gradients between, e.g. a validation loss). Warns once that such a forward of a model with
        trainable parameters drops nothing (drop training draws in train mode only)."""
        hidden = call["hidden_states"]
        if not torch.is_grad_enabled() or hidden.is_inference() or integration._func_wrapped(hidden):
            return  # (a torch.func transform's forward: no checkpoint recomputes it)
        key = integration.RecentForwards.key(hidden)
        if self.recent.find(key) is None:
            self.recent.remember(key, integration.RecentForward(weakref.ref(hidden), (None, 0), training=False,
                                                                patched=False, in_checkpoint=False))
        if not self.warned_eval and any(p.requires_grad for p in self.transformer.parameters()):
            self.warned_eval = True
            _warn("drop training: a forward with gradients ran in eval mode and dropped no reference token "
                  "(masks are drawn in train mode only): call transformer.train() to train with drop masks (or "
                  "run evaluation under torch.no_grad())", UserWarning)

    @_eager_under_compile  # host work (generator draws, input keys, the ids' layout): eager under torch.compile,
    # which would split it into many small graphs, each recompiled for new resolutions
    def _mask_for(self, call: dict, recomputing: bool) -> tuple:
        """The drop mask of a training forward, ``(mask, kept prefix)``: a new draw, except for a forward that a
        checkpoint around the whole transformer (``torch.utils.checkpoint``) recomputes during backward
        (``recomputing``), which gets the mask its first run drew (and, third, the ``skip_dropped_queries`` it ran
        with), in whichever mode the model is now (found by its input tensor: the same live tensor
        storage and version; a user's generator is not part of the RNG state checkpointing restores, so a redraw
        would give another mask; an eval-mode forward run with gradients is remembered as keeping every token) and
        moves torch's global generators as that draw did (``integration.replay_draw``: the code after the draw
        inside the checkpoint, e.g. a LoRA adapter's dropout, draws what it drew in the forward). A recomputation
        whose forward can not be told (its input was made inside the checkpoint, two forwards took the same input
        tensor, or it ran in eval mode under ``no_grad``, as a reentrant checkpoint runs it) redraws in train mode:
        without a generator the draw comes from torch's global CPU RNG, which the checkpoint restores
        (``preserve_rng_state=True``, its default), so it is that forward's mask, recognised among the recent
        forwards' masks; otherwise (a generator, or the RNG state not restored) a warning says its gradients are
        computed with another mask. Such a recomputation in eval mode keeps every token."""
        hidden = call["hidden_states"]
        # made under torch.inference_mode: no version counter, and no backward to come; a torch.func transform's
        # tensor: no storage to key it by (its masked attention then refuses the transform by name)
        if hidden.is_inference() or integration._func_wrapped(hidden):
            return self._draw_mask(call)[0] if self.transformer.training else (None, 0)
        key = integration.RecentForwards.key(hidden)
        entry = self.recent.find(key)
        if recomputing:
            if entry is not None and not entry.ambiguous:
                entry.recomputed = True  # a later forward on the same input is no longer ambiguous
                integration.replay_draw(entry.drawn)  # the global RNG as the forward's draw left it
                return entry.record
            if not self.transformer.training:
                return None, 0
            mask, host = self._draw_mask(call)
            draws = zip(reversed(self.recent_draws), reversed(self.recent_draw_skips))
            for drawn, skip in draws if self.generator is None else ():
                if _same_draw(host, drawn):  # the restored global RNG drew that forward's mask again
                    return (*mask, skip)  # (and it ran with the skip_dropped_queries of then)
            _warn("drop training: a training forward ran during backward (a torch.utils.checkpoint "
                  "recomputation) and its forward's drop mask can not be told ("
                  + ("two forwards took the same hidden_states tensor" if entry is not None else
                     "its hidden_states tensor was made inside the checkpointed function, or its forward "
                     "ran in eval mode under no_grad")
                  + "): it is recomputed with another mask and its gradients are wrong. Pass a distinct "
                  "hidden_states tensor to each checkpointed forward, as an argument of the checkpoint, or "
                  "draw from torch's global RNG (generator=None) under a checkpoint that restores it.",
                  RuntimeWarning)
            return entry.record if entry is not None else mask
        before = integration.rng_states(hidden.device)
        mask, host = self._draw_mask(call)
        self.recent_draws.append(host)
        self.recent_draw_skips.append(self.state.skip_dropped_queries)
        # ambiguous when an earlier forward on this input was not recomputed
        self.recent.remember(key, integration.RecentForward(
            weakref.ref(hidden), (*mask, self.state.skip_dropped_queries), training=True, patched=mask[0] is not None,
            in_checkpoint=mask[0] is not None and integration.reentrant_forward(),
            ambiguous=entry is not None and not entry.recomputed,
            drawn=integration.drawn_rng(hidden.device, before)))
        return mask

    def _reference_rows(self, call: dict, n_image: int):
        """``(host positions of the reference tokens in the image sequence, tokens per reference image)`` or None."""
        if self.ref_lengths is not None:
            total = sum(self.ref_lengths)
            if total > n_image:
                raise ValueError(f"ref_lengths {self.ref_lengths} hold {total} tokens but the image sequence has "
                                 f"{n_image}")
            return torch.arange(n_image - total, n_image, device="cpu"), self.ref_lengths
        layout = integration.reference_layout(self.family, call)
        if layout is None:
            return None
        return layout.ref_host, layout.ref_lengths

    def _draw_mask(self, call: dict) -> tuple[tuple[Optional[torch.Tensor], int], Optional[torch.Tensor]]:
        """``((mask, kept prefix), host mask)``: the bool ``[B, S_image]`` keep mask of the image sequence (target
        tokens kept) on the model's device, or None when all are kept; the number of leading image tokens it always
        keeps (the tokens before the first reference); the mask on the host (None when drawn on a device).

        The mask is drawn where the generator lives, on the host without one: the host then builds and checks it and
        queues its copy to the device, reading nothing back (a CUDA generator draws on its device, the positions are
        queued there, and the check that a draw dropped something reads it once)."""
        if call.get("kv_cache_mode") is not None:
            raise ValueError("drop training does not support the FLUX.2 reference KV cache (kv_cache_mode="
                             f"{call['kv_cache_mode']!r})")
        hidden = call["hidden_states"]
        batch, n_image = hidden.shape[:2]
        rows = self._reference_rows(call, n_image)
        if rows is None:
            return (None, 0), None
        positions, lengths = rows
        ref_keep = random_drop_mask(batch, list(lengths), 0, self.ratio_range, self.generator)
        image_keep = torch.ones((batch, n_image), dtype=torch.bool, device=ref_keep.device)
        image_keep[:, _device_values(positions, None, ref_keep.device)] = ref_keep
        if bool(image_keep.all()):
            return (None, 0), None
        first_ref = int(positions.min())
        if image_keep.device.type == "cpu":
            return (_device_values(image_keep, None, hidden.device), first_ref), image_keep
        return (image_keep.to(hidden.device), first_ref), None


def _same_draw(host: Optional[torch.Tensor], other: Optional[torch.Tensor]) -> bool:
    """Whether two host-drawn masks (None: every token kept) are the same draw."""
    if host is None or other is None:
        return host is other
    return host.shape == other.shape and torch.equal(host, other)


def enable_drop_training(transformer, ratio_range: tuple = DEFAULT_RATIO_RANGE,
                         ref_lengths: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                         skip_dropped_queries: bool = True):
    """Trains ``transformer`` (a diffusers FLUX.1 / FLUX.2 / Qwen-Image / LongCat-Image / Bria FIBO / JoyImage-Edit-Plus
    transformer, or a pipeline holding one) with random-ratio drop masks of its reference tokens.

    At each forward in training mode, each sample keeps ``round-half-up(r · L_i)`` random tokens of reference image
    i, r ~ U[``ratio_range``] drawn per sample and image from ``generator`` (``random_drop_mask``; without one, from
    torch's global CPU generator). A mask drawn on the host is checked there and its copy to the device is queued:
    a forward then reads back from the device only FLUX's ``img_ids`` (one copy, to locate the references; nothing
    with Qwen-Image's ``img_shapes`` or with ``ref_lengths``). Every attention
    layer of that forward attends only to the kept tokens (``sparsectx.masked_attention``). Text and target tokens
    are always kept (with ``ref_lengths``, the tokens it does not count: it is not checked against the ids, which
    would cost a host read). Dropped tokens stay in the tensors; with ``skip_dropped_queries`` they are not computed as
    queries either (their attention output is zero), which equals removing them from the sequence for the target
    and text outputs. The reference tokens are found as ``sparsectx.enable`` finds them (``img_ids`` first axis,
    ``img_shapes``); ``ref_lengths`` overrides that: the references are then the last ``sum(ref_lengths)`` tokens
    of the image sequence, in that order.

    In eval mode (or when a draw keeps every token) the original processors run: the output equals the unpatched
    model's. Gradients flow as through the original model (LoRA / peft adapters included). With gradient checkpointing
    (``enable_gradient_checkpointing``), each block is recomputed with the mask of the forward that ran it, even when
    other forwards (micro-batches, an eval pass) came before the backward. Enabling again replaces the settings.
    Returns ``transformer``.
    """
    _check_ratio_range(ratio_range)
    if ref_lengths is not None:
        ref_lengths = _check_layout(1, ref_lengths, 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _check_python_bool("skip_dropped_queries", skip_dropped_queries)
    _, model, family = integration._split_target(transformer)
    if family in (integration.FLUX3, integration.QWEN21, integration.JOYEDIT, integration.ZIMAGE, integration.GLM):
        raise TypeError("drop training's masked attention covers FLUX.1, FLUX.2, Qwen-Image, LongCat-Image, Bria "
                        "FIBO and JoyImage-Edit-Plus; on FLUX.3, Qwen-Image 2.1, JoyImage-Edit, Z-Image Omni and "
                        "GLM-Image, train with the dropped references removed: "
                        "sparsectx.enable(transformer, budget=None, selector=sparsectx.random_drop_selector("
                        "ratio_range, generator)) on the transformer in train mode draws a new mask at each forward")
    integration._check_enable_target(model, family)  # (a diffusers too old; Qwen-Image-Layered, as enable refuses)
    if getattr(model, integration.PATCH_ATTR, None) is not None:
        raise RuntimeError("sparsectx.enable is active on this transformer; call sparsectx.disable first (drop "
                           "training and the drop-in do not run together: disable one before enabling the other)")
    with integration.transformer_lock(model):  # (a forward running in another thread finishes as it started)
        patch = getattr(model, integration.DROP_TRAINING_ATTR, None)
        if patch is None:
            patch = _DropTrainingPatch(model, family)
            patch.install()
        patch.ratio_range, patch.ref_lengths, patch.generator = tuple(ratio_range), ref_lengths, generator
        patch.state.skip_dropped_queries = skip_dropped_queries
    return transformer


def disable_drop_training(transformer):
    """Restores the original forward and attention processors (the same objects); when drop training is not
    enabled, only puts back the diffusers processors of sparsectx processors set back by hand since their install was
    taken off. Returns ``transformer``."""
    _, model, _ = integration._split_target(transformer)
    with integration.transformer_lock(model):
        patch = getattr(model, integration.DROP_TRAINING_ATTR, None)
        if patch is not None:
            patch.uninstall()
        else:
            integration.restore_stale_processors(model)
    return transformer


def last_drop_mask(transformer) -> Optional[torch.Tensor]:
    """The bool ``[B, S_image]`` keep mask of the image sequence (target tokens kept) that the latest forward of a
    transformer under drop training used, or None: it kept every token (eval mode, or a draw that dropped nothing),
    no forward ran yet, or drop training is not enabled. A copy: the forward's own mask is what a checkpointed
    recomputation during backward reads again (changed in place, it would recompute with another mask)."""
    _, model, _ = integration._split_target(transformer)
    patch = getattr(model, integration.DROP_TRAINING_ATTR, None)
    keep = patch.last_keep if patch is not None else None
    return keep.clone() if keep is not None else None


def is_drop_training_enabled(transformer) -> bool:
    """Whether ``enable_drop_training`` is on for ``transformer`` (a pipeline or its transformer)."""
    _, model, _ = integration._split_target(transformer)
    return getattr(model, integration.DROP_TRAINING_ATTR, None) is not None


class GeneratorState:
    """A ``torch.Generator`` as an object with ``state_dict`` / ``load_state_dict``, for checkpointing the drop masks'
    generator with the rest of a training run, e.g. ``accelerator.register_for_checkpointing(GeneratorState(g))``
    (accelerate refuses a bare generator): a run resumed with ``load_state`` then draws the masks the uninterrupted
    run would have drawn, where re-seeding the generator replays the first steps' masks."""

    def __init__(self, generator: torch.Generator):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def state_dict(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "generator_state" not in state_dict:
            raise ValueError("state_dict must be what GeneratorState.state_dict() returns (a dict with "
                             f"'generator_state'), got {state_dict!r:.80}")
        try:
            self.generator.set_state(state_dict["generator_state"])
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"state_dict['generator_state'] is not a state of this generator ({exc})") from None
