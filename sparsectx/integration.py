"""Drop-in Sparse Context for diffusers pipelines: FLUX.1 Kontext, FLUX.2 / klein (+ reference KV cache),
Qwen-Image-Edit(-Plus), FLUX.3 (its modular pipelines), Qwen-Image 2.1, LongCat-Image-Edit, Bria FIBO Edit,
JoyImage-Edit(-Plus), Z-Image Omni, GLM-Image.

```python
sparsectx.enable(pipe, budget=0.1, selector="random", seed=0)   # a pipeline or a bare transformer
sparsectx.enable(pipe, budget=0.1, attention="sparsectx")       # attention by sparsectx's kernel
image = pipe(image=[ref1, ref2], prompt=...).images[0]
sparsectx.disable(pipe)                                          # the original forward, bit-exact
with sparsectx.sparse_context(pipe, budget=0.25): ...            # enabled inside the block only
pipe(..., attention_kwargs={"sparsectx": {"budget": 0.05}})      # per-call override (budget and/or selector)
```

How it works. ``enable`` wraps the transformer's ``forward``. When the image sequence that reaches it holds
reference tokens (FLUX.1/FLUX.2: the first axis of ``img_ids`` is non-zero, one value per reference image;
LongCat-Image: the same with the target on plane 1; Bria FIBO Edit: as FLUX.1; Qwen-Image: ``img_shapes`` lists the
references after the target; JoyImage-Edit-Plus: ``shape_list`` does, its rows patches; JoyImage-Edit: its latents'
items, the reference before the target), the wrapper

1. scores the reference tokens with the selector and keeps each image's budget of them (top-k per image);
2. removes the dropped rows from ``hidden_states`` and from the position information (``img_ids`` rows; for
   Qwen-Image the rows of the RoPE table that ``pos_embed`` builds from ``img_shapes``, and ``modulate_index``
   shortened to match when ``zero_cond_t``; for JoyImage-Edit-Plus ``shape_list`` rewritten to the kept counts and
   the kept rows of its RoPE tables served by ``sparsectx.joyimage.kept_rope_rows``), so dropped tokens leave every
   block, MLP included; a key mask in the
   attention kwargs (``attention_mask``: Bria FIBO Edit's prompt padding) loses the dropped columns too;
3. runs the original forward on the shorter sequence and writes its rows back at their original positions
   (reference rows of the output are zeros: pipelines only read the target rows). When every token is kept, the
   original forward runs unchanged (after the layout is read: a Qwen-Image batch whose samples list images of
   other sizes is refused even then, as at any budget; diffusers runs it on sample 0's RoPE, with a warning).

FLUX.3 takes its references as an input of their own (``image_cond_hidden_states`` with ``image_cond_ids``, ``l``
one value per reference image): the dropped rows are removed from those two, and as its output holds the target
rows only, nothing is written back. Qwen-Image 2.1 builds its joint sequence (text and condition images interleaved,
block-causal) inside its forward: once rows are dropped the wrapper runs ``sparsectx.qwen21.compacted_forward``, the
model's forward on the sequence without them. JoyImage-Edit patchifies its latents' items inside its forward: the
wrapper runs ``sparsectx.joyimage.compacted_edit_forward``, its forward with the kept patch rows taken after the
patch embedding. Z-Image Omni takes per-sample image lists and patchifies them inside its forward: the wrapper
removes each sample's dropped rows right after the model's own ``patchify_and_embed_omni`` and reads the target back
for its ``unpatchify`` (``sparsectx.zimage.compacted``), the whole batch in one forward (the model runs each sample
as a sequence of its own); its ``hidden_states`` is a stand-in made by sparsectx, the images' patch rows. GLM-Image
holds its references in a KV cache that one forward per reference image writes (``kv_caches`` in ``"write"`` mode,
the image's latents alone) before the denoising loop: the wrapper runs each such forward on the image's kept rows
(``sparsectx.glmimage.compacted``), so the cache holds the kept tokens and the steps, which read it, run unchanged
(a step whose samples' cache slots differ in length runs one forward per slot); each reference image is selected
in its own write forward (a per-image budget's entry by the image's place in its sample slot).

The selection is computed once per pipeline call and reused at every step (and by the CFG branch), with every
index derived from it (the plan: layout, keep mask, kept rows, output rows). The first step reads the device
several times (layout, selection); a later step reads it once, to check that its reference latents and ids are
those the plan was made for (different ones, or a new pipeline call, plan again); a cached step of the FLUX.2
klein KV cache, whose sequence holds no reference token, reads nothing. Steady-state steps thus stall the GPU queue
once at most (``sparsectx.diagnostics.count_host_reads`` shows it).

Where a call starts: ``enable(pipe)`` marks each pipeline call, so both branches of classifier-free guidance use
the selection made on the first transformer call (the positive prompt); a pipeline that batches both branches in one
forward (Bria FIBO Edit, JoyImage-Edit-Plus: negative samples first; Z-Image Omni: positive first;
``_BATCHED_GUIDANCE``) is selected on its positive samples, whose selection the negative ones share, also at the
steps that run the positive samples alone (Z-Image's ``cfg_truncation``). A transformer enabled on its own (or a
pipeline sharing an enabled transformer, e.g. made with ``from_pipe``) can not see calls: there a selection is kept
per prompt-embedding tensor (``encoder_hidden_states``) and its version as well, so a new prompt, or one written
in place into the same tensor (also with the same values: a static buffer refilled at every step selects at every
step), selects again, and each guidance branch gets the selection made on its own prompt.
(A tensor made under ``torch.inference_mode`` has no version counter: written in place there, it keeps its
selection; pass a new tensor, or enable again, which selects anew.) A batch whose samples share their references
is selected once (on its first sample) unless a per-sample signal differs or, when the selector reads the attention
probe, the prompts differ. The probe's target queries come from that first sample's noisy latents, so with a
selector that reads them (``attention``, and ``subject``/``edit`` when they use the probe) the tokens every sample
keeps, and hence its image, depend on which sample came first (e.g. the images of ``num_images_per_prompt``); run
requests separately where each must be selected on its own latents.

Batches: FLUX.1/FLUX.2 share one RoPE table (``img_ids[0]``) and Qwen-Image one ``img_shapes`` entry across the
batch, so samples that keep different tokens (per-request budgets, per-sample selection) can not stay one dense
batch. With ``attention="sparsectx"`` on FLUX.2, whose modulation depends only on (timestep, guidance), they run
as one packed sequence (a batch of 1: every sample's text tokens, then every sample's kept image tokens, with
their own ids; the processors attend within each sample through ``cu_seqlens``, no padding) whenever the samples
share their timestep and guidance; otherwise (FLUX.1 with its per-prompt pooled embedding, Qwen-Image, native
attention, the KV extract step, per-sample timesteps) they run as separate groups of equal keep masks, each exact.
Samples with equal masks (the common case: one budget, references repeated over the batch) run as one batch.

Attention on the compacted sequence: ``enable(..., attention="native")`` (default) keeps the transformer's own
processors (diffusers' SDPA dispatch: exact, torch's default backend); ``attention="sparsectx"`` installs the processors
of ``sparsectx.processors`` so that sparsectx's Triton kernel computes every attention layer. ``disable`` restores
the original processor objects.

Attention probe (task-aware selectors). The selection context's ``extra`` holds an ``"attention_probe"``: when a
selector needs probe tensors (``edit``, ``subject``, ``attention``) that the user did not give in ``signals``, it
runs the original forward on the full (uncompacted) call, under ``torch.no_grad()``, with a temporary processor on
the first double-stream block's attention (FLUX.3: the first joint block's, after its per-mode blocks) that computes
that block's q and k (after norms and RoPE) and stops the forward there: the probe costs the embedders and one
block's projections (FLUX.3: and the per-mode blocks), not a step.
It returns ``"text_queries"``, ``"target_queries"`` (= ``"queries"``) and ``"ref_keys"`` (see
``sparsectx.selection``), and for Qwen-Image also ``"text_mask"`` (its prompt padding, from
``encoder_hidden_states_mask``), so padded text tokens do not vote.

Reference KV cache (``Flux2KleinKVPipeline``): the extract step is compacted like any other (``num_ref_tokens``
becomes the kept count), so the cache holds the kept tokens only and the cached steps need nothing more (samples
keeping different tokens: each group's forward makes its own cache, the first returned as the handle, and the cached
steps run each group against its own). The
alternative, caching every reference token and gathering the kept rows in each cached layer, is not what
``enable`` does: its extract step runs every reference token through every block (the cost Sparse Context removes)
and its cached steps attend to the same number of keys through gathered instead of contiguous loads, so it is
expected to be slower at both ends; it would only pay if the selection changed from step to step, which it does
not here. It exists at the processor level for comparison (a layer cache's ``kept_index``, read by the sparsectx KV
processors; ``sparsectx bench --case kv`` measures both).

Not supported (clear errors): context and tensor parallelism (``_parallel_config``), ControlNet residuals, and
Qwen-Image 2.1 with ``attention="sparsectx"``.
"""
from __future__ import annotations

import collections.abc
import contextlib
import copyreg
import copy
import functools
import inspect
import itertools
import math
import numbers
import operator
import os
import re
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from ._warn import warn as _warn
from .ops import _device_values, _eager_under_compile, _skip_under_dynamo, budget_number

if TYPE_CHECKING:  # (imported where used: sparsectx.processors imports diffusers' model modules)
    from .processors import RopeTablesMemo

# ----------------------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------------------
FLUX2, FLUX, QWEN, FLUX3, QWEN21, LONGCAT, FIBO = "flux2", "flux", "qwen", "flux3", "qwen21", "longcat", "fibo"
JOYPLUS, JOYEDIT = "joyimage_plus", "joyimage_edit"
ZIMAGE = "zimage_omni"
GLM = "glm_image"
MIN_DIFFUSERS = (0, 39)  # the oldest diffusers release the test suite passes with (setup.py's floor)
MAX_TESTED_DIFFUSERS = (0, 42)  # the newest release series the suite ran with (README, "Versions")
SUPPORTED_TRANSFORMERS = {  # diffusers class name -> family
    "Flux2Transformer2DModel": FLUX2,
    "FluxTransformer2DModel": FLUX,
    "QwenImageTransformer2DModel": QWEN,
    "Flux3Transformer2DModel": FLUX3,
    "QwenImage21Transformer2DModel": QWEN21,
    "LongCatImageTransformer2DModel": LONGCAT,
    "BriaFiboTransformer2DModel": FIBO,
    "JoyImageEditPlusTransformer3DModel": JOYPLUS,
    "JoyImageEditTransformer3DModel": JOYEDIT,
    "ZImageTransformer2DModel": ZIMAGE,
    "GlmImageTransformer2DModel": GLM,
}
SUPPORTED_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline",
                       "FluxKontextPipeline", "FluxKontextInpaintPipeline", "QwenImageEditPipeline",
                       "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline", "Flux3ModularPipeline",
                       "Flux3DistilledModularPipeline", "QwenImage21Pipeline", "LongCatImageEditPipeline",
                       "BriaFiboEditPipeline", "JoyImageEditPlusPipeline",
                       "JoyImageEditPipeline", "ZImageOmniPipeline", "GlmImagePipeline")
NATIVE, SPARSECTX = "native", "sparsectx"  # enable(attention=...): diffusers' own attention or sparsectx's kernel
ATTENTION_CHOICES = (NATIVE, SPARSECTX)
# (what a refusal of attention="sparsectx" over a model's own processors ends with)
NATIVE_HINT = "; enable with attention='native' (the default) to run them as they are, with the drop-in"
DROP_TRAINING_ATTR = "_sparsectx_drop_training"  # set by sparsectx.training.enable_drop_training
CALL_KWARG = "sparsectx"  # key of the per-call override dict inside (joint_)attention_kwargs
OVERRIDE_KEYS = ("budget", "selector", "signals")
PATCH_ATTR = "_sparsectx_patch"  # the transformer attribute holding its _SparsePatch while enabled
# first id axis of the target tokens (FLUX.1 / FLUX.2 / Bria FIBO: 0; LongCat-Image: its image modality 1, text
# being 0); reference tokens have any other value, one per reference image
TARGET_PLANES = {FLUX: 0, FLUX2: 0, LONGCAT: 1, FIBO: 0}
KV_EXTRACT = "extract"
KV_CACHED = "cached"  # FLUX.2 klein's cached steps: the references are in the cache, none in the sequence

# per family: the forward arguments that carry the batch dimension first (sliced when samples run as groups),
# the argument holding the (joint) attention kwargs, and the arguments this integration can not compact
_BATCH_ARGS = {
    FLUX2: ("hidden_states", "encoder_hidden_states", "timestep", "guidance"),
    FLUX: ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    QWEN: ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance",
           "img_shapes", "additional_t_cond"),
    FLUX3: ("hidden_states", "encoder_hidden_states", "timestep", "target_timestep", "image_cond_hidden_states"),
    # (Qwen-Image 2.1's img_mask: its first row serves every sample, left whole: a group's forwards keep the call's
    # tensor, on which their joint layouts are memoised)
    QWEN21: ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes"),
    LONGCAT: ("hidden_states", "encoder_hidden_states", "timestep", "guidance"),
    # (Bria FIBO's text_encoder_layers: one [B, T, C] tensor per block, each sliced)
    FIBO: ("hidden_states", "encoder_hidden_states", "text_encoder_layers", "pooled_projections", "timestep",
           "guidance"),
    JOYPLUS: ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "shape_list"),
    JOYEDIT: ("hidden_states", "encoder_hidden_states", "timestep"),
    # (Z-Image takes per-sample lists; its hidden_states is sparsectx's own: the patch rows, _zimage_rows)
    ZIMAGE: ("hidden_states", "x", "t", "cap_feats", "siglip_feats", "image_noise_mask"),
    GLM: ("hidden_states", "encoder_hidden_states", "prior_token_id", "prior_token_drop", "timestep", "target_size",
          "crop_coords", "attention_mask"),
}
# per family: the forward arguments the layout is read from (a forward without them can not be patched)
_LAYOUT_ARGS = {FLUX2: ("hidden_states", "img_ids"), FLUX: ("hidden_states", "img_ids"),
                QWEN: ("hidden_states", "img_shapes"), FLUX3: ("image_cond_hidden_states", "image_cond_ids"),
                QWEN21: ("hidden_states", "img_shapes", "img_mask"), LONGCAT: ("hidden_states", "img_ids"),
                FIBO: ("hidden_states", "img_ids"), JOYPLUS: ("hidden_states", "shape_list"),
                JOYEDIT: ("hidden_states",), ZIMAGE: ("x", "cap_feats"), GLM: ("hidden_states", "kv_caches")}
# per family: the forward argument holding the reference rows and the one holding their position ids. FLUX.3 takes
# its references as an input of their own (they produce no output rows); the others append them to the image
# sequence, after the target (Qwen-Image 2.1: before it; Qwen-Image has no ids: its layout comes from img_shapes,
# JoyImage-Edit-Plus's from shape_list, its rows patches [B, N, C, pt, ph, pw]; JoyImage-Edit's from its latents'
# items [B, items, C, T, H, W], the references first and the target last, patchified inside its forward; Z-Image
# Omni's from its per-sample image lists x, their patch rows made by sparsectx as hidden_states, _zimage_rows;
# GLM-Image's from a write forward of its KV cache: its hidden_states one reference image's latents [B, C, H, W])
_REFERENCE_ARGS = {FLUX2: ("hidden_states", "img_ids"), FLUX: ("hidden_states", "img_ids"),
                   QWEN: ("hidden_states", "img_ids"), FLUX3: ("image_cond_hidden_states", "image_cond_ids"),
                   QWEN21: ("hidden_states", "img_ids"), LONGCAT: ("hidden_states", "img_ids"),
                   FIBO: ("hidden_states", "img_ids"), JOYPLUS: ("hidden_states", "img_ids"),
                   JOYEDIT: ("hidden_states", "img_ids"), ZIMAGE: ("hidden_states", "img_ids"),
                   GLM: ("hidden_states", "img_ids")}
# (LongCat-Image's forward takes none: the per-call settings given to its pipeline's joint_attention_kwargs, which
# the pipeline does not hand on, reach the patch through the enabled pipeline's call; JoyImage-Edit-Plus's pipeline
# and forward take none, nor JoyImage-Edit's: an enabled pipeline takes attention_kwargs={"sparsectx": ...} for them,
# _takes_keyword)
_ATTN_KWARGS_ARG = {FLUX2: "joint_attention_kwargs", FLUX: "joint_attention_kwargs", QWEN: "attention_kwargs",
                    FLUX3: "attention_kwargs", QWEN21: "attention_kwargs", LONGCAT: "joint_attention_kwargs",
                    FIBO: "joint_attention_kwargs", JOYPLUS: "attention_kwargs", JOYEDIT: "attention_kwargs",
                    ZIMAGE: "joint_attention_kwargs", GLM: "attention_kwargs"}
# the pipelines' keyword that reaches it (FLUX.2's pipelines take attention_kwargs; their modular blocks, as every
# pipeline whose __call__ takes **kwargs, the transformer's keyword), for messages about a bare transformer's call
_PIPELINE_ATTN_KWARGS_ARG = {FLUX2: "attention_kwargs", FLUX: "joint_attention_kwargs", QWEN: "attention_kwargs",
                             FLUX3: "attention_kwargs", QWEN21: "attention_kwargs",
                             LONGCAT: "joint_attention_kwargs", FIBO: "joint_attention_kwargs",
                             JOYPLUS: "attention_kwargs", JOYEDIT: "attention_kwargs",
                             ZIMAGE: "joint_attention_kwargs", GLM: "attention_kwargs"}
_ATTN_KWARGS_NAMES = ("attention_kwargs", "joint_attention_kwargs")
# families whose forwards look for the pipeline call they run in even outside an enabled one: LongCat (per-call
# settings it would drop; Z-Image's too where its forward takes no joint_attention_kwargs, diffusers < 0.42), Bria
# FIBO, JoyImage-Edit-Plus and Z-Image Omni (their pipelines' guidance batch, _BATCHED_GUIDANCE)
_FAMILIES_WALKING_THE_STACK = (LONGCAT, FIBO, JOYPLUS, ZIMAGE)
_UNSUPPORTED_ARGS = ("controlnet_block_samples", "controlnet_single_block_samples")

Budget = Optional[Union[int, float, Sequence[Union[int, float]], Sequence[Sequence[Union[int, float]]], Callable]]


# ----------------------------------------------------------------------------------------------------------------
# budgets: scalar | one per reference image | one of those per request
# ----------------------------------------------------------------------------------------------------------------
def _check_budget_value(b) -> Union[int, float]:
    """One budget entry as a Python int (count) or float (ratio); numpy scalars are taken by kind."""
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(f"budget entries must be an int (token count) or a float (ratio), got {b!r}")
    b = int(b) if isinstance(b, numbers.Integral) else budget_number(b)  # (a float: numpy floats as written)
    if isinstance(b, float) and not (0.0 <= b <= 1.0):
        raise ValueError(f"budget ratio must be in [0, 1], got {b}")
    if isinstance(b, int) and b < 0:
        raise ValueError(f"budget count must be >= 0, got {b}")
    return b


def _check_per_image(spec):
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("a per-image budget list must not be empty")
        return [_check_budget_value(b) for b in spec]
    return _check_budget_value(spec)


def _is_budget_fn(budget) -> bool:
    """A budget object (``sparsectx.selection.adaptive(...)``, ``fixed_ratio``, ``fixed_count``) or any callable
    ``(scores [B, N], ref_lengths) -> BudgetResult``: sized on the selector's scores."""
    return callable(budget) and not isinstance(budget, (numbers.Real, list, tuple, str))


def check_budget(budget: Budget) -> Budget:
    """Validates a budget: a ratio in [0, 1] or a count >= 0 for every reference image; a list of those, one per
    reference image; a list whose entries are lists (one per request, each a per-image list, where a
    one-element list applies to all images); or a budget callable (``sparsectx.selection.adaptive(...)``: the
    count adapts to each image's scores); or None, for a selector that returns a keep mask, kept as given. Raises
    ``TypeError`` for an entry that is not a number (``compact_tokens``' rule), ``ValueError`` for any other
    mistake, each naming what is wrong. Returns it with every entry a Python int or float (numpy integers count
    tokens, numpy floats are ratios) and lists for tuples."""
    if budget is None:
        return budget
    if _is_budget_fn(budget):
        from .selection import refuse_budget_factory  # deferred, as the other imports of selection here

        refuse_budget_factory(budget)
        return budget
    if isinstance(budget, (list, tuple)) and any(isinstance(b, (list, tuple)) for b in budget):
        if not all(isinstance(b, (list, tuple)) for b in budget):
            raise ValueError("a per-request budget must be a list of lists (one per request), got "
                             f"{budget!r}")
        return [_check_per_image(spec) for spec in budget]
    return _check_per_image(budget)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same values, NaN equal to NaN (a signal's rows repeated for both branches)."""
    if a.shape != b.shape:
        return False
    b = b.to(a.device)
    same = a == b
    if a.is_floating_point() or a.is_complex():
        same |= torch.isnan(a) & torch.isnan(b)
    return bool(same.all())


def _is_per_request(budget: Budget) -> bool:
    return isinstance(budget, (list, tuple)) and bool(budget) and isinstance(budget[0], (list, tuple))


def _image_counts(spec, ref_lengths: Sequence[int]) -> list[int]:
    """Kept tokens per reference image: ratio -> round-half-up(ratio * n) (compact_tokens' rule); counts above an
    image's size keep the whole image."""
    values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if len(values) == 1:
        values = values * len(ref_lengths)
    if len(values) != len(ref_lengths):
        raise ValueError(f"budget has {len(values)} entries but the input holds {len(ref_lengths)} reference "
                         f"images (of {list(ref_lengths)} tokens)")
    counts = []
    for b, n in zip(values, ref_lengths):
        count = int(math.floor(b * n + 0.5)) if isinstance(b, float) else b
        counts.append(min(count, n))
    return counts


def budget_counts(budget: Budget, batch: int, ref_lengths: Sequence[int]) -> list[list[int]]:
    """``[batch][num_references]`` kept-token counts. A per-request budget of R entries needs ``batch % R == 0``:
    each request covers ``batch // R`` consecutive samples (diffusers' ``num_images_per_prompt`` order)."""
    if not _is_per_request(budget):
        return [_image_counts(budget, ref_lengths)] * batch
    if batch % len(budget):
        raise ValueError(f"a per-request budget has {len(budget)} entries, which does not divide the batch of "
                         f"{batch} samples")
    repeat = batch // len(budget)
    return [_image_counts(budget[b // repeat], ref_lengths) for b in range(batch)]


def keep_mask_from_scores(scores: torch.Tensor, counts: Sequence[Sequence[int]],
                          ref_lengths: Sequence[int]) -> torch.Tensor:
    """bool ``[B, N]``: in each reference image (consecutive ``ref_lengths`` slices of N), the ``counts[b][i]``
    highest scores of sample b; ties go to the lower index (``sparsectx.compact_tokens``' rule): ``select``'s fixed
    budgets' top-k, given the counts. Scores hold no NaN (the selectors' outputs are checked for it)."""
    from . import selection  # deferred: only a selecting call needs it

    wanted = _device_values(counts, torch.int64, scores.device).reshape(len(counts), len(ref_lengths))  # (B=0 too)
    return selection._topk_per_image(scores, list(ref_lengths), wanted)


# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------
def _resolve_selector(selector):
    if not isinstance(selector, str) and not callable(selector):
        raise TypeError(f"selector must be a registered name or a callable, got {type(selector).__name__}")
    from . import selection  # deferred: only enable() needs it

    return selection.get_selector(selector)  # ValueError for an unknown name


def _func_wrapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a torch.func transform's wrapper (``jvp``, ``grad``, ``vmap``): it has no storage of its
    own to key a forward by."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _view_of(tensor: torch.Tensor) -> tuple:
    """A tensor's memory and view: equal for the tensor and a detached alias of it (as a reentrant checkpoint
    recomputes on)."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


class _Identity:
    """A plan-key entry equal only to another for the very same live object. It refers to the object weakly (a plan
    does not keep a call's prompt or per-call selector alive), and once the object is gone it equals nothing, so a
    new object reusing its id never matches it. Objects without weak references are held."""

    __slots__ = ("ref", "hash")

    def __init__(self, obj):
        try:
            # a bound method is a new object at each attribute access: compare its (object, function) instead
            self.ref = weakref.WeakMethod(obj) if inspect.ismethod(obj) else weakref.ref(obj)
        except TypeError:
            self.ref = lambda: obj
        self.hash = hash(obj) if inspect.ismethod(obj) else id(obj)

    def __eq__(self, other):
        if not isinstance(other, _Identity):
            return False
        mine, theirs = self.ref(), other.ref()
        return mine is not None and (mine is theirs or (inspect.ismethod(mine) and mine == theirs))

    def __hash__(self):
        return self.hash


class DrawnRng(NamedTuple):
    """torch's global generators (the CPU one and the device's) just before and just after a training forward's
    random draw (a selection or a drop mask), each generator's state where the draw moved it."""

    device: torch.device
    before: tuple
    after: tuple


def _global_generators(device: torch.device) -> tuple:
    """The global generators a draw on ``device`` may use: the CPU's, and a CUDA device's own."""
    if device.type != "cuda":
        return (torch.default_generator,)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.default_generator, torch.cuda.default_generators[index]


def rng_states(device: torch.device) -> tuple:
    """The states of ``_global_generators(device)`` (a few small host copies; no device sync)."""
    return tuple(g.get_state() for g in _global_generators(device))


def drawn_rng(device: torch.device, before: tuple) -> Optional[DrawnRng]:
    """What a draw since ``before`` (``rng_states``) did to the global generators, or None if it used none."""
    after = rng_states(device)
    if all(torch.equal(a, b) for a, b in zip(after, before)):
        return None
    return DrawnRng(device, before, after)


def replay_draw(drawn: Optional[DrawnRng]) -> None:
    """A checkpoint's recomputation that reuses its forward's draw (the same mask or selection) instead of drawing
    again: each global generator the draw used moves to where the draw left it, if it stands where it stood before
    the draw (the checkpoint restored it: ``preserve_rng_state=True``, torch's default). The code after the draw
    inside the checkpoint (e.g. a LoRA adapter's dropout) then sees the forward's random numbers, and the recomputed
    graph is the forward's. A generator the checkpoint did not restore is left as it is."""
    if drawn is None:
        return
    for generator, before, after in zip(_global_generators(drawn.device), drawn.before, drawn.after):
        if not torch.equal(before, after) and torch.equal(generator.get_state(), before):
            generator.set_state(after)


def in_backward() -> bool:
    """Whether a backward pass is running in this thread (autograd's graph task): a transformer forward now is a
    checkpoint's recomputation of an earlier one."""
    return torch._C._current_graph_task_id() != -1


RECENT_FORWARDS = 64  # forwards per patch that a checkpoint around the transformer may still recompute


@dataclass
class RecentForward:
    """A forward that a checkpoint around the whole transformer may recompute during backward, and what that
    recomputation needs to run as the forward ran (``record``: drop training's mask, the drop-in's plan key)."""

    input: weakref.ref  # the forward's hidden_states: the entry holds while that tensor lives
    record: Any
    training: bool  # drawn in train mode (an eval forward's record keeps its deterministic selection or every token)
    patched: bool  # its recomputation needs the patch (it dropped tokens)
    in_checkpoint: bool  # ran as a reentrant checkpoint runs its forward (``reentrant_forward``)
    ambiguous: bool = False  # an earlier forward on the same inputs was not recomputed: which one a recompute is
    recomputed: bool = False
    drawn: Optional[DrawnRng] = None  # its draw's use of torch's global generators, replayed by its recomputation


def reentrant_forward() -> bool:
    """Whether this forward runs as a reentrant checkpoint (``torch.utils.checkpoint(use_reentrant=True)``, or any
    activation checkpoint built as an ``autograd.Function``) runs its function: under no_grad, inside the forward of
    an ``autograd.Function``, found on the Python stack by the ``ctx`` it was given. A validation pass under no_grad
    is not one (its backward will not recompute it). Read only under no_grad: the stack is walked there alone."""
    if torch.is_grad_enabled():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount and \
                isinstance(frame.f_locals.get(code.co_varnames[0]), torch.autograd.function.FunctionCtx):
            return True
        frame = frame.f_back
    return False


class RecentForwards:
    """The latest ``RECENT_FORWARDS`` forwards of a patch, found by their input tensors' memory, view and version:
    the same for a tensor and a detached alias of it, which a reentrant checkpoint recomputes on (a non-reentrant one
    passes the tensors themselves). Drop training keys a forward by its ``hidden_states``, the drop-in by those and
    the prompt tensors (its selection may read the prompt)."""

    def __init__(self):
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.added: Optional[tuple] = None  # (key, entry, the entry it replaced) of the latest remember

    @staticmethod
    def key(*tensors) -> tuple:
        # (a tensor made under torch.inference_mode has no version counter)
        return tuple(None if not isinstance(t, torch.Tensor) else
                     _view_of(t) + (None if t.is_inference() else t._version,) for t in tensors)

    def find(self, key: tuple) -> Optional[RecentForward]:
        """The live forward remembered at ``key``, else None (an entry whose input is gone, its memory reused, is
        dropped)."""
        entry = self.entries.get(key)
        if entry is not None and entry.input() is None:
            del self.entries[key]
            return None
        return entry

    def remember(self, key: tuple, entry: RecentForward) -> None:
        self.added = (key, entry, self.entries.pop(key, None))
        self.entries[key] = entry
        while len(self.entries) > RECENT_FORWARDS:
            self.entries.popitem(last=False)

    def undo_since(self, added: Optional[tuple]) -> None:
        """Forgets the forward remembered since ``added`` (``self.added`` then), which raised: no backward will
        recompute it, and a retry on the same input must not look like a second forward on it (a false warning that
        its gradients are wrong, a draw from the user's generator). The entry it replaced comes back. One level:
        the latest entry only (no forward of sparsectx's runs another patched forward of the same transformer)."""
        if self.added is None or self.added is added:
            return
        key, entry, replaced = self.added
        if self.entries.get(key) is entry:
            del self.entries[key]
            if replaced is not None:
                self.entries[key] = replaced
        self.added = added

    def release(self, disabling: str) -> None:
        """The patch is being removed (``disabling`` names the call): forgets every forward, first warning of those that
        dropped tokens as a reentrant checkpoint's forward and were not recomputed yet (its backward would recompute
        it on the original model; a validation pass under no_grad is no such forward)."""
        pending = sum(1 for entry in self.entries.values() if entry.patched and entry.in_checkpoint
                      and not entry.recomputed and entry.input() is not None)
        if pending:
            # (a non-reentrant checkpoint's recomputation fails in torch's own check instead)
            _warn(f"{disabling}: {pending} forward(s) that dropped reference tokens ran in train mode inside a "
                  "reentrant checkpoint (torch.utils.checkpoint around the transformer, use_reentrant=True) and "
                  "were not recomputed yet: if a backward of one is still to come, it recomputes the forward on "
                  "every token and its gradients are wrong; disable (or leave the sparse_context block) after the "
                  "backward", RuntimeWarning)
        self.entries.clear()


def _budget_key(budget):
    """A budget in a plan key: its settings, exactly (``_setting_key``), or for a user's budget callable the object
    itself."""
    from .selection import AdaptiveBudget, FixedBudget

    if isinstance(budget, FixedBudget):
        return "fixed", budget.name, budget.ratio, _setting_key(budget.value)
    if isinstance(budget, AdaptiveBudget):
        return ("adaptive", _setting_key(budget.coverage), _setting_key(budget.floor), _setting_key(budget.cap),
                budget.mass)
    return _Identity(budget) if _is_budget_fn(budget) else _setting_key(budget)


def _setting_key(value):
    """A budget setting in a plan key, equal only for equal settings (``repr`` rounds a tensor to 4 decimals: two
    budgets differing past them shared a selection): a tensor by its identity and version (its values would be a
    host read, a wait for the device), containers entry by entry, numbers by type and value (1 is a count, 1.0 a
    ratio; a numpy scalar's repr is exact)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", *_object_key(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_setting_key(v) for v in value)
    return type(value).__name__, repr(value)


def _object_key(value):
    """A prompt tensor or a signal in a plan key: the object itself (``_Identity``) and, for a tensor with a version
    counter, its version, so one rewritten in place (a server's preallocated prompt buffer) selects again. A tensor
    made under ``torch.inference_mode`` has no version counter: written in place there, it keeps its selection."""
    version = None
    if isinstance(value, torch.Tensor) and not value.is_inference():
        version = value._version
    return _Identity(value), version


def _selector_key(selector):
    return selector if isinstance(selector, str) else _Identity(selector)


@dataclass(frozen=True)
class _Settings:
    budget: Budget
    selector: Any  # a sparsectx.selection.Selector
    seed: Optional[int]
    signals: dict = field(default_factory=dict)  # merged into the selection context's ``extra``


def _check_signals(signals) -> dict:
    if signals is None:
        return {}
    if not isinstance(signals, dict):
        raise TypeError(f"signals must be a dict from signal names to values (e.g. {{'user_mask': mask}}), "
                         f"got {type(signals).__name__}")
    names = [name for name in signals if not isinstance(name, str)]
    if names:
        raise TypeError(f"signals must be a dict from signal names (strings) to values (e.g. {{'user_mask': "
                         f"mask}}), got the key {names[0]!r} ({type(names[0]).__name__})")
    return dict(signals)


def _make_settings(budget, selector, seed, signals=None) -> _Settings:
    budget = check_budget(budget)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if seed is not None:
        try:
            torch.Generator().manual_seed(int(seed))
        except (RuntimeError, ValueError) as error:  # out of range: the first call would fail instead
            raise ValueError(f"seed {seed} is out of range for torch.Generator.manual_seed: {error}") from None
    selector, signals = _resolve_selector(selector), _check_signals(signals)
    _check_settings_for(selector, budget, signals)
    return _Settings(budget, selector, None if seed is None else int(seed), signals)


def _check_settings_for(selector, budget, signals: dict, warned: Optional[set] = None) -> None:
    """What the selector is known to need: a budget for scores, signal names it reads (a misspelt name would be
    ignored silently). ``warned``: the (selector, unread signals) already warned about, not warned again (a per-call
    override is checked at every forward)."""
    if budget is None and selector.returns_scores:
        raise ValueError(f"budget=None keeps a selector's keep mask as given, but selector {selector.name!r} returns "
                         "scores: give a budget (a ratio, a count or a budget object)")
    from .selection import check_budget_for, unread_signals  # deferred: only enable() needs them

    check_budget_for(selector, budget)
    unknown = sorted(set(signals) - selector.signals) if selector.signals is not None else []
    if unknown:
        raise ValueError(f"selector {selector.name!r} reads no signal named {unknown}; its signals are "
                         f"{sorted(selector.signals)}")
    unread, readers = unread_signals(selector, signals)
    if unread and (warned is None or (selector.name, tuple(unread)) not in warned):
        if warned is not None:
            warned.add((selector.name, tuple(unread)))
        _warn(f"selector {selector.name!r} does not read the signals {unread} it was given: they are unused "
              f"(the selectors that read them: {readers})", UserWarning)


def _warn_ids_grid(family: str, selector, signals: dict, warned: Optional[set] = None) -> None:
    """FLUX.1 / FLUX.2 / FLUX.3 / LongCat / Bria FIBO give the built-in selectors each reference's grid in their ids:
    a ``ref_shapes`` signal (the grid of a model without ids, Qwen-Image) is not read there; warned (once per patch,
    with ``warned``). A user's selector may read it: not warned."""
    from .selection import is_builtin_selector  # deferred: only enable() needs it

    if (family in TARGET_PLANES or family == FLUX3) and "ref_shapes" in signals and is_builtin_selector(selector) \
            and (warned is None or "ref_shapes" not in warned):
        if warned is not None:
            warned.add("ref_shapes")
        _warn(f"signals['ref_shapes'] is unused on FLUX.1 / FLUX.2 / FLUX.3 / LongCat-Image / Bria FIBO: the selectors "
              f"read each reference's grid from the transformer's reference ids ({_REFERENCE_ARGS[family][1]})",
              UserWarning)


# transformer arguments that carry the prompt (per sample): the probe's text queries depend on them
PROMPT_ARGS = ("encoder_hidden_states", "encoder_hidden_states_mask", "pooled_projections", "text_encoder_layers")


class _SamplesDiffer(BaseException):
    """Raised by the probe of a selection made once for a batch whose samples have different prompts (a
    BaseException, so a selector's own ``except Exception`` around the probe does not swallow it)."""


def _same_captions(segments, others) -> bool:
    """Whether two of Z-Image's samples have the same caption segments (``cap_feats[b]``: lists of tensors)."""
    return len(segments) == len(others) and all(
        torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(segments, others))


def _same_rows(t) -> bool:
    """Whether every sample (leading dim) of ``t``, a tensor or a list/tuple of them, equals the first (one host
    read per tensor)."""
    if isinstance(t, (list, tuple)):
        return all(map(_same_rows, t))
    return t.ndim == 0 or t.shape[0] <= 1 or torch.equal(t, t[:1].expand_as(t))


def _per_request_signals(signals: dict, batch: int) -> dict:
    """``signals`` with each tensor given per request (a leading dim of R > 1 that divides the batch, R < batch)
    repeated over its request's ``batch // R`` consecutive samples, as a per-request budget is
    (``budget_counts``: diffusers' ``num_images_per_prompt`` order)."""
    def per_sample(value):
        if isinstance(value, torch.Tensor) and value.ndim and 1 < value.shape[0] < batch and \
                batch % value.shape[0] == 0:
            return value.repeat_interleave(batch // value.shape[0], dim=0)
        return value

    return {name: per_sample(value) for name, value in signals.items()}


def _check_ref_shapes_signal(signals: dict, layout) -> None:
    """A user's ``signals['ref_shapes']`` where the layout knows each reference's grid (Qwen-Image's ``img_shapes``,
    Z-Image's and JoyImage's grids) must be that grid: it replaces the layout's in the selectors' context, and one of
    the same token counts in another order ((w, h) for (h, w)) would turn the spatial selectors' grids silently."""
    if "ref_shapes" not in signals or "ref_shapes" not in layout.extra:
        return
    known = [(int(h), int(w)) for h, w in layout.extra["ref_shapes"]]
    try:
        given = [(int(h), int(w)) for h, w in signals["ref_shapes"]]
    except (TypeError, ValueError):
        given = None
    if given != known:
        raise ValueError(f"signals['ref_shapes'] {signals['ref_shapes']!r} differs from the reference grids the "
                         f"model's inputs give, (rows, columns) per image: {known}; leave it out (the selectors "
                         "read those)")


def _signals_for(signals: dict, batch: int, shared: bool, device) -> dict:
    """The user's selector signals for one selection: tensors on the model's device; per-sample tensors (leading
    dim = the batch) cut to the first sample when the batch shares its references and is selected once. A signal
    with a batch of 1 is used for every sample."""
    out = {}
    for name, value in signals.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.ndim and value.shape[0] not in (1, batch):
                raise ValueError(f"signal {name!r} has shape {tuple(value.shape)}: its first dim must be 1, the "
                                 f"batch size {batch} or a number of requests dividing it (e.g. user_mask is bool "
                                 "[1 or R or B, N], N = the reference tokens)")
            if shared and value.ndim and value.shape[0] == batch:
                value = value[:1]
            elif not shared and value.ndim and value.shape[0] == 1 and batch > 1:
                value = value.expand(batch, *value.shape[1:])  # selectors check their signals against the batch
        out[name] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# layout of the image sequence: which rows are target, which belong to which reference image
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    target_positions: torch.Tensor  # long [S_t], on the model's device
    ref_positions: torch.Tensor  # long [N], sequence order, on the model's device
    ref_lengths: list  # tokens per reference image
    reference_ids: Optional[torch.Tensor]  # [1, N, n_axes] or None
    target_shape: Optional[tuple]
    extra: dict
    # the same positions on the host (work on them there reads nothing back from the device)
    target_host: torch.Tensor
    ref_host: torch.Tensor


def _ids_layout(call: dict, target_plane: int) -> Optional[_Layout]:
    """FLUX.1 / FLUX.2 / LongCat-Image: target tokens have first id axis ``target_plane``; each reference image one
    other value. Computed on a host copy of the ids' first three axes (one read; the positions go back to the device
    as a queued copy). The target's (h, w) is the extent of its ids (LongCat's start past the text's positions)."""
    ids = call.get("img_ids")
    if ids is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    host = ids[:, :3].cpu()
    is_ref = host[:, 0] != target_plane
    ref_host = torch.nonzero(is_ref).flatten()
    if ref_host.numel() == 0:
        return None
    _, lengths = torch.unique_consecutive(host[ref_host, 0], return_counts=True)
    target_host = torch.nonzero(~is_ref).flatten()
    target_shape = None
    if target_host.numel():
        target_ids = host[target_host]
        extent = target_ids[:, 1:3].amax(dim=0) - target_ids[:, 1:3].amin(dim=0) + 1
        target_shape = tuple(int(size) for size in extent.tolist())
    target_positions, ref_positions = (_device_values(p, None, ids.device) for p in (target_host, ref_host))
    from .selection import ID_HW_AXES, IDS_GRID_SHAPES, row_major_shapes

    lengths = lengths.tolist()
    # (rows and columns on id axes 1 and 2, as the selectors read FLUX's 3- and 4-axis ids)
    shapes = row_major_shapes(host[ref_host, 1:3], lengths) if ID_HW_AXES.get(ids.shape[-1]) == (1, 2) else None
    extra = {} if shapes is None else {IDS_GRID_SHAPES: shapes}  # the selectors' grid then needs no device work
    return _Layout(target_positions, ref_positions, lengths, ids[ref_positions][None], target_shape, extra,
                   target_host, ref_host)


class _SampleLayoutsDiffer(ValueError):
    """The samples of a batch describe other images (``img_shapes`` / ``shape_list``): no one layout for the batch.
    ``lengths``: each sample's reference token counts."""

    def __init__(self, message: str, lengths: list):
        super().__init__(message)
        self.lengths = lengths


def _nested_ints(value, arg: str):
    """``value`` (lists, tuples, tensors or arrays of whole numbers, as diffusers' forwards accept them) as nested
    lists of ints; ``ValueError`` naming ``arg`` otherwise."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_nested_ints(item, arg) for item in value]
    if isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer()):
        return int(value)
    raise ValueError(f"{arg} must hold whole numbers (each image's (f, h, w) grid), got {value!r}")


def _image_shapes(call: dict, arg: str = "img_shapes") -> Optional[list]:
    """Qwen-Image's ``img_shapes[0]`` (JoyImage-Edit-Plus's ``shape_list[0]``: ``arg``), the ``(f, h, w)`` of each
    image of the sequence (every sample's: ``_SampleLayoutsDiffer`` when they differ), or None where no sample lists
    a reference (one image per sample, or a flat ``[(f, h, w)] * B``)."""
    shapes = call.get(arg)
    if shapes is None or len(shapes) == 0:
        return None
    samples = _nested_ints(shapes, arg)
    # a flat [(f, h, w)] * B (e.g. the ControlNet pipelines) describes targets only
    if not isinstance(samples[0], list) or not samples[0] or not isinstance(samples[0][0], list):
        return None
    if not all(isinstance(sample, list) and all(isinstance(s, list) and len(s) == 3 for s in sample)
               for sample in samples):
        raise ValueError(f"{arg} must list each sample's images as (f, h, w) grids, got {shapes!r}")
    first = [tuple(s) for s in samples[0]]
    differing = [b for b, sample in enumerate(samples) if [tuple(s) for s in sample] != first]
    if differing:
        # one layout for the batch: samples whose images have other sizes (same total) would be cut at sample 0's
        # image boundaries (Qwen-Image's own RoPE reads img_shapes[0] too, with a warning)
        raise _SampleLayoutsDiffer(
            f"{arg} differ between samples (sample {differing[0]}: {samples[differing[0]]}, sample 0: {samples[0]}): "
            "sparsectx selects reference tokens on one layout for the batch (the same number of references, of "
            "the same sizes, in every sample); run samples with other references as their own batch",
            [[math.prod(s) for s in sample[1:]] for sample in samples])
    if len(first) < 2:
        return None
    seq = call["hidden_states"].shape[1]
    if sum(math.prod(s) for s in first) != seq:
        raise ValueError(f"{arg} {first} describe {sum(math.prod(s) for s in first)} tokens but "
                         f"hidden_states has {seq}")
    return first


def _image_layout(call: dict, target_first: bool, arg: str = "img_shapes") -> Optional[_Layout]:
    """Qwen-Image (``target_first``): ``img_shapes[b] = [target, reference, ...]`` as ``(f, h, w)``, the sequence in
    that order (the pipelines concatenate the packed references after the target latents); JoyImage-Edit-Plus the
    same in ``shape_list`` (``arg``), its rows patches. Qwen-Image 2.1: ``[reference, ..., target]``, the sequence
    in that order."""
    shapes = _image_shapes(call, arg)
    if shapes is None:
        return None
    target, refs = (shapes[0], shapes[1:]) if target_first else (shapes[-1], shapes[:-1])
    n_target, seq = math.prod(target), call["hidden_states"].shape[1]
    ref_lengths = [math.prod(s) for s in refs]
    first_target = 0 if target_first else seq - n_target
    # (host tensors whatever the default device: queued to the device below)
    target_host = torch.arange(first_target, first_target + n_target, device="cpu")
    ref_host = torch.arange(n_target, seq, device="cpu") if target_first else torch.arange(seq - n_target, device="cpu")
    device = call["hidden_states"].device
    extra = {"ref_shapes": [(f * h, w) for f, h, w in refs]}
    # (queued copies from pinned memory: a blocking copy is a host sync on CUDA, one per call)
    return _Layout(_device_values(target_host, None, device), _device_values(ref_host, None, device), ref_lengths,
                   None, (target[0] * target[1], target[2]), extra, target_host, ref_host)


def _whole_steps(hw: torch.Tensor) -> torch.Tensor:
    """long ``[n, 2]``: each (row, column) id of one image as its rank among the image's distinct values on that
    axis (FLUX.3's pipelines scale the ids, e.g. by 0.5: the selectors' grid needs whole cells)."""
    return torch.stack([torch.unique(hw[:, axis], return_inverse=True)[1] for axis in range(2)], dim=1)


def _grid_size(hw: torch.Tensor) -> tuple:
    """``(h, w)``: the distinct row and column ids of one image."""
    return tuple(int(torch.unique(hw[:, axis]).numel()) for axis in range(2))


def _cond_layout(call: dict) -> Optional[_Layout]:
    """FLUX.3: the references are their own input, ``image_cond_hidden_states [B, N, C]``, with ids
    ``image_cond_ids [N, 4]`` (t, h, w, l): ``l`` one value per reference image (-1, -2, ...), the images one after
    another. Every row is a reference (no target position); the output holds the target rows only. The selectors
    see each image's ids as whole steps (its ranks of h and w). A host read of each id tensor."""
    references, ids = call.get("image_cond_hidden_states"), call.get("image_cond_ids")
    if references is None or ids is None or references.shape[1] == 0:
        return None
    if ids.ndim != 2 or ids.shape[0] != references.shape[1] or ids.shape[1] < 4:
        raise ValueError(f"image_cond_ids must be [N, 4] with N = image_cond_hidden_states.shape[1] = "
                         f"{references.shape[1]}, got {tuple(ids.shape)}")
    host = ids[:, :4].cpu()
    _, lengths = torch.unique_consecutive(host[:, 3], return_counts=True)
    lengths = lengths.tolist()
    steps = torch.cat([_whole_steps(rows) for rows in host[:, 1:3].split(lengths)])
    from .selection import IDS_GRID_SHAPES, row_major_shapes

    shapes = row_major_shapes(steps, lengths)
    extra = {} if shapes is None else {IDS_GRID_SHAPES: shapes}
    reference_ids = host.clone()
    reference_ids[:, 1:3] = steps.to(host.dtype)
    target = call.get("img_ids")
    target_shape = None if target is None or target.ndim != 2 or target.shape[0] == 0 else \
        _grid_size(target[:, 1:3].cpu())
    n = references.shape[1]
    device = references.device
    return _Layout(torch.zeros(0, dtype=torch.long, device=device), torch.arange(n, device=device), lengths,
                   _device_values(reference_ids[None], None, device), target_shape, extra,
                   torch.zeros(0, dtype=torch.long, device="cpu"), torch.arange(n, device="cpu"))


def _items_layout(call: dict, model: Optional[torch.nn.Module]) -> Optional[_Layout]:
    """JoyImage-Edit: ``hidden_states [B, items, C, T, H, W]``, the reference images first and the target last, each
    as frames of one video grid; its forward moves the target first and patchifies the frames
    (``model.config.patch_size``), so its patch sequence is the target's rows, then each reference's, all of one
    size. None for a call without references (a 5-D input or one item); a time patch other than 1 is left to
    diffusers' forward, which refuses it."""
    hidden = call["hidden_states"]
    if hidden.ndim != 6 or hidden.shape[1] < 2:
        return None
    if model is None:
        raise ValueError("JoyImage-Edit's layout needs the model (its patch size)")
    pt, ph, pw = model.config.patch_size
    if pt != 1:
        return None
    items, frames, grid = hidden.shape[1], hidden.shape[3], (hidden.shape[4] // ph, hidden.shape[5] // pw)
    per_item = frames * grid[0] * grid[1]
    target_host, ref_host = torch.arange(per_item, device="cpu"), torch.arange(per_item, items * per_item, device="cpu")
    shape = (frames * grid[0], grid[1])
    return _Layout(_device_values(target_host, None, hidden.device), _device_values(ref_host, None, hidden.device),
                   [per_item] * (items - 1), None, shape,
                   {"ref_shapes": [shape] * (items - 1)}, target_host, ref_host)


def _nested_tensors(value) -> list:
    """The tensors of ``value``: itself, or those of its (nested) lists and tuples in order, as Z-Image's per-sample
    lists (``x``, ``cap_feats``) hold them (``None`` entries left out)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _nested_tensors(item)]
    return []


def _zimage_patches(call: dict) -> tuple:
    """Z-Image's ``(patch_size, f_patch_size)`` of the call (its forward's defaults: 2 and 1)."""
    return call.get("patch_size", 2), call.get("f_patch_size", 1)


def _zimage_grids(call: dict) -> Optional[list]:
    """Z-Image Omni: each sample's images as token grids (``zimage.image_grids``: None for a missing image,
    ``ValueError`` naming ``x`` for one that is no latents); None for a call without references (basic mode, or one
    image per sample)."""
    from .zimage import image_grids, is_omni

    x = call.get("x")
    if not is_omni(x) or all(len(images) < 2 for images in x):
        return None
    return image_grids(x, *_zimage_patches(call))


def _zimage_layout(call: dict) -> Optional[_Layout]:
    """Z-Image Omni: ``x[b] = [reference, ..., target]``, each image's patches in ``(F, H, W)`` order; the layout's
    positions index ``hidden_states``, the images' patch rows one after another (``zimage.patch_rows``, without the
    model's pad rows). Every sample must have images of the same grids (``_SampleLayoutsDiffer``)."""
    grids = _zimage_grids(call)
    if grids is None:
        return None
    missing = next(((b, j) for b, sample in enumerate(grids) for j, grid in enumerate(sample) if grid is None), None)
    if missing is not None:
        raise _SampleLayoutsDiffer(
            f"x[{missing[0]}][{missing[1]}] is None (an image without latents, which diffusers gives pad rows only): "
            "sparsectx selects reference tokens on the layout of every image of a sample with references; pass each "
            "image's latents", [[math.prod(grid) if grid else 0 for grid in sample[:-1]] for sample in grids])
    first = grids[0]
    differing = [b for b, sample in enumerate(grids) if sample != first]
    if differing:
        raise _SampleLayoutsDiffer(
            f"x's images differ between samples (sample {differing[0]}: token grids {grids[differing[0]]}, sample 0: "
            f"{first}): sparsectx selects reference tokens on one layout for the batch (the same number of "
            "references, of the same sizes, in every sample); run samples with other references as their own batch",
            [[math.prod(grid) for grid in sample[:-1]] for sample in grids])
    lengths = [math.prod(grid) for grid in first]
    n_refs = sum(lengths[:-1])
    ref_host, target_host = torch.arange(n_refs, device="cpu"), torch.arange(n_refs, n_refs + lengths[-1], device="cpu")
    device = call["hidden_states"].device
    f, h, w = first[-1]
    return _Layout(_device_values(target_host, None, device), _device_values(ref_host, None, device), lengths[:-1],
                   None, (f * h, w),
                   {"ref_shapes": [(f * h, w) for f, h, w in first[:-1]]}, target_host, ref_host)


def _glm_layout(call: dict, model: Optional[torch.nn.Module]) -> Optional[_Layout]:
    """GLM-Image: a write forward of its reference KV cache (``kv_caches`` in ``"write"`` mode) holds one reference
    image, every row of it (its patches, ``model.config.patch_size``); any other forward holds none (its references
    are in the cache, written before)."""
    from .glmimage import WRITE, cache_mode, grid

    hidden = call["hidden_states"]
    if cache_mode(call.get("kv_caches")) != WRITE or hidden.ndim != 4:
        return None
    if model is None:
        raise ValueError("GLM-Image's layout needs the model (its patch size)")
    shape = grid(hidden, model.config.patch_size)
    if not shape[0] * shape[1]:
        return None
    target_host, ref_host = torch.arange(0, device="cpu"), torch.arange(shape[0] * shape[1], device="cpu")
    return _Layout(_device_values(target_host, None, hidden.device), _device_values(ref_host, None, hidden.device),
                   [len(ref_host)], None, None,
                   {"ref_shapes": [shape]}, target_host, ref_host)


_LAYOUTS = {**{family: functools.partial(_ids_layout, target_plane=plane) for family, plane in TARGET_PLANES.items()},
            QWEN: functools.partial(_image_layout, target_first=True),
            FLUX3: _cond_layout, QWEN21: functools.partial(_image_layout, target_first=False),
            JOYPLUS: functools.partial(_image_layout, target_first=True, arg="shape_list"), ZIMAGE: _zimage_layout}
# (JoyImage-Edit's layout, _items_layout, and GLM-Image's, _glm_layout, also read the model's patch size:
# reference_layout calls them with the model)


# ----------------------------------------------------------------------------------------------------------------
# attention probe: q and k of the first double-stream block (FLUX.1, FLUX.2, LongCat-Image, Qwen-Image)
# ----------------------------------------------------------------------------------------------------------------
class _ProbeDone(Exception):
    """Raised by the probe processor once it holds q and k: ends the transformer's forward there."""


class _QKProbeProcessor:
    """Temporary processor of the first double-stream attention: what the probe returns (text queries, target
    queries, reference keys), computed as the original processor computes those rows (same projections, norms,
    RoPE) and only for those rows, then ``_ProbeDone``. One subclass per family, each with the signature of the
    processor it stands in for (diffusers passes a processor only the arguments its ``__call__`` names)."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.text_queries: Optional[torch.Tensor] = None  # [B, T, H, D]
        self.target_queries: Optional[torch.Tensor] = None  # [B, S_t, H, D]
        self.ref_keys: Optional[torch.Tensor] = None  # [B, N, H, D]
        self.text_mask: Optional[torch.Tensor] = None  # bool [B, T] (False = padding), when the family has one

    def _rows(self, hidden_states) -> tuple:
        """The target and reference rows of the image sequence: a slice where they are consecutive (the pipelines'
        layout: views of the rows and of their RoPE table rows, no gather launched), else their positions on the
        device."""
        device = hidden_states.device
        return tuple(_consecutive(host) or positions.to(device) for host, positions in (
            (self.layout.target_host, self.layout.target_positions), (self.layout.ref_host, self.layout.ref_positions)))

    def _record(self, text_queries, target_queries, ref_keys, text_mask=None):
        self.text_queries, self.target_queries, self.ref_keys = text_queries, target_queries, ref_keys
        if text_mask is not None:
            self.text_mask = text_mask.to(device=text_queries.device, dtype=torch.bool)
        raise _ProbeDone


def _consecutive(positions: torch.Tensor) -> Optional[slice]:
    """``slice(first, last + 1)`` when the host positions are ``first, first + 1, ..., last`` (at least one), else
    None."""
    if positions.numel() == 0:
        return None
    first = int(positions[0])
    if not torch.equal(positions, torch.arange(first, first + positions.numel(), dtype=positions.dtype)):
        return None
    return slice(first, first + positions.numel())


class _FluxQKProbe(_QKProbeProcessor):
    """FLUX.1 / FLUX.2 / LongCat-Image / Bria FIBO double-stream attention (the KV-cache arguments of FLUX.2 klein
    are accepted, unused); with an ``attention_mask`` (Bria FIBO's prompt padding) the text keys some query may attend
    to come along as ``text_mask`` (``_text_keys_attended``)."""

    def __init__(self, layout: _Layout, get_qkv_projections: Callable):
        super().__init__(layout)
        self.get_qkv_projections = get_qkv_projections

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        from .processors import flux_probe_qk  # deferred: imports diffusers' model modules

        text_mask = None
        if attention_mask is not None:
            text_mask = _text_keys_attended(attention_mask, hidden_states.shape[0], encoder_hidden_states.shape[1],
                                            hidden_states.shape[1])
        self._record(*flux_probe_qk(attn, hidden_states, encoder_hidden_states, self.get_qkv_projections,
                                    image_rotary_emb, *self._rows(hidden_states)), text_mask)


NEGLIGIBLE_BIAS = 30.0  # an additive mask's bias this far below its sample's largest: the key is masked


def _text_keys_attended(attention_mask: torch.Tensor, batch: int, n_text: int, n_image: int,
                        text_first: bool = True) -> torch.Tensor:
    """bool ``[B, n_text]``: the text keys of the joint ``[text, image]`` sequence (``[image, text]`` where not
    ``text_first``) that some query may attend to
    under ``attention_mask`` (its last dim the keys; boolean, additive: masked where its bias is ``NEGLIGIBLE_BIAS``
    or more below its sample's largest, -inf and a -1e4 padding alike, or integer: masked at 0), False for the padding:
    a key mask ``[B, S]`` / ``[B, 1, 1, S]`` as it is, a mask per query ``[B, 1, S, S]`` reduced over the queries."""
    n = n_text + n_image
    if attention_mask.ndim == 0 or attention_mask.shape[-1] != n:
        raise ValueError(f"attention_mask must be a mask over the joint sequence's keys, its last dim {n} ({n_text} "
                         f"text + {n_image} image tokens), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    elif attention_mask.is_floating_point():  # (a key e^-30 times as likely as the sample's best adds nothing)
        # the largest bias of each sample's mask (of the whole mask without a batch dim: [S], or [S, S] a row per
        # query): a padded query's row, -1e4 throughout, reads as masked too
        per_sample = attention_mask.ndim >= 3 or (attention_mask.ndim == 2 and attention_mask.shape[0] != n)
        top = (attention_mask.reshape(attention_mask.shape[0], -1).amax(1).view(-1, *[1] * (attention_mask.ndim - 1))
               if per_sample else attention_mask.amax())
        allowed = attention_mask > top - NEGLIGIBLE_BIAS
    else:
        allowed = attention_mask != 0
    if allowed.ndim >= 2 and allowed.shape[-2] == n:  # a row per query (as _kept_key_columns reads it)
        allowed = allowed.any(dim=-2)
    allowed = allowed.reshape(allowed.shape[0] if allowed.ndim > 1 else 1, -1, n).any(dim=1)
    return (allowed[:, :n_text] if text_first else allowed[:, n_image:]).expand(batch, n_text)


class _QwenQKProbe(_QKProbeProcessor):
    """Qwen-Image double-stream attention; the text padding mask comes along as ``text_mask``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from .processors import qwen_probe_qk  # deferred: imports diffusers' model modules

        self._record(*qwen_probe_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                    *self._rows(hidden_states)), encoder_hidden_states_mask)


class _JoyImagePlusQKProbe(_QKProbeProcessor):
    """JoyImage-Edit-Plus double-stream attention, over ``[image, text]``; the key mask its forward builds (the
    prompt's padding, from ``encoder_hidden_states_mask``) gives ``text_mask``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, attention_mask=None):
        from .joyimage import probe_qk

        text_mask = None
        if attention_mask is not None:
            text_mask = _text_keys_attended(attention_mask, hidden_states.shape[0], encoder_hidden_states.shape[1],
                                            hidden_states.shape[1], text_first=False)
        self._record(*probe_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                               *self._rows(hidden_states)), text_mask)


class _JoyImageQKProbe(_QKProbeProcessor):
    """JoyImage-Edit double-stream attention over ``[image, text]``: one RoPE table for the batch (the text's too
    with ``rope_type="mrope"``), no key mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, **kwargs):
        from .joyimage import probe_qk

        image_freqs, text_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        self._record(*probe_qk(attn, hidden_states, encoder_hidden_states, image_freqs, *self._rows(hidden_states),
                               text_freqs))


class _Flux3QKProbe(_QKProbeProcessor):
    """FLUX.3's first joint block, over ``[text, target, references]`` (the per-mode blocks before it attend within
    one mode each: the first attention where the target sees the references)."""

    def __init__(self, layout: _Layout, n_text: int, n_target: int):
        super().__init__(layout)
        self.n_text, self.n_target = n_text, n_target

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        from .processors import flux3_probe_qk  # deferred: imports diffusers' model modules

        self._record(*flux3_probe_qk(attn, hidden_states, image_rotary_emb, self.n_text, self.n_target))


class _Qwen21QKProbe(_QKProbeProcessor):
    """Qwen-Image 2.1's first block, over its one joint sequence (text and condition images interleaved, the target
    last): each kind's rows from the call's joint layout (``qwen21.joint_layout``), the prompt's padding from
    ``key_valid``."""

    def __init__(self, layout: _Layout, joint):
        super().__init__(layout)
        self.joint = joint

    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        from .processors import qwen21_probe_qk  # deferred: imports diffusers' model modules

        text, target, refs = (_consecutive(rows) or rows.to(hidden_states.device)
                              for rows in map(self.joint.rows, ("text", "target", "reference")))
        self._record(*qwen21_probe_qk(attn, hidden_states, rotary_emb, text, target, refs),
                     None if key_valid is None else key_valid[:, text])


class _ZImageQKProbe(_QKProbeProcessor):
    """Z-Image Omni's first main layer, over each sample's ``[caption, images, siglip]`` (its noise refiner before it
    attends within the images alone: the first attention where the caption sees the references). Its rows differ
    per sample (captions of their own lengths): ``rows`` holds each kind's rows per sample, ``[B, n]``, and the
    caption's real tokens (not its pad rows) as ``text_mask``."""

    def __init__(self, layout: _Layout, rows: tuple, text_mask: torch.Tensor):
        super().__init__(layout)
        self.rows, self.mask = rows, text_mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from .zimage import probe_qk

        device = hidden_states.device
        self._record(*probe_qk(attn, hidden_states, freqs_cis, *(rows.to(device) for rows in self.rows)),
                     self.mask)


def _zimage_probe(layout: _Layout, call: dict) -> _ZImageQKProbe:
    """The probe of a Z-Image Omni call: each sample's caption rows (its segments' real tokens, each segment padded
    to ``SEQ_MULTI_OF`` by the model), then its target and reference rows in its joint sequence."""
    from .zimage import padded_length, padded_positions

    grids = _zimage_grids(call)[0]
    texts, offsets = [], []
    for segments in call["cap_feats"]:
        rows, start = [], 0
        for segment in segments:
            rows.append(torch.arange(start, start + len(segment)))
            start += padded_length(len(segment))
        texts.append(torch.cat(rows))
        offsets.append(start)
    n_text = max(len(rows) for rows in texts)
    text = torch.zeros((len(texts), n_text), dtype=torch.long)
    text_mask = torch.zeros((len(texts), n_text), dtype=torch.bool)
    for b, rows in enumerate(texts):
        text[b, :len(rows)], text_mask[b, :len(rows)] = rows, True
    offsets = torch.tensor(offsets)[:, None]
    target, refs = (offsets + padded_positions(grids, host)[None] for host in (layout.target_host, layout.ref_host))
    return _ZImageQKProbe(layout, (text, target, refs), text_mask)


def _probe_processor(family: str, layout: _Layout, call: dict) -> _QKProbeProcessor:
    """The probe processor of a family (FLUX, LongCat, Bria FIBO: with the projection helper diffusers' own processor
    calls)."""
    if family == QWEN:
        return _QwenQKProbe(layout)
    if family == JOYPLUS:
        return _JoyImagePlusQKProbe(layout)
    if family == JOYEDIT:
        return _JoyImageQKProbe(layout)
    if family == ZIMAGE:
        return _zimage_probe(layout, call)
    if family == QWEN21:
        from .qwen21 import joint_layout

        return _Qwen21QKProbe(layout, joint_layout(call["img_mask"], call["img_shapes"],
                                                   call["encoder_hidden_states"].shape[1],
                                                   call["hidden_states"].shape[1]))
    if family == FLUX3:
        return _Flux3QKProbe(layout, call["encoder_hidden_states"].shape[1], call["hidden_states"].shape[1])
    from . import processors  # deferred: imports diffusers' model modules

    joint = {FLUX: processors.SparsectxFluxAttnProcessor, FLUX2: processors.SparsectxFlux2AttnProcessor,
             LONGCAT: processors.SparsectxLongCatImageAttnProcessor,
             FIBO: processors.SparsectxBriaFiboAttnProcessor}[family]
    return _FluxQKProbe(layout, joint.diffusers_module._get_qkv_projections)


def _stateful_hooks(transformer: torch.nn.Module) -> list:
    """``(name, hook)`` of each diffusers hook keeping state across calls (``_is_stateful``) registered on the
    transformer or a submodule. (A walk over the ``_modules`` dicts: half the host time of ``modules()``, about
    0.1 ms for klein-9B's 482 modules on this project's CPU machine, paid by every probe.)"""
    found, stack, seen = [], [transformer], set()
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # (a submodule slot set to None; a module reached twice)
            continue
        seen.add(id(module))
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            found += [(name, hook) for name, hook in getattr(registry, "hooks", {}).items()
                      if getattr(hook, "_is_stateful", False)]
        stack.extend(module._modules.values())
    return found


@contextlib.contextmanager
def _step_cache_states_set_aside(transformer: torch.nn.Module):
    """diffusers' step caches (``enable_cache``) keep per-step state in their hooks (``StateManager``), which a
    forward advances (e.g. TaylorSeer's step count): the probe's stopped forward runs on fresh states, and the
    denoising step's states are put back untouched after it."""
    saved = []
    for _, hook in _stateful_hooks(transformer):
        for manager in vars(hook).values():
            if isinstance(getattr(manager, "_state_cache", None), dict) and hasattr(manager, "get_state"):
                saved.append((manager, manager._state_cache))
                manager._state_cache = {}
    try:
        yield
    finally:
        for manager, states in saved:
            manager._state_cache = states


@contextlib.contextmanager
def _eager_forward(module: torch.nn.Module):
    """Inside the block, ``module`` runs its eager forward even if ``module.compile()`` compiled it (diffusers'
    ``compile_repeated_blocks``); afterwards it is compiled as before."""
    compiled = module.__dict__.get("_compiled_call_impl")
    if compiled is None:
        yield
        return
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def _probe_qk(transformer: torch.nn.Module, family: str, forward: Callable, call: dict,
              layout: _Layout) -> _QKProbeProcessor:
    """Runs ``forward(**call)`` with the probe processor on the attention of the first block where the target sees
    the references (``transformer.transformer_blocks[0]``; FLUX.3's first joint block) until it stops there
    (FLUX's ``pos_embed`` computing its tables with ``processors.flux_rope_tables``: the same values); the
    original processor object is put back whatever happens. The first block runs eagerly even where
    ``compile_repeated_blocks`` compiled it: the probe processor's host work on the layout can not be traced with
    ``fullgraph=True``, and the probe's full-length shapes would cost a recompile for one call."""
    from .processors import fast_rope_tables  # deferred: imports diffusers' model modules

    block = {FLUX3: "single_transformer_blocks", JOYPLUS: "double_blocks", JOYEDIT: "double_blocks",
             ZIMAGE: "layers"}.get(family, "transformer_blocks")
    block = getattr(transformer, block)[0]
    attn = block.attention if family == ZIMAGE else block.attn
    recorder = _probe_processor(family, layout, call)
    original = attn.processor
    attn.set_processor(recorder)
    try:  # (FLUX's RoPE tables in a few launches: the probe's host launch work is most of its time)
        with torch.no_grad(), _step_cache_states_set_aside(transformer), fast_rope_tables(transformer), \
                _eager_forward(block):
            forward(**call)
    except _ProbeDone:
        return recorder
    finally:
        attn.set_processor(original)
    raise RuntimeError("the attention probe did not reach the attention of its block (the forward returned first)")


def _probe_tensors(recorder: _QKProbeProcessor) -> dict:
    """The probe's signals for the selectors, each ``[B, ., H, D]``: text queries, target queries, reference keys
    in sequence (layout) order, and Qwen-Image's prompt padding as ``text_mask``."""
    tensors = {"text_queries": recorder.text_queries, "target_queries": recorder.target_queries,
               "queries": recorder.target_queries, "ref_keys": recorder.ref_keys}
    if recorder.text_mask is not None:
        tensors["text_mask"] = recorder.text_mask
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# the forward wrapper
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Samples of the batch that keep the same tokens, and the indices their forward needs (all on the device,
    computed once per selection)."""

    rows: Optional[list]  # batch rows of the group, or None: the whole batch in order
    samples: Optional[torch.Tensor]  # long [G] the same rows on the device (None with rows)
    positions: torch.Tensor  # long [S_kept] kept rows of the image sequence, in sequence order
    positions_host: torch.Tensor  # the same on the host
    kept_refs: list  # kept tokens of each reference image
    out_rows: torch.Tensor  # long: rows of the compacted output that are target rows ...
    out_dest: torch.Tensor  # long: ... and their rows in the full output
    # FLUX: the kept rows of the plan's img_ids and their RoPE tables, made at the group's first forward and passed
    # to every later one (a step reuses the plan only if its img_ids equal the plan's)
    rope: Optional[RopeTablesMemo] = None
    # Qwen-Image 2.1: the joint layouts of the group's forwards (qwen21.prepare), made at the first forward on each
    # img_mask tensor (the two guidance branches: two) and reused by the later steps; Z-Image Omni (the plan's first
    # group): each sample's kept rows, "zimage" (_run_zimage)
    joints: dict = field(default_factory=dict)


# per transformer: (its peft_config dict, the adapter names, weak references to its LoRA layers, the walk's number),
# the layers found by a walk once per set of adapters (held weakly: unloading an adapter frees its weights)
_LORA_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
_LORA_WALKS = itertools.count()  # (a walk's number: layers found anew are another adapter, even of the same name)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _lora_key(transformer: torch.nn.Module, attn_kwargs) -> Optional[tuple]:
    """The peft LoRA state of ``transformer`` that its q and k (the attention probe's) depend on: the call's
    ``scale``, the LoRA layers (their walk's number: layers loaded since are another adapter, also under the same
    name) and each one's active, merged and disabled adapters and scalings (``set_adapters``' weights), or None
    without peft layers. (A walk over the modules, made outside an enabled pipeline's call only,
    where nothing else tells a forward at another LoRA setting from one on the same prompt tensors.)"""
    tuners = sys.modules.get("peft.tuners.tuners_utils")  # (no peft imported: no LoRA layer)
    # (peft's add_adapter, diffusers' load_lora_adapter and get_peft_model set peft_config on the model: without
    # one, no walk)
    config = getattr(transformer, "peft_config", None)
    if tuners is None or not config:
        _LORA_LAYERS.pop(transformer, None)
        return None
    # the LoRA layers, found by a walk over the modules (~1 us per module) once per set of adapters: the same
    # peft_config object (held, so that another one can not take its id) with the same names, every layer alive
    names = tuple(config)
    entry = _LORA_LAYERS.get(transformer)
    found = [ref() for ref in entry[2]] if entry is not None and entry[0] is config and entry[1] == names else [None]
    if any(layer is None for layer in found):
        found = [layer for layer in transformer.modules() if isinstance(layer, tuners.BaseTunerLayer)]
        entry = _LORA_LAYERS[transformer] = (config, names, [weakref.ref(layer) for layer in found], next(_LORA_WALKS))
    # (peft's own attributes behind active_adapters / disable_adapters: those properties cost ~4 us a layer)
    # (scalings to 12 digits: diffusers' per-call scale multiplies and divides them back, not always exactly)
    layers = tuple((_hashable(getattr(layer, "_active_adapter", None)), getattr(layer, "_disable_adapters", None),
                    tuple(layer.merged_adapters), tuple((name, float(f"{value:.12g}") if isinstance(value, float)
                                                         else value) for name, value in
                                                        getattr(layer, "scaling", {}).items()))
                   for layer in found)
    if not layers:
        return None
    scale = attn_kwargs.get("scale") if isinstance(attn_kwargs, dict) else None
    return repr(scale), entry[3], layers


class _PlanKey(NamedTuple):
    """``_SparsePatch._plan_key``: the host-side facts a plan depends on."""

    epoch: int  # the call epoch
    inference: bool  # torch.inference_mode (index tensors made under it can not be saved for backward)
    attention: str
    pack: bool
    shapes: tuple  # the inputs' shapes and image layouts, the KV mode
    guidance_pairs: Optional[str]
    settings: tuple  # the budget, selector and signals in effect
    lora: Optional[tuple]  # outside an enabled pipeline's call: the LoRA scale and adapters' state (_lora_key)
    training: Optional[int]  # a training forward's number
    prompt: Optional[tuple]  # outside an enabled pipeline's call: PROMPT_ARGS' tensors, then Z-Image's captions'


@dataclass
class _Plan:
    """What one selection fixes for every later step of a pipeline call: the layout, the keep mask and the
    groups' indices. ``groups`` is empty when the original forward runs unchanged (no reference token, or every
    token kept). ``ids`` and ``references`` are the inputs the plan was made for: a step reuses the plan only if its
    inputs equal them, which costs the step's one host read."""

    layout: Optional[_Layout]
    keep: Optional[torch.Tensor]  # bool [B, N], or None without reference tokens
    groups: list
    ids: Optional[torch.Tensor]  # img_ids when the plan was made (FLUX), or None
    references: Optional[torch.Tensor]  # the reference rows of hidden_states the selection was made on
    packing: Optional[_Packing] = None  # FLUX.2 with sparsectx attention and several groups: one packed sequence
    reports: Optional["_Plan"] = None  # a plan without a selection (a KV-cached step): the call's plan that selected
    reads_kv_cache: bool = False  # a KV-cached step's plan (it reports ``reports``, None included)
    hooks_checked: bool = False  # several groups: checked once per plan for diffusers' stateful hooks
    # a training forward's use of torch's global generators while it selected, replayed by its recomputation
    drawn: Optional[DrawnRng] = None
    # a batch of guidance's two branches: the half holding the conditional samples ("first" or "second")
    pairs: Optional[str] = None


@dataclass
class _Packing:
    """FLUX.2 samples that keep different tokens, run as one sequence (``attention="sparsectx"``): the image rows
    of every sample packed one after another, as flat rows of ``hidden_states.reshape(B*S, C)`` (``rows``) and
    their image-sequence positions (``positions``: rows of the shared ``img_ids``); ``cu_image`` / ``max_image``
    describe the packed image segments for the kernel; ``out_rows`` (target rows of the packed output) go to
    ``out_dest`` (flat rows of the full ``[B*S]`` output)."""

    rows: torch.Tensor
    positions: torch.Tensor
    cu_image: torch.Tensor  # int32 [B+1]
    max_image: int
    out_rows: torch.Tensor
    out_dest: torch.Tensor
    rope: Optional[RopeTablesMemo] = None  # the packed img_ids and their RoPE tables (as ``_Group.rope``)


# Qwen-Image 2.1: the KV caches whose extract step ran its samples as groups, each group into a cache of its own
# (held by that step's patch): a cached step on one under another patch is refused by name, not left to diffusers'
# "not populated" error on the empty cache object
_FILLED_BY_GROUPS: "weakref.WeakSet" = weakref.WeakSet()
# FLUX.2 klein caches returned by an extract step of samples keeping different tokens: the first group's cache
_KLEIN_GROUP_CACHES: "weakref.WeakSet" = weakref.WeakSet()
MAX_PLANS = 4  # plans kept per pipeline call (e.g. a KV-cache extract step and the cached steps' plan)
# plans kept outside enabled pipeline calls (a bare transformer's forwards, or a pipeline sharing an enabled
# transformer without being enabled itself), one per live prompt: requests whose steps interleave on the transformer
# (threads, a server batching requests step by step; guidance's branches are two prompts each) keep their selections
MAX_PROMPT_PLANS = 16
# layouts kept per patched transformer, by the shape of the ids they were found on (a new call on ids of a kept
# shape starts its selection on that layout without reading its ids first)
MAX_LAYOUTS = 4


class _LayoutChanged(Exception):
    """Raised where a selection made on a layout found on earlier ids reads that the call's ids differ."""


class _NaNCheck(NamedTuple):
    """A selector's scores' NaN check, left on the device (``flag``: any NaN) and read with the keep mask they
    select (one host read for both); ``selector``: its name, for the error."""
    flag: torch.Tensor
    selector: str


def reference_layout(family: str, call: dict, model: Optional[torch.nn.Module] = None) -> Optional[_Layout]:
    """Where the reference tokens of a transformer call lie (``call``: its bound forward arguments; ``model``: the
    transformer, which JoyImage-Edit's layout reads its patch size from); None when the image sequence holds none."""
    if family == JOYEDIT:
        return _items_layout(call, model)
    if family == GLM:
        return _glm_layout(call, model)
    return _LAYOUTS[family](call)


def _patched_forward(attr: str, model_forward: Callable, owner: torch.nn.Module) -> Callable:
    """The forward a patch installs, a function of ``(module, *args, **kwargs)`` that runs the patch ``module`` holds
    under ``attr``, reading as ``model_forward`` (a bound forward: name, docstring, ``inspect.signature``).

    It is installed bound to the transformer (a method, not a closure over the patch): a deep copy of the transformer
    (e.g. an EMA model) rebinds it to the copy, which calls its own copy of the patch; a wrapper that rebinds a
    model's forward through ``__func__`` (accelerate's mixed precision) calls it as the model's own method. Its
    ``__wrapped__`` is a twin that does the same and carries the signature (``__signature__``, with a leading
    ``self``): ``inspect.signature`` follows it there; unwrapping (accelerate's ``unwrap_model``) ends at the twin,
    which works the same once bound to the transformer; and a hook that copies the forward's attributes onto its
    own wrapper (``functools.update_wrapper``: accelerate's, diffusers' HookRegistry) copies no signature of an
    unbound function."""

    # the forward it replaced, as a function of the module when it is a method of ``owner`` (the transformer): a
    # deep copy of the transformer then calls it on the copy, and the copy's forward holds no reference to ``owner``
    if isinstance(model_forward, types.MethodType) and model_forward.__self__ is owner:
        replaced = model_forward.__func__
    else:
        replaced = functools.partial(_call_ignoring_module, model_forward)

    def make() -> Callable:
        # the function's identity for the patch (ForwardPatch.installed_token): the function itself in its own
        # closure would be a reference cycle holding the transformer after disable until the garbage collector ran,
        # and a weak reference to it does not pickle (cloudpickle then fails before the patch's own message)
        token = object()

        def forward(module, *args, **kwargs):
            # bound twice when accelerate's unwrap_model(keep_fp32_wrapper=False) binds the forward it unwraps to
            # the model and that forward is this one, already bound (sparsectx enabled after Accelerator.prepare)
            if args and args[0] is module:
                args = args[1:]
            patch = getattr(module, attr, None)
            if patch is None or not patch.installed_token(token):
                # left behind in a diffusers hook chain that diffusers' remove_hook broke (a removed hook's wrapper
                # kept by the next hook), after its patch was disabled (or replaced): the forward it replaced
                return replaced(module, *args, **kwargs)
            if torch.compiler.is_compiling() or in_backward():
                # traced by torch.compile (the patch's forward then says what it can not trace, or runs eagerly, with
                # the lock, after dynamo's graph break), or a checkpoint's recomputation during backward (it reads
                # what its forward recorded): no lock, as on CUDA it runs in autograd's device thread, maybe while the
                # thread holding the lock waits for it
                return patch.forward(*args, **kwargs)
            if patch.forked_in_call:
                raise RuntimeError("this process was forked while another thread was inside this transformer's "
                                   "sparsectx forward or enabled pipeline call, whose per-call state is half set up "
                                   "here: fork while no thread runs the enabled model")
            with patch.lock:
                if getattr(module, attr, None) is not patch or not patch.installed_token(token):
                    # disabled (or enabled anew) while this forward waited for the lock: the forward it replaced
                    return replaced(module, *args, **kwargs)
                patch.forwards_running += 1
                recent = getattr(patch, "recent", None)
                added = recent.added if recent is not None else None
                try:
                    return patch.forward(*args, **kwargs)
                except BaseException:
                    if recent is not None:  # a forward that raised leaves no record (RecentForwards.undo_since)
                        recent.undo_since(added)
                    raise
                finally:
                    patch.forwards_running -= 1

        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(model_forward, name):
                setattr(forward, name, getattr(model_forward, name))
        forward.sparsectx_token = token
        return forward

    forward, twin = make(), make()
    signature = inspect.signature(model_forward)
    twin.__signature__ = signature.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *signature.parameters.values()])
    forward.__wrapped__ = twin
    return forward


def _diffusers_forward_args(cls: type) -> Optional[frozenset]:
    """The forward parameters of the diffusers class that ``cls`` is or derives from (None when ``cls`` is that
    class: its calls hold no other argument)."""
    base = next((c for c in cls.__mro__ if c.__name__ in SUPPORTED_TRANSFORMERS
                 and c.__module__.startswith("diffusers.")), None)
    if base is cls or base is None:
        return None
    return frozenset(inspect.signature(base.forward).parameters)


def _call_ignoring_module(function: Callable, module, *args, **kwargs):
    return function(*args, **kwargs)


class _ScopedBlock:
    """Stands in for a checkpointed block in a checkpointing function: calling it (or its ``forward``) runs the block
    inside ``scope()``; every other attribute is the block's, and ``isinstance`` (and ``__class__``) see the block's
    class, so a user's ``gradient_checkpointing_func`` that inspects the module still works (``type()`` shows the
    stand-in)."""

    def __init__(self, block: torch.nn.Module, scope: Callable):
        self._block, self._scope = block, scope

    @property
    def __class__(self):
        block = self.__dict__.get("_block")  # unset while torch.compile builds the object (before __init__ runs)
        return _ScopedBlock if block is None else type(block)

    def __call__(self, *args, **kwargs):
        with self._scope():
            return self._block(*args, **kwargs)

    def forward(self, *args, **kwargs):
        with self._scope():
            return self._block.forward(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_block", "_scope"):  # not set yet: no recursion through _block
            raise AttributeError(name)
        return getattr(self.__dict__["_block"], name)


def state_scope(state, **values) -> Callable:
    """A context-manager factory that sets ``state``'s attributes to ``values`` and puts the previous ones back."""

    @contextlib.contextmanager
    def scope():
        outer = {name: getattr(state, name) for name in values}
        for name, value in values.items():
            setattr(state, name, value)
        try:
            yield
        finally:
            for name, value in outer.items():
                setattr(state, name, value)

    return scope


def _checkpoint_in_scope(checkpoint: Callable, scope: Callable, block, *args, **kwargs):
    return checkpoint(_ScopedBlock(block, scope), *args, **kwargs)


def _is_checkpoint_wrapper(module: torch.nn.Module) -> bool:
    """torch's ``CheckpointWrapper`` (``checkpoint_wrapper``): its forward is ``checkpoint_fn(block, *args)``."""
    return type(module).__name__ == "CheckpointWrapper" and callable(getattr(module, "checkpoint_fn", None))


def refuse_composable_checkpoint(transformer: torch.nn.Module, what: str) -> None:
    """``RuntimeError`` naming ``what`` when a module of ``transformer`` is checkpointed by
    ``torch.distributed._composable.checkpoint`` (FSDP2's per-block form): it recomputes a block from its own hooks
    during backward, outside the forward's scope that ``checkpointed_in`` gives the other checkpoint forms, so the
    recomputation would run without the forward's state (torch then fails with a mismatch of saved tensors)."""
    try:
        from torch.distributed._composable import checkpoint
        from torch.distributed._composable.contract import REGISTRY_KEY
    except ImportError:  # pragma: no cover - a torch without torch.distributed
        return
    # (the transformer itself checkpointed recomputes its patched forward, which finds its state as a
    # torch.utils.checkpoint around it does; a registration whose hooks are off, checkpoint.state(m).enable_hook,
    # recomputes nothing. The registry is read from the module's __dict__, where the composable APIs put it:
    # contract's _get_registry, a getattr through nn.Module.__getattr__, cost 4 us a module, 10 ms a forward at
    # 2,400 modules)
    if any("checkpoint" in (vars(module).get(REGISTRY_KEY) or {}) and checkpoint.state(module).enable_hook
           for module in transformer.modules() if module is not transformer):
        raise RuntimeError(f"{what} can not run blocks checkpointed by torch.distributed._composable.checkpoint "
                           "(recomputed outside the transformer's forward, without its per-forward state): checkpoint "
                           "them with diffusers' transformer.enable_gradient_checkpointing() or torch's "
                           "apply_activation_checkpointing (checkpoint_wrapper), which FSDP2 takes too")


def _check_no_stateful_hooks(transformer: torch.nn.Module, n_groups: int) -> None:
    """``RuntimeError`` when diffusers hooks that keep state across the transformer's calls (the step caches of
    ``enable_cache``: FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer, FasterCache, MagCache, ...) are
    registered on it: their state is kept per cache context, which the separate forwards of several groups would
    share (a sample would be given another group's cached outputs)."""
    names = {name for name, _ in _stateful_hooks(transformer)}
    if names:
        remove = "disable the cache (transformer.disable_cache())" if hasattr(transformer, "disable_cache") else \
            "remove the hooks (diffusers' HookRegistry.remove_hook)"
        raise RuntimeError(
            f"the samples of this batch keep different reference tokens (other references, budgets or per-sample "
            f"signals, or prompts a selector reads), so sparsectx runs them as {n_groups} separate forwards, but "
            f"diffusers' stateful hooks {sorted(names)} (a step cache) keep one state per denoiser call and would "
            f"hand one forward's cached outputs to another: run requests that keep different tokens in separate "
            f"calls, or {remove}")


def _innermost_hook_reference(module: torch.nn.Module) -> Optional[tuple]:
    """``(reference, attribute)`` holding the forward that the innermost diffusers hook on ``module`` itself calls
    (``HookRegistry``'s first function reference: ``original_forward`` for a hook that replaces the forward, while
    the reference still calls that hook, else ``forward``), or None without such a hook. (diffusers' ``remove_hook``
    of a hook beneath one that replaces the forward writes the forward it wrapped over the upper reference's
    ``forward``: the upper hook is skipped from then on, and its ``original_forward``, the removed hook's wrapper,
    is called by nothing.)"""
    refs = getattr(module.__dict__.get("_diffusers_hook"), "_fn_refs", None)
    if not refs:
        return None
    calls_hook = getattr(getattr(getattr(refs[0], "forward", None), "func", None), "__self__", None)
    replaces = getattr(refs[0], "original_forward", None) is not None and getattr(calls_hook, "fn_ref", None) is refs[0]
    return refs[0], "original_forward" if replaces else "forward"


def _hook_wrapper_reference(forward) -> Optional[object]:
    """The function reference (``HookFunctionReference``) that a diffusers ``HookRegistry`` wrapper calls, when
    ``forward`` is one (what a hook puts in the module's ``forward``: a partial of a closure over the reference,
    also after its hook was removed), else None."""
    closure = getattr(getattr(forward, "func", None), "__closure__", None) or ()
    for cell in closure:
        if type(cell.cell_contents).__name__ == "HookFunctionReference":
            return cell.cell_contents
    return None


def _is_own_forward(module: torch.nn.Module, forward) -> bool:
    """Whether ``forward`` is the module class's own forward bound to ``module``."""
    return (isinstance(forward, types.MethodType) and forward.__self__ is module
            and forward.__func__ is type(module).forward)


# every live patch, so that a forked child gets new locks (_new_patch_locks)
_PATCHES: "weakref.WeakSet[ForwardPatch]" = weakref.WeakSet()
# one lock per transformer, outliving its patches: held by each patched forward, an enabled pipeline's call, enable,
# disable and a sparse_context block (also on a transformer no patch was made for yet, so two threads' first blocks
# on it run one after the other); made under _LOCKS_GUARD
_TRANSFORMER_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def transformer_lock(transformer: torch.nn.Module) -> threading.RLock:
    """The transformer's lock (made at its first use); a patch of the transformer holds the same one (``.lock``)."""
    with _LOCKS_GUARD:
        lock = _TRANSFORMER_LOCKS.get(transformer)
        if lock is None:
            lock = _TRANSFORMER_LOCKS[transformer] = threading.RLock()
        return lock


def _new_patch_locks() -> None:
    """A forked child's own locks: one that another thread of the parent held at the fork (in a forward, or in an
    enabled pipeline's call) is never released there, and the child's first call would wait for it forever. Such a
    patch is marked: the per-call state that thread had set up (processors' state, Qwen's RoPE hooks) stays half
    applied in the child, whose forwards then refuse to run (``forked_in_call``) instead of computing wrong."""
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    for patch in list(_PATCHES):
        # (a lock held by a sparse_context block alone, with no call or forward running in it, set nothing up)
        if not patch.lock.acquire(blocking=False) and (getattr(patch, "pipeline_calls", 0) or patch.forwards_running):
            patch.forked_in_call = True
    for transformer in list(_TRANSFORMER_LOCKS.keys()):
        _TRANSFORMER_LOCKS[transformer] = threading.RLock()
    for patch in list(_PATCHES):
        patch.lock = transformer_lock(patch.transformer)


os.register_at_fork(after_in_child=_new_patch_locks)


class ForwardPatch:
    """Replaces a transformer's ``forward`` with ``self.forward`` (an instance attribute) and puts the original back
    exactly; ``attr`` names the transformer attribute that points at the patch while it is installed.

    ``copy.deepcopy`` of the patched transformer copies the patch with it (the copy runs its own weights and can be
    disabled on its own); pickling it (``torch.save(module)``) raises a ``TypeError`` saying to disable first."""

    attr: str = PATCH_ATTR

    def __init__(self, transformer: torch.nn.Module, family: str):
        self.transformer = transformer
        self.family = family
        self.reference_arg, self.reference_ids_arg = _REFERENCE_ARGS[family]
        self.had_instance_forward = "forward" in transformer.__dict__
        # an accelerate hook already on the transformer (enable_model_cpu_offload before enable): the patch goes
        # beneath it, as the forward the hook calls (_old_forward). After each call the pipeline's
        # maybe_free_model_hooks removes the hooks (the forward becomes _old_forward again) and adds them anew: a
        # patch over the hook would be dropped there
        self.beneath_hook = hasattr(transformer, "_hf_hook") and "_old_forward" in transformer.__dict__
        # likewise a diffusers hook on the transformer itself (diffusers.hooks.HookRegistry: block-level group
        # offloading, a root cache hook) registered before enable: the patch goes beneath the innermost hook, as the
        # forward that hook calls. Over the hooks, diffusers' remove_hook (disable_cache, or LoRA loading and
        # unloading re-applying group offloading) would write the forward it wrapped back over the patch. With
        # both kinds, beneath the one that calls the model's own forward (the one registered first)
        registry = _innermost_hook_reference(transformer)
        if self.beneath_hook and registry is not None and _hook_wrapper_reference(transformer._old_forward):
            self.beneath_hook = False  # a diffusers hook, then accelerate's over it (accelerate calls its wrapper)
        self.beneath_registry = None if self.beneath_hook else registry
        if self.beneath_hook:
            self.original_forward = transformer._old_forward
        elif self.beneath_registry is not None:
            self.original_forward = getattr(*self.beneath_registry)
        else:
            self.original_forward = transformer.forward
        # accelerate's mixed precision (Accelerator.prepare) keeps the forward it wrapped here, until its
        # unwrap_model(keep_fp32_wrapper=False) removes the wrapper
        self.accelerate_unwrapped = transformer.__dict__.get("_original_forward")
        # the model's own signature, even when forward is already wrapped (offload hooks take *args, **kwargs)
        self.signature = inspect.signature(functools.partial(type(transformer).forward, transformer))
        # (the patched forward calls the model's by keyword: a parameter that takes positions only can not be passed)
        by_position = [p.name for p in self.signature.parameters.values()
                       if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        if by_position:
            raise TypeError(f"{type(transformer).__name__}.forward takes {by_position} by position only: sparsectx "
                            "passes the forward's arguments by name (diffusers' transformers take every argument "
                            "by name; a decorator of forward keeps its signature with functools.wraps)")
        # the arguments sparsectx reads the layout from, by diffusers' names (a subclass renaming one would run
        # every token, or fail at its first forward)
        names = self.signature.parameters
        if not any(p.kind is p.VAR_KEYWORD for p in names.values()):
            missing = [name for name in _LAYOUT_ARGS[family] if name not in names]
            if missing:
                raise TypeError(f"{type(transformer).__name__}.forward takes no {missing}: sparsectx reads the "
                                "sequence's layout from diffusers' argument names")
        # a subclass's own arguments (not the diffusers class's): per-sample ones are sliced with the samples when
        # they run as groups (_slice_batch), and keep the batch from running as one packed sequence
        self.diffusers_args = _diffusers_forward_args(type(transformer))
        # the modules whose blocks diffusers may run through a gradient-checkpointing function
        self.checkpointing_modules = [m for m in transformer.modules() if hasattr(m, "gradient_checkpointing")]
        # held by each forward, and by an enabled pipeline's whole call: the patch's per-call state (plans, the call's
        # seed, the processors' mask, the RoPE hooks) serves one call at a time, so calls from several threads on
        # one transformer run one after the other (each as it runs alone). The transformer's own, which every patch
        # made for it shares (transformer_lock)
        self.lock = transformer_lock(transformer)
        self.forwards_running = 0  # forwards inside the lock now (a fork then leaves one half done: _new_patch_locks)
        self.forked_in_call = False  # set in a child forked while another thread held the lock (_new_patch_locks)
        _PATCHES.add(self)

    @contextlib.contextmanager
    def checkpointed_in(self, scope: Callable):
        """While active, each block that diffusers' gradient checkpointing runs (``_gradient_checkpointing_func``)
        or that torch's ``checkpoint_wrapper`` wraps (``apply_activation_checkpointing``, as accelerate's FSDP
        activation checkpointing applies it; found at each call that records gradients, as it may come after
        enable) runs inside ``scope()``, and so does its recomputation during backward, which comes after this
        forward has put the processors' state back: a forward's per-call state holds for its recomputed blocks
        too. (Without gradients nothing is recomputed, and the blocks run inside the forward's own scope.)"""
        swapped = [(m, "_gradient_checkpointing_func") for m in self.checkpointing_modules
                   if m.gradient_checkpointing and getattr(m, "_gradient_checkpointing_func", None) is not None]
        if torch.is_grad_enabled():
            swapped += [(m, "checkpoint_fn") for m in self.transformer.modules() if _is_checkpoint_wrapper(m)]
        checkpoints = [getattr(module, name) for module, name in swapped]
        for (module, name), checkpoint in zip(swapped, checkpoints):
            setattr(module, name, functools.partial(_checkpoint_in_scope, checkpoint, scope))
        try:
            yield
        finally:
            for (module, name), checkpoint in zip(swapped, checkpoints):
                setattr(module, name, checkpoint)

    def bind(self, args, kwargs) -> dict:
        """The call's arguments by name (the model's own parameter names)."""
        if not args:  # (the pipelines' calls: keywords only) what Signature.bind gives, about 5 us of host time less
            fast = self._keyword_binding()
            if fast is not None:
                names, required = fast
                # (membership tests, not set comparisons of dict views, which torch 2.11's dynamo fails to trace)
                if all(name in names for name in kwargs) and all(name in kwargs for name in required):
                    return {name: kwargs[name] for name in names if name in kwargs}  # (parameter order, as bind)
        bound = dict(self.signature.bind(*args, **kwargs).arguments)
        for parameter in self.signature.parameters.values():  # (a forward's **kwargs: its entries by their names)
            if parameter.kind is parameter.VAR_KEYWORD and parameter.name in bound:
                bound.update(bound.pop(parameter.name))
        return bound

    def extra_args(self, call: dict) -> list:
        """The names in the bound ``call`` that the diffusers class's forward does not take (a subclass's own)."""
        known = self.diffusers_args
        return [] if known is None else [name for name in call if name not in known]

    def _keyword_binding(self):
        """``(names, required)`` of a signature whose parameters all take keywords (no ``*args``, ``**kwargs`` or
        positional-only one): ``names`` a dict in parameter order, ``required`` those without a default; else None."""
        signature = self.signature
        cached = self.__dict__.get("_keyword_binding_of")
        if cached is None or cached[0] is not signature:
            params = signature.parameters.values()
            fast = None
            if all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
                fast = (dict.fromkeys(p.name for p in params),
                        frozenset(p.name for p in params if p.default is p.empty))
            cached = self._keyword_binding_of = (signature, fast)
        return cached[1]

    def install(self) -> None:
        forward = types.MethodType(_patched_forward(self.attr, self.original_forward, self.transformer),
                                   self.transformer)
        if self.beneath_hook:
            self.transformer._old_forward = forward
        elif self.beneath_registry is not None:
            setattr(*self.beneath_registry, forward)
        else:
            self.transformer.forward = forward
        self.wrapped_forward = forward
        setattr(self.transformer, self.attr, self)

    def installed_token(self, token) -> bool:
        """Whether ``token`` is that of the forward this patch installed or of its twin (``_patched_forward``)."""
        ours = self.wrapped_forward.__func__
        return token is ours.sparsectx_token or token is ours.__wrapped__.sparsectx_token

    def _is_installed(self, forward) -> bool:
        """Whether ``forward`` is the forward this patch installed, or its function or that function's twin bound
        again to the transformer (accelerate's ``unwrap_model(..., keep_fp32_wrapper=False)`` rebinds the function it
        unwraps to)."""
        while isinstance(forward, types.MethodType) and forward.__self__ is self.transformer:
            token = getattr(forward.__func__, "sparsectx_token", None)
            if forward is self.wrapped_forward or self.installed_token(token):
                return True
            forward = forward.__func__  # bound twice (see _patched_forward)
        return False

    def uninstall(self) -> None:
        if self._is_installed(self.transformer.__dict__.get("forward")):
            if self.accelerate_unwrapped is not None and "_original_forward" not in self.transformer.__dict__:
                # prepare, enable, then unwrap_model(keep_fp32_wrapper=False): the mixed-precision wrapper this
                # patch replaced was removed since; what that unwrap leaves is the forward it had wrapped
                self.transformer.forward = self.accelerate_unwrapped
            elif self.beneath_registry is not None and not _innermost_hook_reference(self.transformer):
                # enabled beneath diffusers hooks that were all removed since (the forward they wrapped came back):
                # the forward they had wrapped, the model's own unless it was an instance attribute
                if _is_own_forward(self.transformer, self.original_forward):
                    del self.transformer.forward
                else:
                    self.transformer.forward = self.original_forward
            elif self.had_instance_forward or self.beneath_hook:  # (a removed hook leaves its _old_forward there)
                self.transformer.forward = self.original_forward
            else:
                del self.transformer.forward
        elif self._is_installed(self.transformer.__dict__.get("_old_forward")):
            # an accelerate hook (add_hook_to_module, e.g. enable_model_cpu_offload) calls this patch: the hook
            # stays, and calls what this patch replaced
            self.transformer._old_forward = self.original_forward
        elif self._is_installed(self.transformer.__dict__.get("_original_forward")):
            raise RuntimeError("accelerate's mixed precision (Accelerator.prepare) wrapped the transformer's forward "
                               "after sparsectx patched it: enable sparsectx after prepare (then it can be disabled "
                               "and enabled again with mixed precision kept), or call accelerator.unwrap_model(model, "
                               "keep_fp32_wrapper=False) before disabling, which also removes accelerate's autocast "
                               "from the model for the rest of training")
        elif not self._unhook_from_diffusers_registry() and self.beneath_registry is None:
            raise RuntimeError("the transformer's forward was wrapped again after sparsectx patched it (by something "
                               "other than an accelerate or diffusers hook); remove that wrapper first")
        # (else enabled beneath diffusers hooks whose chain diffusers' remove_hook broke since, keeping a removed
        # hook's wrapper, which may still call the patch's forward: once the patch is gone, that forward runs the
        # forward it replaced)
        delattr(self.transformer, self.attr)

    def _unhook_from_diffusers_registry(self) -> bool:
        """A diffusers hook (``diffusers.hooks.HookRegistry``: group offloading, caches) registered on the transformer
        after this patch calls it as its inner forward: point that reference at what this patch replaced. Also when
        only the wrapper of a removed hook is left in the transformer's forward (diffusers' ``remove_hook`` writes
        the forward it wrapped over an accelerate hook added after it, which puts the wrapper back when removed)."""
        registry = getattr(self.transformer, "_diffusers_hook", None)
        left = _hook_wrapper_reference(self.transformer.__dict__.get("forward"))
        for fn_ref in [*getattr(registry, "_fn_refs", ()), *([left] if left is not None else [])]:
            for attr in ("forward", "original_forward"):
                if getattr(fn_ref, attr, None) is self.wrapped_forward:
                    setattr(fn_ref, attr, self.original_forward)
                    return True
        return False

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    _CALL_STATE: dict = {}  # attributes of a running call, and their values outside one (a copy starts there)

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            if name in self._CALL_STATE:
                value = self._CALL_STATE[name]
            if name == "forwards_running":  # (a copy made while a forward runs: none runs in the copy)
                value = 0
            if name != "lock":
                setattr(clone, name, copy.deepcopy(value, memo))
        clone.lock = transformer_lock(clone.transformer)  # (the copied transformer's)
        _PATCHES.add(clone)
        return clone

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self.transformer).__name__} runs with sparsectx patched in and can not be pickled "
                        "(torch.save of the module): call sparsectx.disable / disable_drop_training first, or save "
                        "its state_dict or save_pretrained (neither holds sparsectx state)")


def _returned_kv_cache(result):
    """The KV cache a FLUX.2 klein extract forward returned (None where it made none): the second item of its tuple
    output, or its output object's ``kv_cache``."""
    return result[1] if isinstance(result, tuple) else getattr(result, "kv_cache", None)


class _SparsePatch(ForwardPatch):
    """Holds what ``enable`` changed on one transformer and runs the compacting forward.

    Host reads: the first step of a pipeline call finds the layout and selects (several reads: ``nonzero`` of the
    ids, the keep mask to the host); on ids of a shape seen before (FLUX), it selects on the layout found then and
    reads the check that the ids are equal with the keep mask. The later steps reuse the call's plan and read the host
    once (the check that their reference latents and ids equal the plan's)."""

    host_frames_skipped = False  # whether dynamo was told to leave the group loop's frames to the interpreter
    _CALL_STATE = dict(pipeline_calls=0, call_seed=None, pipeline_kwarg=None, call_overrides=None,
                       call_overrides_arrived=False, call_pipeline=None, reported=None)

    def __init__(self, transformer: torch.nn.Module, family: str, settings: _Settings):
        super().__init__(transformer, family)
        self.serial = next(_PATCH_SERIALS)  # (restored_state tells the patches made inside its block by it)
        self.settings = settings
        self.call_epoch = 0  # a new number at each pipeline call (never one used before): a new call selects again
        self.epochs_made = 0
        self.plans: dict = {}  # plan key -> _Plan, for the current call
        self.layouts: dict = {}  # _layout_key -> (the ids, the layout found on them), MAX_LAYOUTS most recent
        self.attention = NATIVE
        self.original_processors: Optional[dict] = None  # module name -> processor, while attention="sparsectx"
        self.attention_state = None  # the installed processors' shared AttentionState, while attention="sparsectx"
        self.pack = True  # FLUX.2 + sparsectx attention: samples that keep different tokens run as one sequence
        self.pipeline_calls = 0  # enabled pipelines' __call__s running now (each starts a new call epoch)
        self.warned_eval_drop = False  # warned once that a random drop selector ran in eval mode with gradients
        self.pipeline_kwarg: Optional[str] = None  # the running pipeline call's attention keyword, for messages
        # the running pipeline call's per-call settings, checked, and whether a forward of the call got them in its
        # attention kwargs (then forwards without them are not the call's: a pipeline not enabled, sharing the
        # transformer, called inside it)
        self.call_overrides: Optional[dict] = None
        self.call_overrides_arrived = False
        self.call_pipeline = None  # the enabled pipeline whose call runs now (the one given call_overrides)
        # an enabled pipeline call that ended inside another's (whose plans were put back): its selection, reported
        # by last_selection until the next forward
        self.reported: Optional[_Plan] = None
        # without a seed: the initial seed of the pipeline call's generator (a tuple: one generator per image)
        self.call_seed: Union[int, tuple, None] = None
        self.warned_unsupported = False  # the warning of _reinstall_replaced_processors is given once
        self.warned_unread: set = set()  # (selector, unread signals) a per-call override was warned about
        # the plan key of each recent forward that a checkpoint may recompute, by its inputs: a recomputation finds
        # its forward's plan in whichever mode the model is at the backward (an eval pass, or train(), may come
        # between a forward and its backward)
        self.recent = RecentForwards()
        self.training_forwards = 0  # training forwards so far: each one's plan key holds its number (a new draw)
        # the KV cache an extract step filled (Qwen-Image 2.1: every one; FLUX.2 klein: the one it returned after
        # groups) -> (that step's plan, None or each group's own cache): its cached steps attend to the tokens it
        # kept, whatever plans came since (another selection, enable again, new prompt tensors)
        self.extracted = weakref.WeakKeyDictionary()
        # GLM-Image: which reference image of which request each write forward of a KV cache stores, and the image
        # of the write forward running now (its budget entry, its random draw)
        from .glmimage import WrittenImages

        self.glm_written = WrittenImages() if family == GLM else None
        self.glm_write = None  # the running write forward's glmimage.Written, or None
        # the plan of the forward that filled each KV cache (GLM-Image: its latest write forward; FLUX.2 klein: its
        # extract step): its selection, which the cached (read) steps of that cache report, whatever their prompt
        self.cache_reports = weakref.WeakKeyDictionary()
        # per KV cache: the per-request settings its write forwards took, name -> entries (checked at its reads)
        self.glm_requests = weakref.WeakKeyDictionary()
        # per KV cache: the per-image settings its write forwards took, slot -> {name: (entries, of what)}: a
        # per-image budget's entries (images) and a request-wide user_mask's columns (rows), checked at its reads
        # against what the slot holds (a write forward can not know how many images follow it)
        self.glm_per_image = weakref.WeakKeyDictionary()

    @property
    def cache(self) -> Optional[_Plan]:
        """The most recently used plan that holds a selection, among the plans of the latest call (None when that
        call selected nothing). A call: one pipeline call (its KV-cached steps select nothing but report the first
        step's selection), or outside one the forwards on the same prompt tensors (``PROMPT_ARGS``). An enabled
        pipeline call that ended inside another enabled call is that latest call until the next forward."""
        if self.reported is not None:
            return self.reported
        return self.own_cache

    @property
    def own_cache(self) -> Optional[_Plan]:
        """``cache`` of the current call's own plans: not a selection reported by a call that ended inside it."""
        if not self.plans:
            return None
        latest = next(reversed(self.plans))
        plan = self.plans[latest]
        if plan.keep is not None:
            return plan
        # (a KV-cached step reports the selection of what filled its cache, or None: never another forward's)
        return plan.reports if plan.reports is not None or plan.reads_kv_cache else self._selecting_plan(latest)

    def _reported_plan(self, key: tuple, call: dict) -> Optional[_Plan]:
        """The selection a plan without one (a KV-cached step) reports: that of the forward that filled the step's
        cache (GLM-Image: the latest write forward, whose prompt is not the step's; FLUX.2 klein: the extract step,
        also when the cached step runs on another prompt tensor; Qwen-Image 2.1: the extract step that filled it);
        None for a cached step on a cache no forward of this patch filled with a selection (it attends to what the
        cache holds, e.g. every reference token of a cache filled before enable); else ``_selecting_plan``."""
        cache = call.get("kv_caches") if self.family == GLM else call.get("kv_cache") if self.family == FLUX2 else None
        found = self.cache_reports.get(cache) if cache is not None else None
        if found is not None:
            return found
        if self._reads_kv_cache(call):
            if self.family == QWEN21:
                extract = self.extracted.get(call["kv_cache"])
                return extract[0] if extract is not None and extract[0].keep is not None else None
            return None
        return self._selecting_plan(key)

    def _reads_kv_cache(self, call: dict) -> bool:
        """Whether the forward is a KV-cached step, whose references are read from a cache: FLUX.2 klein's and
        Qwen-Image 2.1's ``kv_cache_mode="cached"``, GLM-Image's read forwards."""
        if self.family == GLM:
            return _glm_cache_mode(call) == "read"
        return self.family in (FLUX2, QWEN21) and call.get("kv_cache") is not None \
            and call.get("kv_cache_mode") == KV_CACHED

    def _selecting_plan(self, key: tuple) -> Optional[_Plan]:
        """The most recently used plan with a selection among the plans of ``key``'s call (same call epoch and, outside
        a pipeline call, the same live prompt tensors: a freed prompt equals nothing)."""
        with_keep = [plan for k, plan in self.plans.items()
                     if plan.keep is not None and k[0] == key[0] and k[-1] == key[-1]]
        return with_keep[-1] if with_keep else None

    def set_attention(self, attention: str) -> None:
        """Installs sparsectx's attention processors (``"sparsectx"``) or puts diffusers' own back (``"native"``)."""
        if attention == self.attention and attention != SPARSECTX:
            return
        from . import processors  # deferred: imports diffusers' model modules

        if attention == self.attention:
            if processors.processors_installed(self.transformer, self.original_processors):
                return
            # processors replaced since sparsectx installed its own (e.g. Flux2KleinKVPipeline.from_pipe sets its
            # KV processors on a shared transformer): the layers still ours go back, then every layer gets ours again;
            # a processor sparsectx can not replace is refused first, with nothing changed
            processors.check_replaceable(self.transformer, NATIVE_HINT)
            processors.restore_processors(self.transformer, self.original_processors, self.attention_state)
            self.attention, self.original_processors, self.attention_state = NATIVE, None, None

        if attention == SPARSECTX:
            state = processors.AttentionState()
            self.original_processors = processors.install_processors(self.transformer, state, NATIVE_HINT)
            self.attention_state = state
        else:
            processors.restore_processors(self.transformer, self.original_processors, self.attention_state)
            self.original_processors = None
            self.attention_state = None
        self.attention = attention
        self._drop_plans()  # a plan's packing depends on the attention

    def attention_snapshot(self) -> tuple:
        """What ``restore_attention`` puts back: the attention, the processors it replaced, their state, and the
        processor object of every layer."""
        from . import processors  # deferred: imports diffusers' model modules

        return (self.attention, self.original_processors, self.attention_state,
                processors.layer_processors(self.transformer))

    def restore_attention(self, snapshot: tuple) -> None:
        """The attention of ``attention_snapshot``, with the very processor objects each layer ran then."""
        from . import processors

        if self.attention_state is not None and self.attention_state is not snapshot[2]:
            self.attention_state.retired = True  # (the block's processors, if set back by hand, run the originals)
        self.attention, self.original_processors, self.attention_state, layers = snapshot
        if self.attention_state is not None:  # its processors run the drop-in again (a block may have retired it)
            self.attention_state.retired = False
        processors.set_layer_processors(self.transformer, layers)
        self._drop_plans()

    def _reinstall_replaced_processors(self) -> bool:
        """With ``attention="sparsectx"``, at each new plan (a pipeline call's first step) and before each packed
        forward: processors set since enable (``Flux2KleinKVPipeline.from_pipe`` sets its KV processors on the shared
        transformer) are replaced by sparsectx's again; before, they ran until the next enable. Processors sparsectx
        can not replace (a user's own, set on purpose) stay, with a warning (once), and nothing changes. Returns
        whether every layer runs sparsectx's processor now (only those attend within each sample of a packed
        sequence)."""
        if self.attention != SPARSECTX:
            return False
        from . import processors  # deferred: imports diffusers' model modules

        if processors.processors_installed(self.transformer, self.original_processors):
            return True
        unsupported = processors.unsupported_processors(self.transformer)
        if not unsupported:
            self.set_attention(SPARSECTX)
            return True
        if not self.warned_unsupported:
            self.warned_unsupported = True
            _warn(f"attention processors {unsupported} were set on the transformer after "
                  "enable(attention='sparsectx'); sparsectx can not replace them, so those layers run them "
                  "instead of sparsectx's attention (and samples that keep different tokens run one "
                  "forward each, not one packed sequence); to run them on every layer, enable with "
                  "attention='native'", RuntimeWarning)
        return False

    def uninstall(self) -> None:
        self.recent.release("disable")
        super().uninstall()
        self.set_attention(NATIVE)
        restore_stale_processors(self.transformer)

    def new_call(self) -> None:
        self.epochs_made += 1
        self.call_epoch = self.epochs_made
        self._drop_plans()

    def _drop_plans(self) -> None:
        self.plans = {}
        self.reported = None

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # (without fullgraph, dynamo runs this function eagerly, and compiles the model's forward it calls)
            raise RuntimeError("torch.compile(transformer, fullgraph=True) can not trace sparsectx's selection and "
                               "compaction (host-side decisions made once per call): compile the blocks instead "
                               "(transformer.compile_repeated_blocks(fullgraph=True)) or compile without fullgraph")
        if "torch._dynamo" in sys.modules and not _SparsePatch.host_frames_skipped:
            # a whole-model compile compiled _run_plan's frame (this one falls back to eager), tracing the loop over
            # the groups: each new composition of a batch (group count, samples per group) recompiled the model, and
            # past dynamo's limit new ones ran eagerly; each group's forward is compiled on its own now (and the
            # merge of the groups' rows, a loop over them too, runs as it is)
            _skip_under_dynamo(_SparsePatch._run_plan)
            _skip_under_dynamo(_SparsePatch._run_groups)
            _skip_under_dynamo(_SparsePatch._group_results)
            _skip_under_dynamo(_SparsePatch._merge)
            _SparsePatch.host_frames_skipped = True
        call = self.bind(args, kwargs)
        if self.family == ZIMAGE:
            call["hidden_states"] = self._zimage_rows(call)
        self.reported = None  # (a call that ended inside an enabled call is reported until the next forward)
        # the innermost pipeline call on this forward's stack (a walk of a few frames; inside an enabled call, on
        # LongCat for _pop_overrides' check, on Bria FIBO for its batched guidance): a forward of the running enabled
        # call, or of a pipeline sharing the transformer, not enabled, called inside it (whose forwards run enable's
        # settings and select as a bare transformer's)
        caller = _innermost_pipeline_call(sys._getframe(1)) \
            if self.pipeline_calls or self.family in _FAMILIES_WALKING_THE_STACK else (None, None)
        in_call = bool(self.pipeline_calls) and caller[0] is self.call_pipeline
        overrides = self._pop_overrides(call, in_call, caller)
        if self.family == GLM:  # a write forward: the budget entry and signals of the image it stores
            overrides = self._glm_overrides(call, overrides)
        plan, packable = self._plan(call, overrides, in_call, _guidance_batched(*caller))
        # a KV-cached step's layer caches may carry a kept_index: its range is read once for the forward's layers
        ranges = state_scope(self.attention_state, index_ranges={}) if self.attention_state is not None and \
            call.get("kv_cache_mode") == KV_CACHED else contextlib.nullcontext
        if not torch.is_grad_enabled():
            with ranges():
                result = self._run_plan(call, plan, packable)
        else:
            if self.attention == SPARSECTX:  # its processors' per-forward state is not given to such a recomputation
                refuse_composable_checkpoint(self.transformer, "sparsectx.enable(..., attention='sparsectx')")
            # gradient checkpointing recomputes the blocks during backward, with the processors installed then
            with self.checkpointed_in(functools.partial(self._attention_unchanged, self.attention)), ranges():
                result = self._run_plan(call, plan, packable)
        if self.glm_write is not None and plan.layout is not None:
            self.glm_written.record(call["kv_caches"], self.glm_write, plan.layout.ref_lengths[0])
            self.cache_reports[call["kv_caches"]] = plan
        if self.family == FLUX2 and call.get("kv_cache_mode") == KV_EXTRACT and plan.keep is not None:
            cache = _returned_kv_cache(result)
            if cache is not None:
                self.cache_reports[cache] = plan
        return result

    def _glm_overrides(self, call: dict, overrides: dict) -> dict:
        """GLM-Image: sets ``glm_write`` (``glmimage.Written``: where a write forward's image lies among its request's
        references, None for any other forward) and returns the forward's settings, in a write forward the budget
        entry of its image (``_glm_image_budget``) and a ``user_mask`` signal's columns of it
        (``glmimage.image_signal``), noting the per-request entries they took; a read step checks those against the
        cache's requests (its slots)."""
        from .glmimage import READ, WRITE, cache_mode, grid, image_signal

        from .selection import unread_signals

        kv_caches = call.get("kv_caches")
        mode = cache_mode(kv_caches)
        budget = overrides.get("budget", self.settings.budget)
        self.glm_write = self.glm_written.index(kv_caches) if mode == WRITE else None
        if mode == READ:  # the per-request settings the writes took: one entry per prompt (cache slot)
            slots = len(kv_caches.caches[0].k_caches)
            for name, count in sorted(self.glm_requests.get(kv_caches, {}).items()):
                if count not in (1, slots):
                    raise ValueError(f"{name} has {count} per-request entries, but the KV cache holds the references "
                                     f"of {slots} requests: GLM-Image's requests are its prompts (the samples of a "
                                     "prompt, num_images_per_prompt, share its cache slot and its tokens)")
            for slot, given in sorted(self.glm_per_image.get(kv_caches, {}).items()):
                held = self.glm_written.written(kv_caches, slot)
                for name, (count, unit) in sorted(given.items()):
                    if held is not None and count != held[0 if unit == "images" else 1]:
                        what = "per-image entries" if unit == "images" else "columns"
                        raise ValueError(f"{name} has {count} {what} for request {slot + 1}, but its KV-cache write "
                                         f"forwards stored {held[0]} reference images ({held[1]} rows): give "
                                         f"{'one entry per image' if unit == 'images' else 'one column per row'}")
        if self.glm_write is None:
            return overrides
        shape = grid(call["hidden_states"], self.transformer.config.patch_size)
        overrides = {**overrides, "budget": _glm_image_budget(budget, self.glm_write.slot, self.glm_write.image)}
        requests = self.glm_requests.setdefault(kv_caches, {})
        per_image = self.glm_per_image.setdefault(kv_caches, {})
        if self.glm_write[:2] == (0, 0):  # the cache's first write (a cleared cache written anew)
            requests.clear()
            per_image.clear()
        if _is_per_request(budget):
            requests["budget"] = len(budget)
        spec = _glm_request_budget(budget, self.glm_write.slot)
        if isinstance(spec, list) and len(spec) > 1:  # (one entry applies to every image)
            per_image.setdefault(self.glm_write.slot, {})["budget"] = (len(spec), "images")
        signals = overrides.get("signals", self.settings.signals)
        mask = signals.get("user_mask")
        selector = overrides.get("selector", self.settings.selector)
        if isinstance(mask, torch.Tensor) and not unread_signals(selector, ["user_mask"])[0]:  # (a selector reading it)
            if mask.ndim >= 2:
                requests["signals['user_mask']"] = mask.shape[0]
                if mask.shape[1] != shape[0] * shape[1]:  # (over the request's every reference row)
                    per_image.setdefault(self.glm_write.slot, {})["signals['user_mask']"] = (mask.shape[1], "rows")
            overrides["signals"] = {**signals, "user_mask": image_signal("user_mask", mask, self.glm_write,
                                                                         shape[0] * shape[1])}
        return overrides

    def _run_plan(self, call: dict, plan: _Plan, packable: bool):
        if self.family == GLM:
            return self._run_glm(call, plan)
        if self.family == ZIMAGE:
            return self._run_zimage(call, plan) if plan.groups else self._call_original(**call)
        if self.family == QWEN21 and call.get("kv_cache") is not None:
            if call.get("kv_cache_mode") == KV_CACHED:
                return self._run_qwen21_cached(call, plan)
            if call.get("kv_cache_mode") == KV_EXTRACT:
                return self._run_qwen21_extract(call, plan)
        if self.family == FLUX2 and call.get("kv_cache_mode") is not None:
            if call.get("kv_cache_mode") == KV_EXTRACT and len(plan.groups) > 1:
                return self._run_klein_extract(call, plan)
            found = self.extracted.get(call.get("kv_cache")) if call.get("kv_cache") is not None else None
            if call.get("kv_cache_mode") == KV_CACHED and found is not None:
                return self._run_klein_cached(call, plan, *found)
            if call.get("kv_cache_mode") == KV_CACHED:
                _check_klein_cache_batch(call)
        # a packed sequence needs sparsectx's processors in every layer (other processors would attend across the
        # samples): processors set since are replaced first (a walk over the modules), else each group runs alone
        if plan.groups and packable and not self._per_sample_extras(call) and self._attention_mask(call) is None \
                and self._reinstall_replaced_processors():
            return self._run_packed(call, plan.packing)
        return self._run_groups(call, plan)

    def _run_groups(self, call: dict, plan: _Plan, caches: Optional[list] = None):
        """Each group's forward, merged (``caches``: Qwen-Image 2.1's KV cache of each group); the original forward
        where the plan has no group (no reference tokens: text-to-image, a KV-cached step; or every token kept)."""
        if not plan.groups:
            with self._rope_tables():
                return self._call_original(**call)
        return self._merge(call, plan, self._group_results(call, plan, caches))

    def _group_results(self, call: dict, plan: _Plan, caches: Optional[list] = None) -> list:
        """Each group's forward's result, in group order."""
        if len(plan.groups) > 1 and not plan.hooks_checked:  # (a walk over the modules: once per plan)
            _check_no_stateful_hooks(self.transformer, len(plan.groups))
            plan.hooks_checked = True
        return [self._run_group(call if caches is None else {**call, "kv_cache": cache}, group)
                for group, cache in zip(plan.groups, caches or itertools.repeat(None))]

    def _zimage_rows(self, call: dict) -> torch.Tensor:
        """Z-Image's stand-in ``hidden_states``: the patch rows of each sample's images (``zimage.patch_rows``),
        which the layout's positions index, the selectors read and the later steps are checked against; ``[B, 0]``
        for a call without references, with a missing image or whose samples' images differ (no layout: the layout
        says why). Made anew at each call (a copy of the latents: a checkpoint's recomputation finds its forward by
        the images themselves, ``_forward_inputs``)."""
        x = call.get("x")
        grids = _zimage_grids(call)
        if grids is None or any(None in sample or sample != grids[0] for sample in grids):
            tensors = _nested_tensors(x)
            device = tensors[0].device if tensors else None
            return torch.empty((len(x) if isinstance(x, (list, tuple)) else 0, 0), device=device)
        from .zimage import patch_rows

        return patch_rows(x, *_zimage_patches(call))

    def _forward_inputs(self, call: dict) -> tuple:
        """``(input, tensors)`` of a forward: the tensor whose life marks the forward's (its hidden states), and the
        tensors a checkpoint's recomputation finds it by (with the prompt's). Z-Image: its first sample's last image
        (the target, new at each denoising step), and every image and caption tensor (its hidden_states is
        sparsectx's stand-in, made anew at each call)."""
        if self.family == ZIMAGE:
            x = call.get("x")
            tensors = _nested_tensors(x) + _nested_tensors(call.get("cap_feats"))
            first = _nested_tensors(x[:1]) if isinstance(x, (list, tuple)) else []
            if first:
                return first[-1], tensors
        hidden = call["hidden_states"]
        return hidden, (hidden, *map(call.get, PROMPT_ARGS))

    def _call_original(self, **call):
        """The original forward on ``call`` (Z-Image: without sparsectx's stand-in ``hidden_states``)."""
        if self.family == ZIMAGE:
            call = {name: value for name, value in call.items() if name != "hidden_states"}
        return self.original_forward(**call)

    def _reference_rows(self, call: dict) -> torch.Tensor:
        """``[B, S, ...]``: the rows of the image sequence the layout's positions index (the reference argument;
        JoyImage-Edit: its latents' items as the patch rows its forward makes, ``joyimage.patch_rows``)."""
        if self.family == JOYEDIT:
            from .joyimage import patch_rows

            return patch_rows(call["hidden_states"], self.transformer.config.patch_size)
        if self.family == GLM:
            from .glmimage import patch_rows

            return patch_rows(call["hidden_states"], self.transformer.config.patch_size)
        return call[self.reference_arg]

    def _prompt_values(self, call: dict) -> tuple:
        """The call's prompt tensors (``PROMPT_ARGS``, then the key mask of its attention kwargs, which holds the
        prompt's padding on Bria FIBO): what the probe reads of the prompt. (Selections are kept per ``PROMPT_ARGS``
        tensors only: a mask made anew at every step, a new view of the same one, must not select again.)"""
        return (*map(call.get, PROMPT_ARGS), self._attention_mask(call))

    def _same_prompts(self, call: dict) -> bool:
        """Whether every sample of the call has the first sample's prompt (``_prompt_values``; Z-Image: the same
        caption segments, ``cap_feats[b]``)."""
        if self.family == ZIMAGE:
            samples = call.get("cap_feats") or []
            return all(_same_captions(segments, samples[0]) for segments in samples[1:])
        return all(_same_rows(value) for value in self._prompt_values(call)
                   if isinstance(value, torch.Tensor) or _tensor_sequence(value))

    def _attention_mask(self, call: dict) -> Optional[torch.Tensor]:
        """The key mask in the call's attention kwargs (``attention_mask``: Bria FIBO's prompt padding), or None."""
        return (call.get(_ATTN_KWARGS_ARG[self.family]) or {}).get("attention_mask")

    def _per_sample_extras(self, call: dict) -> bool:
        """Whether a subclass's own argument holds per-sample tensors (a leading dim of the batch): one packed
        sequence can not carry them, so the groups run one after the other, each with its samples' rows."""
        batch = call["hidden_states"].shape[0]
        return any(_per_sample(call[name], batch) for name in self.extra_args(call))

    @contextlib.contextmanager
    def _attention_unchanged(self, attention: str):
        """The scope of a checkpointed block of a forward that ran ``attention``: its recomputation during backward
        runs the attention processors installed then, so ``RuntimeError`` when they are no longer that forward's
        (enabled again with another attention, disabled after sparsectx's attention, drop training enabled), where
        the backward would otherwise fail inside torch's checkpoint with a mismatch of saved tensors."""
        patch = getattr(self.transformer, PATCH_ATTR, None)
        now = ("drop training" if getattr(self.transformer, DROP_TRAINING_ATTR, None) is not None
               else patch.attention if patch is not None else NATIVE)
        if now != attention:
            raise RuntimeError(f"the transformer's attention changed between a forward and its backward (the forward "
                               f"ran {attention!r} attention, its layers now run {now!r}): gradient checkpointing "
                               "recomputes that forward's blocks with the processors installed now; enable with "
                               "another attention, or disable, after the backward")
        yield

    @_eager_under_compile  # host work once per call (layout, selection, groups): eager beside a compiled model
    def _plan(self, call: dict, overrides: dict, in_call: bool, guidance_pairs: Optional[str] = None) -> tuple:
        """``(plan, packable)``: the cached plan of this step's inputs, or a new one (layout, selection, groups);
        ``packable``: the plan has a packing and this step's samples share their modulation (timestep, guidance).
        ``in_call``: the forward is one of the running enabled pipeline call's; ``guidance_pairs``: None, or its batch
        holds guidance's two branches, the conditional samples in that half (``_guidance_batched``)."""
        self._check_ids_cover_the_sequence(call)
        key, recomputation = self._forward_key(call, self._plan_key(call, overrides, in_call, guidance_pairs))
        plan = self.plans.get(key)
        if plan is None and recomputation and key[-2] is not None:
            # a new selection would not be the one the forward used, and the gradients would be wrong
            raise RuntimeError(
                f"this training forward recomputes one whose selection is no longer cached (sparsectx keeps the "
                f"plans of the latest {MAX_PLANS} forwards of a pipeline call or a training loop): run the backward "
                f"of a checkpointed transformer forward before {MAX_PLANS - 1} more forwards, or checkpoint its "
                "blocks (gradient checkpointing) instead")
        cached_step = call.get("kv_cache_mode") == KV_CACHED
        if plan is not None:
            # a KV-cached step holds no reference token: its plan (nothing to select) fits any such step with the
            # key's shapes, so it is reused without the check's host read
            matches, packable = (True, False) if cached_step else self._step_checks(plan, call)
            if matches:
                if in_backward():  # a checkpoint's recomputation of an earlier forward:
                    replay_draw(plan.drawn)  # the global RNG as its draw left it; last_selection stays the latest's
                    return plan, packable
                self.plans[key] = self.plans.pop(key)  # most recently used last: evicted last, reported by cache
                if plan.keep is None:  # a KV-cached step after a new extract step (a transformer enabled alone
                    plan.reports = self._reported_plan(key, call)  # reuses its plan): report that extract's selection
                return plan, packable
        self._reinstall_replaced_processors()
        training_input = key[-2] is not None
        before = rng_states(call["hidden_states"].device) if training_input else None
        try:
            layout, unverified = (None, None) if cached_step else self._known_layout(call)
        except _SampleLayoutsDiffer as differ:
            # JoyImage-Edit-Plus and Z-Image Omni run samples of other references right (each its own RoPE, its
            # padding masked): a budget keeping every token runs their original forward on them, as on any batch
            if self.family not in (JOYPLUS, ZIMAGE) or not _keeps_every_token(
                    overrides.get("budget", self.settings.budget), call["hidden_states"].shape[0], differ.lengths,
                    guidance_pairs):
                raise
            layout, unverified = None, None
        plan = None
        if unverified is not None:  # a layout found on earlier ids: the selection's read checks the call's ids
            plan = self._selection_plan(call, layout, overrides, unverified, guidance_pairs)
            if plan is None:  # they differ: this call's own layout
                layout = self._read_layout(call)
        if plan is None and layout is not None and not guidance_pairs and key.training is None:
            plan = self._conditional_half_plan(call, layout, key)
        if plan is None and layout is None:
            plan = self._new_plan(call, None, None, [])
            # a KV-cached step: its call's selection, found now while the call's prompt is alive (a pipeline frees
            # it when the call returns), is what last_selection reports after the call
            plan.reports = self._reported_plan(key, call)
            plan.reads_kv_cache = self._reads_kv_cache(call)
        elif plan is None:
            plan = self._selection_plan(call, layout, overrides, None, guidance_pairs)
        if training_input:
            plan.drawn = drawn_rng(call["hidden_states"].device, before)
            selector = overrides.get("selector", self.settings.selector)
            # (a plan without groups drops nothing: every token kept, e.g. by a keep-all budget, which draws nothing)
            if in_backward() and plan.drawn is None and plan.keep is not None and plan.groups \
                    and getattr(selector, "reads_generator", True):
                _warn("a training forward ran during backward (a torch.utils.checkpoint recomputation) and "
                      "its forward's selection can not be found (its input tensors were made inside the "
                      "checkpointed function?): it selected anew, and a selector drawing from its own "
                      "generator drew another mask, so its gradients are wrong. Pass the input tensors to "
                      "the checkpoint as arguments.", RuntimeWarning)
        self.plans.pop(key, None)
        self._make_room(key)
        self.plans[key] = plan
        return plan, plan.packing is not None and all(_uniform_over_batch(call).tolist())

    def _make_room(self, key: _PlanKey) -> None:
        """Frees the plans a new plan of ``key`` displaces: inference plans of prompts that are gone (their keys
        match nothing again), then the least recently used ones beyond the cap: ``MAX_PROMPT_PLANS`` for an
        inference plan keyed by its prompt (requests interleaved on a transformer outside enabled pipeline calls:
        each keeps its selection), ``MAX_PLANS`` otherwise (a pipeline call's plans; a training loop's latest
        forwards)."""
        # (not a training forward's: a checkpoint may still recompute it, found by its input's memory and view
        # while a prompt made inside the checkpointed function, e.g. an expanded view, is gone)
        for old in [old for old in self.plans if old.prompt is not None and old.training is None and not all(
                entry is None or entry[0].ref() is not None for entry in old.prompt)]:
            del self.plans[old]
        cap = MAX_PROMPT_PLANS if key.prompt is not None and key.training is None else MAX_PLANS
        while len(self.plans) >= cap:
            self.plans.pop(next(iter(self.plans)))

    def _known_layout(self, call: dict) -> tuple:
        """``(layout, unverified)`` of a new plan's call. FLUX: the layout found earlier on ids of the same shape
        (and inference mode), with ``unverified`` the device flag that the call's ids equal those, read later with
        the selection's keep mask: the call's selection is queued without waiting for the device to reach its ids,
        and the layout's host work is not done again. Else the layout found now (FLUX: a host read of the ids),
        ``unverified`` None."""
        ids = self._layout_ids(call)
        known = None if ids is None else self.layouts.get(self._layout_key(ids))
        if known is None:
            return self._read_layout(call), None
        seen_ids, layout = known
        flags = [torch.eq(now, seen).all() for now, seen in zip(ids, seen_ids)]
        return layout, flags[0] if len(flags) == 1 else torch.stack([f.to(ids[0].device) for f in flags]).all()

    def _read_layout(self, call: dict) -> Optional[_Layout]:
        """The call's layout, found on its ids or image shapes; FLUX's kept for later calls on ids of that shape."""
        layout = reference_layout(self.family, call, self.transformer)
        ids = self._layout_ids(call)
        if layout is not None and ids is not None:
            key = self._layout_key(ids)
            self.layouts.pop(key, None)
            if len(self.layouts) >= MAX_LAYOUTS:
                self.layouts.pop(next(iter(self.layouts)))
            self.layouts[key] = (tuple(t.detach().clone() for t in ids), layout)
        return layout

    def _layout_ids(self, call: dict) -> Optional[tuple]:
        """The id tensors a layout is read from: FLUX's ``img_ids``; FLUX.3's ``image_cond_ids`` and its ``img_ids``
        (the target's grid); None without reference ids."""
        ids = call.get(self.reference_ids_arg)
        if ids is None:
            return None
        target = call.get("img_ids") if self.family == FLUX3 else None
        return (ids,) if target is None else (ids, target)

    @staticmethod
    def _layout_key(ids: tuple) -> tuple:
        # (index tensors made under torch.inference_mode can not be saved for backward: layouts per mode)
        return (torch.is_inference_mode_enabled(), *((tuple(t.shape), t.dtype, t.device) for t in ids))

    def _selection_plan(self, call: dict, layout: _Layout, overrides: dict, unverified: Optional[torch.Tensor],
                        guidance_pairs: Optional[str]) -> Optional[_Plan]:
        """A new selection's plan on ``layout``. With ``unverified`` (``_known_layout``): None when the call's ids
        differ from the layout's, read with the keep mask, or before an error is raised on that layout (which is
        then not the call's). ``guidance_pairs``: ``_select_guidance_pairs``."""
        try:
            self._check_supported(call, layout)
            if guidance_pairs:
                keep, nan = self._select_guidance_pairs(call, layout, overrides, guidance_pairs)
            else:
                keep, nan = self._select(call, layout, overrides)
            groups, packing = self._groups(call, layout, keep, unverified, nan)
        except _LayoutChanged:
            return None
        except Exception:
            if unverified is not None and not bool(unverified):
                return None
            raise
        plan = self._new_plan(call, layout, keep, groups, packing)
        plan.pairs = guidance_pairs
        return plan

    def _conditional_half_plan(self, call: dict, layout: _Layout, key: _PlanKey) -> Optional[_Plan]:
        """A step that runs guidance's conditional samples alone after steps of the same call that batched both
        branches (Z-Image Omni's ``cfg_truncation``): the plan of the call's guidance-pair selection, restricted to its
        conditional half; else None (the step selects anew). The call keeps one selection for every step, also with a
        selector that would draw or probe again. Of the same call: the same call epoch and settings, and outside an
        enabled pipeline's call (its transformer enabled alone) prompt tensors that are the pair's conditional half's;
        the layout and the reference rows are that half's (one host read)."""
        batch = call["hidden_states"].shape[0]
        n_args = len(PROMPT_ARGS)
        for plan_key, paired in reversed(self.plans.items()):
            if not paired.pairs or paired.keep is None or paired.layout is None or paired.keep.shape[0] != 2 * batch \
                    or plan_key.epoch != key.epoch or plan_key.inference != key.inference \
                    or plan_key.attention != key.attention or plan_key.settings != key.settings \
                    or plan_key.lora != key.lora:
                continue
            if key.prompt is not None:  # (outside an enabled call: the captions of the pair's conditional samples)
                captions, paired_captions = key.prompt[n_args:], plan_key.prompt[n_args:]
                half = paired_captions[:len(captions)] if paired.pairs == "first" else \
                    paired_captions[len(paired_captions) - len(captions):]
                if key.prompt[:n_args] != plan_key.prompt[:n_args] or not captions or half != captions:
                    continue
            if paired.layout.ref_lengths != layout.ref_lengths or not torch.equal(paired.layout.ref_host,
                                                                                   layout.ref_host):
                continue
            rows = slice(0, batch) if paired.pairs == "first" else slice(batch, 2 * batch)
            if not torch.equal(self._reference_rows(call).detach()[:, layout.ref_positions], paired.references[rows]):
                return None
            keep = paired.keep[rows]
            return self._new_plan(call, layout, keep, *self._groups(call, layout, keep))
        return None

    def _plan_key(self, call: dict, overrides: dict, in_call: bool, guidance_pairs: Optional[str] = None) -> tuple:
        """Host-side facts a plan depends on: the call epoch (first), inference mode, the input shapes and Qwen's image
        shapes (JoyImage's shape_list), the KV mode, whether the batch holds guidance pairs, the selection settings
        (budget, selector, signals) in effect, outside an enabled pipeline's call the LoRA state, (second to last) a
        training forward's number, and (last) outside an enabled pipeline's call the prompt's tensors (selectors may
        read the prompt; and a forward that selects nothing reports the latest selection on its prompt only)."""
        ids = call.get(self.reference_ids_arg)
        references = call.get(self.reference_arg)  # (FLUX.3: an input of their own)
        signals = overrides.get("signals", self.settings.signals)
        training = self._training_forward()
        if training:
            self.training_forwards += 1
        # index tensors made under torch.inference_mode can not be saved for backward: a plan per mode
        return _PlanKey(
                self.call_epoch, torch.is_inference_mode_enabled(), self.attention, self.pack,
                (tuple(call["hidden_states"].shape), None if ids is None else tuple(ids.shape),
                 None if references is None else tuple(references.shape),
                 repr(call.get("img_shapes")), repr(call.get("shape_list")), call.get("kv_cache_mode"),
                 repr(_zimage_grids(call)) if self.family == ZIMAGE else
                 (_glm_cache_mode(call), self.glm_write) if self.family == GLM else None),
                guidance_pairs,
                (_budget_key(overrides.get("budget", self.settings.budget)),
                 overrides.get("selector_key", _selector_key(overrides.get("selector", self.settings.selector))),
                 tuple((name, _object_key(value)) for name, value in sorted(signals.items()))),
                # a training forward (a bare transformer in train mode) selects anew (a random drop selector draws a
                # new mask at every step, as drop training does, even on the same input tensors), and a
                # recomputation of that forward (a checkpoint around the transformer) finds its key (_forward_key)
                # outside an enabled pipeline's call, the LoRA adapters the probe's q and k run with (the call's
                # scale, the adapters' state): a forward at another LoRA setting on the same prompt selects anew
                None if in_call else _lora_key(self.transformer, call.get(_ATTN_KWARGS_ARG[self.family])),
                self.training_forwards if training else None,
                # outside an enabled pipeline's call (a bare transformer, or a pipeline sharing an enabled
                # transformer, also one called inside an enabled call) nothing marks where a call starts: the prompt's
                # tensors (embedding, Qwen's text mask, FLUX.1's pooled projection: the probe reads each) key the
                # selection
                None if in_call else
                tuple(None if value is None else _object_key(value) for value in map(call.get, PROMPT_ARGS)) +
                tuple(map(_object_key, _nested_tensors(call.get("cap_feats")))))

    def _forward_key(self, call: dict, key: tuple) -> tuple:
        """``(plan key, recomputation)`` of this forward: during a backward pass (a checkpoint's recomputation) the key
        its forward used, found by its input and prompt tensors (``RecentForwards``: ``key`` depends on the mode,
        which may have changed since, and a training forward's on its number), with ``recomputation`` True; else
        ``key``, remembered for such a recomputation. A forward in eval mode does not replace the key of a live
        training forward on the same inputs (a validation pass between a training forward and its backward)."""
        hidden, tensors = self._forward_inputs(call)
        if hidden.is_inference() or _func_wrapped(hidden):  # torch.inference_mode: no backward to come; a
            return key, False  # torch.func transform's tensor: no storage to key it by, no checkpoint recomputing it
        inputs = RecentForwards.key(*tensors)
        found = self.recent.find(inputs)
        if in_backward():
            if found is None:
                return key, False
            if found.ambiguous and not found.recomputed:
                _warn("a training forward ran during backward (a torch.utils.checkpoint recomputation) on "
                      "input tensors that two forwards took: it is recomputed with the latest one's selection, "
                      "and if it is the earlier one its gradients are wrong. Pass distinct hidden_states "
                      "tensors to checkpointed forwards.", RuntimeWarning)
            found.recomputed = True
            return found.record, True
        training = self._training_forward()
        if found is None or training or not found.training:
            self.recent.remember(inputs, RecentForward(
                weakref.ref(hidden), key, training, patched=training, in_checkpoint=training and reentrant_forward(),
                ambiguous=found is not None and found.training and not found.recomputed))
        return key, False

    def _training_forward(self) -> bool:
        """A forward of a training loop: the transformer in train mode outside an enabled pipeline's call (with or
        without gradients: a reentrant checkpoint runs the forward under no_grad)."""
        return self.transformer.training and not self.pipeline_calls

    def _new_plan(self, call: dict, layout: Optional[_Layout], keep: Optional[torch.Tensor], groups: list,
                  packing: Optional[_Packing] = None) -> _Plan:
        ids = call.get(self.reference_ids_arg)
        # (read from the detached input: a checkpoint's recompute, which reuses the plan, must record what its
        # forward recorded)
        references = None if layout is None else \
            self._reference_rows(call).detach()[:, layout.ref_positions].clone()
        return _Plan(layout, keep, groups, None if ids is None else ids.detach().clone(), references, packing)

    def _step_checks(self, plan: _Plan, call: dict) -> tuple:
        """``(matches, packable)`` in one host read: whether this step's reference ids (FLUX's ``img_ids``, FLUX.3's
        ``image_cond_ids``: the layout comes from them) and reference rows (the selection was made on them) equal the
        plan's, and, for a plan with a packing, whether the samples share their timestep and guidance."""
        checks = []
        if plan.ids is not None:
            checks.append(torch.eq(call[self.reference_ids_arg], plan.ids).all())
        if plan.layout is not None:
            references = self._reference_rows(call).detach()  # (of the plan's shape: the plan's key holds it)
            checks.append(torch.eq(references[:, plan.layout.ref_positions], plan.references).all())
        n_match = len(checks)
        if plan.packing is not None:
            checks.append(_uniform_over_batch(call).all())
        # img_ids may live on another device than the hidden states (diffusers accepts CPU ids)
        device = call["hidden_states"].device
        flags = torch.stack([flag.to(device) for flag in checks]).tolist() if checks else []
        return all(flags[:n_match]), plan.packing is not None and all(flags[n_match:])

    def _pop_overrides(self, call: dict, in_call: bool, caller: tuple) -> dict:
        """This forward's per-call settings: those in its attention kwargs (taken out of them), else those given to
        the enabled pipeline's call when no forward of the call got them (its blocks do not hand them on) and this
        forward is one of that call's (``in_call``). ``caller``: ``(pipeline, frame)`` of the innermost pipeline
        call on the forward's stack, where it was looked for."""
        name = _ATTN_KWARGS_ARG[self.family]
        attn_kwargs = call.get(name)
        if not attn_kwargs or CALL_KWARG not in attn_kwargs:
            if not in_call and (self.family == LONGCAT or (self.family == ZIMAGE and name not in
                                                              self.signature.parameters)):
                self._refuse_settings_no_forward_gets(*caller)
            if self.call_overrides is None or self.call_overrides_arrived or not in_call:
                return {}
            return self.call_overrides
        if in_call:
            self.call_overrides_arrived = self.call_overrides is not None
        attn_kwargs = dict(attn_kwargs)  # never mutate the caller's (the pipeline's) dicts
        raw = attn_kwargs.pop(CALL_KWARG)
        call[name] = attn_kwargs or None
        return self.checked_overrides(raw, self._overrides_place())

    def _overrides_place(self) -> str:
        """Where this call's per-call settings came from, for messages (``_overrides_place``)."""
        pipeline_kwarg = self.pipeline_kwarg or _PIPELINE_ATTN_KWARGS_ARG[self.family]
        return _overrides_place(pipeline_kwarg, _ATTN_KWARGS_ARG[self.family])

    def _refuse_settings_no_forward_gets(self, owner, frame) -> None:
        """LongCat-Image (and Z-Image Omni where its forward takes no ``joint_attention_kwargs``, diffusers < 0.42)
        with its transformer enabled alone: per-call settings given to the running pipeline's
        (``owner``, its ``__call__`` at ``frame``) ``joint_attention_kwargs`` reach no forward (the pipeline hands
        that keyword to nobody, and only an enabled pipeline's call takes them): ``ValueError`` rather than a call
        that silently runs ``enable``'s settings."""
        given = None if owner is None else frame.f_locals.get(_PIPELINE_ATTN_KWARGS_ARG[self.family])
        if isinstance(given, collections.abc.Mapping) and CALL_KWARG in given:
            raise ValueError(f"{type(owner).__name__}'s {_PIPELINE_ATTN_KWARGS_ARG[self.family]}['{CALL_KWARG}'] "
                             "reaches no transformer forward (the pipeline hands that keyword to nobody): enable the "
                             "pipeline, sparsectx.enable(pipe, ...), not its transformer alone, for per-call settings")

    def checked_overrides(self, raw, where: str) -> dict:
        """The per-call settings ``raw`` (``where``: the keyword they came through, for messages) checked and
        resolved: also run by an enabled pipeline's call before its own work (encoding the prompt and images)."""
        if raw is not None and not isinstance(raw, collections.abc.Mapping):
            raise TypeError(f"{where} must be a dict with keys from {OVERRIDE_KEYS} (e.g. {{'budget': 0.1}}), got "
                            f"{type(raw).__name__}")
        overrides = dict(raw or {})
        unknown = set(overrides) - set(OVERRIDE_KEYS)
        if unknown:
            raise ValueError(f"{where} accepts {OVERRIDE_KEYS}, got unknown keys {sorted(unknown)}")
        try:
            if "budget" in overrides:
                overrides["budget"] = check_budget(overrides["budget"])
            if "signals" in overrides:
                overrides["signals"] = _check_signals(overrides["signals"])
            if "selector" in overrides:
                # the user's object keys the cached selection (its wrapper is new at every step)
                overrides["selector_key"] = _selector_key(overrides["selector"])
                overrides["selector"] = _resolve_selector(overrides["selector"])
            _check_settings_for(overrides.get("selector", self.settings.selector),
                                overrides.get("budget", self.settings.budget),
                                overrides.get("signals", self.settings.signals), self.warned_unread)
            # (enable's signals, once a per-call selector reads them)
            _warn_ids_grid(self.family, overrides.get("selector", self.settings.selector),
                           overrides.get("signals", self.settings.signals if "selector" in overrides else {}),
                           self.warned_unread)
        except (TypeError, ValueError) as error:  # (the same message as enable's, saying where the value came from)
            raise (TypeError if isinstance(error, TypeError) else ValueError)(f"{where}: {error}") from None
        return overrides

    def _check_ids_cover_the_sequence(self, call: dict) -> None:
        """FLUX.1 / FLUX.2 / LongCat / FIBO: one ``img_ids`` row per ``hidden_states`` token, as the unpatched model
        needs (its RoPE tables come from the ids). The layout is read from the ids alone, so rows past them would
        be dropped from the sequence and answered with zeros, and a shorter sequence failed deep inside."""
        ids = call.get("img_ids") if self.family in TARGET_PLANES else None
        hidden = call.get("hidden_states")
        if isinstance(ids, torch.Tensor) and isinstance(hidden, torch.Tensor) and ids.ndim in (2, 3) \
                and hidden.ndim == 3 and ids.shape[-2] != hidden.shape[1]:
            raise ValueError(f"img_ids has {ids.shape[-2]} rows but hidden_states {hidden.shape[1]} tokens: each "
                             "image token (target and references) needs its id row")

    def _check_supported(self, call: dict, layout: _Layout) -> None:
        if getattr(self.transformer, "_parallel_config", None) is not None:
            raise RuntimeError(f"sparsectx's drop-in does not support diffusers {_parallelism(self.transformer)} "
                               "(set on the transformer after enable): disable parallelism first")
        for name in _UNSUPPORTED_ARGS:
            if call.get(name) is not None:
                raise ValueError(f"sparsectx does not support {name} (ControlNet residuals are laid out for the "
                                 "full image sequence)")
        if self.family == QWEN21 and call.get("kv_cache") is not None and \
                not self.transformer.config.causal_condition:
            raise ValueError("kv_cache requires the model's causal_condition=True (diffusers' rule: the prefix is "
                             "step-independent only when text and condition tokens modulate from t = 0)")
        if self.family == FLUX3 and call[self.reference_arg].shape[1] != layout.ref_positions.numel():
            raise ValueError(f"image_cond_hidden_states holds {call[self.reference_arg].shape[1]} reference tokens "
                             f"but image_cond_ids {layout.ref_positions.numel()}")
        if call.get("kv_cache_mode") == KV_EXTRACT and self.family == FLUX2:
            n_ref = layout.ref_positions.numel()
            if call.get("num_ref_tokens") != n_ref or int(layout.ref_host[-1]) != n_ref - 1:
                raise ValueError("KV extract step: the reference tokens must be the first num_ref_tokens rows of "
                                 f"hidden_states (num_ref_tokens={call.get('num_ref_tokens')}, found {n_ref})")

    def _warn_eval_drop_forward(self) -> None:
        """Warns once that a forward with gradients of a model with trainable parameters ran a random drop selector
        in eval mode, which drops nothing (as drop training warns)."""
        if self.warned_eval_drop or not torch.is_grad_enabled() or \
                not any(p.requires_grad for p in self.transformer.parameters()):
            return
        self.warned_eval_drop = True
        _warn("sparsectx: a forward with gradients ran in eval mode with random_drop_selector and dropped no reference "
              "token (its masks are drawn in train mode only): call transformer.train() to train with drop masks "
              "(or run evaluation under torch.no_grad())", UserWarning)

    def _select(self, call: dict, layout: _Layout, overrides: dict) -> tuple:
        """``(keep, nan)``: bool ``[B, N]``, the reference tokens each sample keeps (the selector's mask, or each
        image's budget of its scores), and the selector's NaN check still on the device (``_NaNCheck``, for fixed
        counts; None where the selection has checked its scores itself, or runs no selector)."""
        hidden = self._reference_rows(call)
        references = hidden.detach()[:, layout.ref_positions]  # (selection is not differentiated: nothing recorded)
        if references.ndim > 3:  # (JoyImage-Edit-Plus's rows are patches [C, pt, ph, pw]: one feature vector each)
            references = references.flatten(2)
        batch = call["hidden_states"].shape[0]
        if references.shape[0] == 1 and batch > 1:  # (FLUX.3's references of one sample serve every sample)
            references = references.expand(batch, *references.shape[1:])
        budget = overrides.get("budget", self.settings.budget)
        selector = overrides.get("selector", self.settings.selector)
        signals = _per_request_signals(overrides.get("signals", self.settings.signals), batch)
        if self.family == GLM:
            _check_glm_selector(selector, signals)
        from .selection import SelectionContext

        from .selection import (budget_first_sample, budget_for_batch, budget_request_count, budget_same_per_sample,
                                 mask_ranking, selected_keep)

        try:  # (a per-call budget is checked against the batch and the layout here, its first forward)
            counts = None if budget is None or _is_budget_fn(budget) else budget_counts(budget, batch,
                                                                                        layout.ref_lengths)
            batch_budget = budget_for_batch(budget, batch)  # a budget object's per-request settings over the batch
        except (TypeError, ValueError) as error:
            if "budget" not in overrides:
                raise
            raise type(error)(f"{self._overrides_place()}: {error}") from None
        # a random drop selector draws in train mode only, as drop training does: an eval-mode forward (a validation
        # pass) keeps every token and leaves its generator alone
        eval_drop = selector.draws_kept_count and not self.transformer.training
        if eval_drop:
            self._warn_eval_drop_forward()
        if eval_drop or (counts is not None and all(list(c) == list(layout.ref_lengths) for c in counts)):
            # every token of every image kept, whatever the scores: no selector runs, so none draws from torch's
            # global RNG (a keep-all call equals the unpatched one, the random stream after it included)
            return torch.ones(references.shape[:2], dtype=torch.bool, device=hidden.device), None
        budget = batch_budget
        seed = self.settings.seed if self.settings.seed is not None else self.call_seed
        # one generator per image (diffusers' per-image seeds): a sample draws what its request would draw alone (also
        # under a KV cache: samples keeping different tokens fill a cache each); a list of another length than the
        # batch seeds every sample with the first generator's seed
        if self.glm_write is not None:  # GLM-Image selects each reference image in a forward of its own
            seed = _glm_seed(seed, self.glm_write)
        sample_seeds = seed if (isinstance(seed, tuple) and len(seed) == batch and selector.reads_generator) else None
        seed = seed[0] if isinstance(seed, tuple) else seed

        _check_ref_shapes_signal(signals, layout)
        # where a request's samples may begin, whatever their prompts: each request of a per-request budget (a list's
        # rows, a budget object's per-request settings: equal rows too, the requests are named), other counts
        per_request = overrides.get("budget", self.settings.budget)
        requests = len(per_request) if _is_per_request(per_request) else budget_request_count(per_request)
        run_starts = set(range(batch // requests, batch, batch // requests)) \
            if requests and batch % requests == 0 else set()
        if counts is not None:
            run_starts |= {b for b in range(1, batch) if list(counts[b]) != list(counts[b - 1])}
        # what the probe's runs of a request's samples are split by (_probe_leaders): those starts, per-sample signals
        runs = (run_starts, [value for value in signals.values() if isinstance(value, torch.Tensor) and
                             value.ndim and value.shape[0] == batch])

        def select(shared: bool) -> tuple:
            generator = None if seed is None else torch.Generator(device=hidden.device).manual_seed(seed)
            sample_generators = None if sample_seeds is None or shared else [
                torch.Generator(device=hidden.device).manual_seed(s) for s in sample_seeds]
            extra = {**layout.extra, **_signals_for(signals, batch, shared, hidden.device)}
            # the automatic probe, unless the user gave their own: it runs only if a selector asks for a probe
            # tensor the signals lack (probe tensors given in the signals are used as given)
            if "attention_probe" not in signals and self.family != GLM:  # (GLM-Image's: _check_glm_selector)
                extra["attention_probe"] = self._attention_probe(call, layout, shared, references, runs)
            context = SelectionContext(num_references=len(layout.ref_lengths), ref_lengths=list(layout.ref_lengths),
                                       reference_ids=layout.reference_ids, target_shape=layout.target_shape,
                                       generator=generator, extra=extra, sample_generators=sample_generators)
            latents = references[:1] if shared else references
            nan = None
            if counts is None:  # budget None (a keep mask as given) or a budget callable: select()'s rule
                keep = selected_keep(selector, latents, context, budget_first_sample(budget) if shared else budget)
            else:  # fixed counts, which may differ per request: select()'s rule, per sample
                # (the scores' NaN check is read with the keep mask, in _groups: NaN scores rank first meanwhile)
                selection = selector(latents, context, nan_check=False)
                if selection.dtype == torch.bool:
                    ranking = mask_ranking(selection, latents, context)
                else:
                    ranking, nan = selection, _NaNCheck(torch.isnan(selection).any(), selector.name)
                keep = keep_mask_from_scores(ranking, counts[:1] if shared else counts, layout.ref_lengths)
            keep = keep.to(hidden.device)
            return (keep.expand(batch, -1) if shared else keep), nan

        # pipelines repeat the same references over the batch: select once so the batch runs as one group (unless
        # a per-sample signal differs, or, found by the probe when a selector reads it, the prompts differ)
        if counts is None:  # a budget object's settings may differ per sample
            same_counts = budget_same_per_sample(budget)
        else:
            same_counts = all(c == counts[0] for c in counts)
        shared = batch > 1 and same_counts and sample_seeds is None and _same_rows(references) and \
            all(_same_rows(value) for value in signals.values()
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch)
        try:
            try:
                return select(shared)
            except _SamplesDiffer:
                return select(False)
        except (TypeError, ValueError) as error:  # a per-call signal refused: said where it came from
            given = overrides.get("signals") or {}
            if type(error) in (TypeError, ValueError) and any(f"'{name}'" in str(error) for name in given):
                raise type(error)(f"{self._overrides_place()}: signals: {error}") from None
            raise

    def _select_guidance_pairs(self, call: dict, layout: _Layout, overrides: dict, conditional: str) -> tuple:
        """``_select`` of a batch holding guidance's two branches, as many samples each, the conditional ones in
        the ``conditional`` half (``"second"``: Bria FIBO Edit's call with ``guidance_scale > 1``; ``"first"``:
        Z-Image Omni's): the conditional half is selected (on its prompts, one request per sample: per-request
        budgets and per-image generators count the requests) and each unconditional sample keeps what its
        conditional partner keeps, so both branches of guidance see the same reference tokens."""
        batch = call["hidden_states"].shape[0]
        if batch % 2:  # (not the pipeline's guidance batch)
            return self._select(call, layout, overrides)
        half = batch // 2
        rows = slice(half, batch) if conditional == "second" else slice(0, half)
        others = slice(0, half) if conditional == "second" else slice(half, batch)
        # a per-request budget or a per-sample signal given for the forward's batch (both branches): the
        # conditional half's, which the other half must repeat (else it was meant for other requests, e.g. a
        # budget of two requests given to a call of one prompt: one of them was dropped without a word)
        budget = overrides.get("budget", self.settings.budget)
        if _is_per_request(budget) and len(budget) == batch:
            if list(map(list, budget[rows])) != list(map(list, budget[others])):
                raise ValueError(f"a per-request budget has {batch} entries for a batch of {half} requests under "
                                 f"guidance (its {batch} samples: each request's negative and positive branches): "
                                 f"give one entry per request ({half}), or the same entries for both branches")
            overrides = {**overrides, "budget": budget[rows]}
        signals = overrides.get("signals", self.settings.signals)
        batched = [name for name, v in signals.items()
                   if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch]
        for name in batched:
            value = signals[name]
            if not _same_values(value[rows], value[others]):
                raise ValueError(f"signal {name!r} has {batch} rows for a batch of {half} requests under guidance "
                                 f"(its {batch} samples: each request's negative and positive branches): give one row "
                                 f"per request ({half}), or the same rows for both branches")
        if batched:
            overrides = {**overrides, "signals": {name: v[rows] if name in batched else v
                                                  for name, v in signals.items()}}
        keep, nan = self._select(self._slice_batch(call, list(range(batch))[rows]), layout, overrides)
        return torch.cat([keep, keep]), nan

    def _attention_probe(self, call: dict, layout: _Layout, shared: bool, references: torch.Tensor,
                         runs: tuple) -> Callable:
        """``extra["attention_probe"]`` for this call: selectors call it at most once, only when they need a probe
        tensor. A batch that shares its references and its prompt is probed on its first sample (the batch the
        selector sees); in another batch each sample is probed as its request's first sample (``_probe_leaders``),
        so a request's samples keep what they keep when the request runs alone."""

        def probe(reference_latents: torch.Tensor, context) -> dict:
            if shared and (runs[0] or not self._same_prompts(call)):
                # the probe reads the prompt and the latents: each sample is selected on its own, probed as its
                # request's first sample (requests a per-request budget names are probed apart, prompts equal or not)
                raise _SamplesDiffer
            if shared:
                probed = self._slice_batch(call, [0])
            else:
                leaders = self._probe_leaders(call, references, *runs)
                probed = call if leaders == list(range(len(leaders))) else self._slice_batch(call, leaders)
            return _probe_tensors(_probe_qk(self.transformer, self.family, self._call_original, probed, layout))

        return probe

    def _probe_leaders(self, call: dict, references: torch.Tensor, starts: set, compared: list) -> list:
        """For each sample, the first sample of its run: consecutive samples that share their references, prompt
        and rows of the per-sample ``compared`` tensors (signals), a run split at each of ``starts`` (a per-request
        budget's rows, other counts): a request's ``num_images_per_prompt`` samples. Run alone, such a request shares
        its batch and is probed on its first sample; probing each sample as its run's first gives the request's
        samples that selection in any batch (one host read)."""
        batch = call["hidden_states"].shape[0]
        if batch < 2:
            return list(range(batch))
        tensors = [references, *compared]
        for value in self._prompt_values(call):
            tensors += [value] if isinstance(value, torch.Tensor) else list(value) if _tensor_sequence(value) else []
        same = torch.ones(batch - 1, dtype=torch.bool, device=references.device)
        for t in tensors:
            if t.ndim and t.shape[0] == batch:
                same &= (t[1:] == t[:-1]).reshape(batch - 1, -1).all(1).to(same.device)
        same = same.tolist()
        if self.family == ZIMAGE:  # (its prompts: each sample's caption segments)
            captions = call.get("cap_feats") or []
            for b in range(1, min(batch, len(captions))):
                same[b - 1] = same[b - 1] and _same_captions(captions[b], captions[b - 1])
        leaders = [0]
        for b in range(1, batch):
            leaders.append(leaders[-1] if same[b - 1] and b not in starts else b)
        return leaders

    # -- groups of samples that keep the same tokens ---------------------------------------------------------------
    def _groups(self, call: dict, layout: _Layout, keep: torch.Tensor, unverified: Optional[torch.Tensor] = None,
                nan: Optional[_NaNCheck] = None) -> tuple:
        """``(groups, packing)`` of a selection, their indices built on the host once and queued to the device
        (copies from pinned memory: no wait). No group when every token is kept; a packing (FLUX.2 with sparsectx
        attention, several groups, no KV cache) to run the groups as one sequence. Device flags read with the keep
        mask, in one read: ``unverified`` (``_LayoutChanged`` when it is false), then ``nan`` (``ValueError`` naming
        the selector when its scores held NaN)."""
        flags = [flag for flag in (unverified, None if nan is None else nan.flag) if flag is not None]
        if not flags:
            keep_host = keep.cpu()
        else:
            read = torch.cat([keep.flatten(), *(flag.to(keep.device, torch.bool).reshape(1) for flag in flags)]).cpu()
            if unverified is not None and not bool(read[keep.numel()]):
                raise _LayoutChanged
            if nan is not None and bool(read[-1]):
                raise ValueError(f"selector {nan.selector!r} returned NaN scores")
            keep_host = read[:keep.numel()].reshape(keep.shape)
        if bool(keep_host.all()):
            return [], None
        device = keep.device
        seq = self._reference_rows(call).shape[1]
        target, refs = layout.target_host, layout.ref_host
        masks, inverse = torch.unique(keep_host, dim=0, return_inverse=True)
        is_target = torch.zeros(seq, dtype=torch.bool, device="cpu")
        is_target[target] = True
        groups, host = [], []
        for g in range(masks.shape[0]):
            rows = torch.nonzero(inverse == g).flatten().tolist()
            full_keep = is_target.clone()
            full_keep[refs] = masks[g]
            positions = torch.nonzero(full_keep).flatten()  # kept rows of the image sequence, in sequence order
            target_rows = torch.nonzero(is_target[positions]).flatten()
            whole = masks.shape[0] == 1
            host.append((positions, target_rows))
            groups.append(_Group(
                rows=None if whole else rows,
                samples=None if whole else _device_values(rows, torch.long, device),
                positions=_device_values(positions, None, device), positions_host=positions,
                kept_refs=[int(s.sum()) for s in masks[g].split(layout.ref_lengths)],
                out_rows=_device_values(target_rows, None, device),
                out_dest=_device_values(positions[target_rows], None, device)))
        packs = (self.pack and self.family == FLUX2 and self.attention == SPARSECTX and len(groups) > 1
                 and call.get("kv_cache_mode") is None)
        return groups, (self._packing(host, inverse.tolist(), seq, device) if packs else None)

    @staticmethod
    def _packing(host: list, group_of: list, seq: int, device) -> _Packing:
        """The packed layout of the batch (sample b of group ``group_of[b]``, whose host-side positions and target
        rows are ``host[group]``)."""
        rows, positions, out_rows, out_dest, lengths = [], [], [], [], []
        offset = 0
        for b, g in enumerate(group_of):
            kept, target_rows = host[g]
            rows.append(b * seq + kept)
            positions.append(kept)
            out_rows.append(offset + target_rows)
            out_dest.append(b * seq + kept[target_rows])
            lengths.append(kept.numel())
            offset += kept.numel()
        cu_image = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cpu")
        return _Packing(rows=_device_values(torch.cat(rows), None, device),
                        positions=_device_values(torch.cat(positions), None, device),
                        cu_image=_device_values(cu_image, None, device), max_image=max(lengths),
                        out_rows=_device_values(torch.cat(out_rows), None, device),
                        out_dest=_device_values(torch.cat(out_dest), None, device))

    def _run_packed(self, call: dict, packing: _Packing):
        """FLUX.2: every sample's kept rows as one sequence (a batch of 1; its modulation is the samples' shared
        one), text tokens of all samples first; the processors attend within each sample (``PackedBatch``)."""
        from .processors import PackedBatch  # deferred: imports diffusers' model modules

        self._check_batch_rows(call)
        hidden, text = call["hidden_states"], call["encoder_hidden_states"]
        batch, seq = hidden.shape[:2]
        n_text = text.shape[1]
        packed = dict(call)
        packed["hidden_states"] = hidden.reshape(batch * seq, *hidden.shape[2:]).index_select(0, packing.rows)[None]
        packed["encoder_hidden_states"] = text.reshape(1, batch * n_text, *text.shape[2:])
        for name in ("timestep", "guidance"):
            value = call.get(name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                packed[name] = value[:1]
        txt_ids = call["txt_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        packed["img_ids"], memo = self._kept_ids(call["img_ids"], packing.positions, packing.rope)
        packing.rope = memo or packing.rope
        packed["txt_ids"] = txt_ids.repeat(batch, 1)
        packed_scope = state_scope(self.attention_state, packed=PackedBatch(
            cu_text=torch.arange(0, (batch + 1) * n_text, n_text, dtype=torch.int32, device=hidden.device)
            if n_text else torch.zeros(batch + 1, dtype=torch.int32, device=hidden.device),
            cu_image=packing.cu_image, n_text=batch * n_text, max_text=n_text, max_image=packing.max_image,
            counts=hidden.new_empty((batch * n_text, n_text, packing.max_image, 0))))
        # gradient checkpointing recomputes blocks during backward: they attend within each sample then too
        with packed_scope(), self.checkpointed_in(packed_scope), self._rope_tables(memo):
            result = self.original_forward(**packed)
        out = _sample_of(result)[0]
        full = out.new_zeros((batch * seq, *out.shape[1:]))
        full.index_copy_(0, packing.out_dest, out.index_select(0, packing.out_rows))
        return _with_sample(result, full.view(batch, seq, *out.shape[1:]))

    def _run_group(self, call: dict, group: _Group):
        """The original forward on the group's samples, their dropped rows removed."""
        g = dict(call) if group.rows is None else self._slice_batch(call, group.rows, group.samples)
        if self.family == FLUX3:
            return self._run_flux3(g, group)
        if self.family == QWEN21:
            return self._run_qwen21(g, group)
        if self.family == JOYEDIT:  # (its forward patchifies the latents: the kept rows are taken there)
            from .joyimage import compacted_edit_forward

            return compacted_edit_forward(self.transformer, group.positions, **g)
        if self.family == GLM:  # (a write forward: its image projector's rows are taken, its RoPE and prior rows)
            from .glmimage import compacted, grid, kept_arguments

            shape = grid(g["hidden_states"], self.transformer.config.patch_size)
            with compacted(self.transformer, group.positions, shape[0] * shape[1], g["kv_caches"]) as positions:
                g.update(kept_arguments(self.transformer, positions, g["hidden_states"], g["prior_token_id"],
                                        g["prior_token_drop"], g.get("image_rotary_emb")))
                return self.original_forward(**g)
        n_image = g["hidden_states"].shape[1]
        g["hidden_states"] = g["hidden_states"].index_select(1, group.positions)
        if self.family == QWEN:
            return self._run_qwen(g, group)
        if self.family == JOYPLUS:
            return self._run_joyimage_plus(g, group)
        mask = self._attention_mask(g)
        if mask is not None:
            name = _ATTN_KWARGS_ARG[self.family]
            g[name] = {**g[name], "attention_mask": _kept_key_columns(
                mask, g["encoder_hidden_states"].shape[1], n_image, group.positions)}
        g["img_ids"], memo = self._kept_ids(g["img_ids"], group.positions, group.rope)
        group.rope = memo or group.rope
        if g.get("kv_cache_mode") == KV_EXTRACT:
            g["num_ref_tokens"] = sum(group.kept_refs)
        with self._rope_tables(memo):
            return self.original_forward(**g)

    @staticmethod
    def _kept_ids(ids: torch.Tensor, positions: torch.Tensor, memo: Optional[RopeTablesMemo]) -> tuple:
        """``(rows, memo)``: the kept rows of ``img_ids`` (of its first sample: FLUX.1 and FLUX.2 read those for the
        whole batch) and the ``RopeTablesMemo`` holding them, which the plan's later steps reuse (``memo``, while on
        the ids' device: a step reuses the plan only if its img_ids equal the plan's). While dynamo traces the
        forward (torch.compile), the rows alone, gathered anew."""
        first = ids[0] if ids.ndim == 3 else ids
        if torch.compiler.is_compiling():
            return first.index_select(0, positions.to(ids.device)), None
        if memo is None or memo.ids.device != ids.device:
            from .processors import RopeTablesMemo  # deferred: imports diffusers' model modules

            memo = RopeTablesMemo(first.index_select(0, positions.to(ids.device)))
        return memo.ids, memo

    def _rope_tables(self, memo: Optional[RopeTablesMemo] = None):
        """FLUX.1 / FLUX.2 / LongCat (the families with ``img_ids``): the forward's ``pos_embed`` computes its
        tables in a few launches and reuses ``memo``'s (``processors.fast_rope_tables``; the rows before the first
        block wait on that host work after the step's host read). Not while dynamo traces the forward
        (torch.compile): diffusers' module as it is there."""
        if self.family not in TARGET_PLANES or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        from .processors import fast_rope_tables  # deferred: imports diffusers' model modules

        return fast_rope_tables(self.transformer, memo)

    def _run_glm(self, call: dict, plan: _Plan):
        """GLM-Image: a write forward of its KV cache on its kept rows (one group: a write stores one set of rows for
        its samples); a read step whose samples' cached rows differ in number (other budgets per request, references
        of other sizes: diffusers' read concatenates them into one batch), one forward per cache slot, on the
        samples reading it; any other forward as it is."""
        if len(plan.groups) > 1:
            raise ValueError("GLM-Image: the samples of this KV-cache write forward keep different tokens, but a "
                             "write stores one set of rows for them all; write each request's references in "
                             "forwards of its own (as GlmImagePipeline does), or select the same tokens for all")
        if plan.groups:
            return self._run_group(call, plan.groups[0])
        from .glmimage import per_slot_caches

        parts = per_slot_caches(call.get("kv_caches"), call["hidden_states"].shape[0])
        if parts is None:
            return self._call_original(**call)
        results = [self.original_forward(**{**self._slice_batch(call, rows), "kv_caches": caches})
                   for rows, caches in parts]  # (each slot's samples: consecutive rows, in slot order)
        return _with_sample(results[0], torch.cat([_sample_of(result) for result in results]))

    def _run_zimage(self, call: dict, plan: _Plan):
        """Z-Image Omni: one forward for the whole batch, each sample on its kept rows (its forward runs every sample
        as a sequence of its own, padded to the longest and masked: samples keeping different tokens need no group
        forwards of their own). The rows each sample keeps of the model's padded image sequence
        (``zimage.kept_x_rows``) are made at the plan's first forward and reused by its later steps."""
        from .zimage import compacted, kept_x_rows

        memo = plan.groups[0].joints
        rows = memo.get("zimage")
        if rows is None:
            grids = _zimage_grids(call)[0]
            batch = call["hidden_states"].shape[0]
            rows = [None] * batch
            for group in plan.groups:
                kept = kept_x_rows(grids, group.positions_host)
                kept = (kept, _device_values(kept, None, call["hidden_states"].device))
                for b in range(batch) if group.rows is None else group.rows:
                    rows[b] = kept
            memo["zimage"] = rows
        with compacted(self.transformer, rows):
            return self._call_original(**call)

    def _run_flux3(self, call: dict, group: _Group):
        """FLUX.3: the kept rows of its references and of their one ``[N, 4]`` id table; a group keeping no reference
        token runs as a call without references (diffusers fails on empty ones)."""
        if not sum(group.kept_refs):
            return self.original_forward(**{**call, "image_cond_hidden_states": None, "image_cond_ids": None})
        ids = call["image_cond_ids"]
        return self.original_forward(**{
            **call, "image_cond_hidden_states": call["image_cond_hidden_states"].index_select(1, group.positions),
            "image_cond_ids": ids.index_select(0, group.positions.to(ids.device))})

    def _run_qwen21(self, call: dict, group: _Group):
        """Qwen-Image 2.1: its forward on the joint sequence without the dropped rows (``qwen21.compacted_forward``;
        a KV-cached step: the target's queries, with the prompt's padding mask matched to the cached kept rows)."""
        from .qwen21 import compacted_forward

        call = {**call, "hidden_states": call["hidden_states"].index_select(1, group.positions)}
        return compacted_forward(self.transformer, group.positions_host, **call, memo=group.joints)

    def _run_klein_extract(self, call: dict, plan: _Plan):
        """FLUX.2 klein's KV extract step whose samples keep different tokens: each group's forward makes a cache of
        its own; the first group's is the one returned (the pipeline hands it to the cached steps), the others kept
        with it (``extracted``)."""
        results = self._group_results(call, plan)
        caches = [_returned_kv_cache(result) for result in results]
        merged = self._merge(call, plan, results)
        # a group that keeps no reference token has no cache (diffusers returns None): the pipeline is handed the
        # first group's cache that exists (given None, its later steps would run without any cache); none: nothing
        # to keep
        key = next((cache for cache in caches if cache is not None), None)
        if key is None:
            return merged
        # kept under that cache, which the entry must not hold itself (a weak key its value holds is never freed:
        # every mixed call's caches stayed until disable): _THE_CALLS_CACHE stands for it
        self.extracted[key] = (plan, [_THE_CALLS_CACHE if cache is key else cache for cache in caches])
        _KLEIN_GROUP_CACHES.add(key)  # (one group's cache: a step on a batch of another size is told why)
        if isinstance(merged, tuple):
            return (merged[0], key, *merged[2:])
        merged["kv_cache"] = key  # (diffusers' output: its key too, which a None field lacked, and the attribute)
        return merged

    def _run_klein_cached(self, call: dict, plan: _Plan, extract: _Plan, caches: Optional[list]):
        """FLUX.2 klein's cached step after an extract step that ran groups: each group's samples against their own
        cache (the sequence holds no reference token: nothing to compact), merged in batch order; a group whose
        samples keep no reference token (no cache) runs the plain forward, as such a request alone does."""
        plan.reports = extract
        results = []
        for group, cache in zip(extract.groups, caches):
            g = self._slice_batch(call, group.rows, group.samples)
            cache = call["kv_cache"] if cache is _THE_CALLS_CACHE else cache
            with self._rope_tables():
                results.append(self.original_forward(**{**g, "kv_cache": cache, "kv_cache_mode": None if cache is None
                                                        else g["kv_cache_mode"]}))
        return self._merge(call, extract, results)

    def _run_qwen21_extract(self, call: dict, plan: _Plan):
        """Qwen-Image 2.1's KV extract step: the plan is kept for the cache it fills (``extracted``). Samples that
        keep different tokens run as groups, each filling a cache of its own (kept beside the plan: the pipeline's
        one cache object serves one sequence layout)."""
        if len(plan.groups) <= 1:
            self.extracted[call["kv_cache"]] = (plan, None)
            return self._run_groups(call, plan)
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        caches = [QwenImage21KVCache(len(self.transformer.transformer_blocks)) for _ in plan.groups]
        self.extracted[call["kv_cache"]] = (plan, caches)
        # the call's cache holds nothing of this step (each group fills its own): emptied, so that a step reading it
        # without this patch fails instead of reading what an earlier extract left there
        for layer in range(len(self.transformer.transformer_blocks)):
            call["kv_cache"].get_layer(layer).store(None, None)
        _FILLED_BY_GROUPS.add(call["kv_cache"])
        return self._run_groups(call, plan, caches)

    def _run_qwen21_cached(self, call: dict, plan: _Plan):
        """Qwen-Image 2.1's KV-cached step (its references still in the sequence): the target's queries against the
        caches of the tokens its extract step kept (the call's cache; several groups: each its own), which is what
        ``last_selection`` reports. A cache no extract step of this patch filled: diffusers' forward if it holds
        every prefix token, else ``ValueError``."""
        found = self.extracted.get(call["kv_cache"])
        if found is not None:  # (plan.reports: the extract's selection, set by _reported_plan)
            extract, caches = found
            return self._run_groups(call, extract, caches) if extract.groups else self.original_forward(**call)
        cached = call["kv_cache"].get_layer(0).k  # (None: not filled, diffusers' forward says so)
        if cached is None and call["kv_cache"] in _FILLED_BY_GROUPS:  # (its groups' caches went with the patch
            raise ValueError("kv_cache was filled by an extract step whose samples kept different tokens, each group "
                             "into a cache of its own held by the sparsectx patch of that step, which is gone "
                             "(sparsectx disabled and enabled since): run the extract step again")
        _FILLED_BY_GROUPS.discard(call["kv_cache"])  # (filled again since, by diffusers' own extract)
        if cached is not None:
            from .qwen21 import joint_layout

            full = joint_layout(call["img_mask"], call["img_shapes"], call["encoder_hidden_states"].shape[1],
                                call["hidden_states"].shape[1]).prefix_len
            if cached.shape[1] != full:
                raise ValueError(f"kv_cache holds {cached.shape[1]} prefix tokens of {full}: it was filled by an "
                                 "extract step that dropped tokens, which this transformer's sparsectx patch did not "
                                 "run (sparsectx was disabled, or the transformer's patch replaced, since); run the "
                                 "extract step again")
        return self.original_forward(**call)

    def _run_qwen(self, call: dict, group: _Group):
        """Qwen-Image: RoPE and ``modulate_index`` come from ``img_shapes``. The references' shapes become
        ``(1, 1, kept)`` (so ``modulate_index``, computed from them, has one entry per kept token) while
        ``pos_embed`` still sees the true shapes and its image rows are gathered at the kept positions."""
        true_shapes = call["img_shapes"]
        call["img_shapes"] = [[shapes[0], *[(1, 1, k) for k in group.kept_refs]] for shapes in true_shapes]

        def true_shapes_in(module, args, kwargs):
            if args:
                return (true_shapes, *args[1:]), kwargs
            return args, {**kwargs, "video_fhw": true_shapes}

        def kept_rows_out(module, args, kwargs, output):
            image_freqs, text_freqs = output
            return image_freqs.index_select(0, group.positions.to(image_freqs.device)), text_freqs

        pos_embed = self.transformer.pos_embed
        handles = [pos_embed.register_forward_pre_hook(true_shapes_in, with_kwargs=True),
                   pos_embed.register_forward_hook(kept_rows_out, with_kwargs=True)]
        try:
            return self.original_forward(**call)
        finally:
            for handle in handles:
                handle.remove()

    def _run_joyimage_plus(self, call: dict, group: _Group):
        """JoyImage-Edit-Plus: RoPE tables and the padding mask come from ``shape_list`` inside the forward. Each
        reference's entry becomes ``(1, 1, kept)`` and the model's RoPE method gives the kept rows of the true tables
        (``joyimage.kept_rope_rows``)."""
        from .joyimage import compacted_shape_list, kept_rope_rows

        true_shapes = call["shape_list"][0]
        call["shape_list"] = compacted_shape_list(call["shape_list"], group.kept_refs)
        with kept_rope_rows(self.transformer, true_shapes, group.positions_host, group.kept_refs):
            return self.original_forward(**call)

    def _slice_batch(self, call: dict, rows: list, samples: Optional[torch.Tensor] = None) -> dict:
        """The call restricted to batch ``rows`` (``samples``: the same rows as a device tensor)."""
        batch = call["hidden_states"].shape[0]
        if samples is None:
            samples = _device_values(rows, torch.long, call["hidden_states"].device)
        group = dict(call)
        self._check_batch_rows(call)
        # (FLUX's img_ids and txt_ids stay whole, also as [B, S, n_axes]: the models read sample 0's for the whole
        # batch, as the layout and a packed batch do, so each group runs on the ids its samples get in the batch)
        for name in _BATCH_ARGS[self.family]:
            value = call.get(name)
            if isinstance(value, torch.Tensor):
                if value.ndim >= 1 and value.shape[0] == batch:  # (a leading dim of 1 serves every sample)
                    group[name] = value.index_select(0, samples.to(value.device))
            elif _tensor_sequence(value):  # per-sample tensors (Bria FIBO's text_encoder_layers, one per block)
                group[name] = _sample_rows(value, samples, batch)
            elif isinstance(value, list) and len(value) == batch:
                group[name] = [value[r] for r in rows]
        attn_name = _ATTN_KWARGS_ARG[self.family]
        if call.get(attn_name):  # per-sample tensors there too (e.g. FLUX.1's ip_adapter_image_embeds); a new dict
            group[attn_name] = {key: _sample_rows(value, samples, batch) for key, value in call[attn_name].items()}
        for name in self.extra_args(call):  # a subclass's own arguments: their per-sample tensors
            group[name] = _sample_rows(call[name], samples, batch)
        return group

    def _check_batch_rows(self, call: dict) -> None:
        """``ValueError`` for a per-sample input (the family's batch arguments, and a key mask in the attention
        kwargs) whose leading dim is neither the batch's nor 1: a batch split into groups (or packed) would give each
        group all of its rows, and a group of as many samples ran on them, each sample on another sample's prompt or
        mask (the model alone refuses such a batch)."""
        batch = call["hidden_states"].shape[0]
        attn_name = _ATTN_KWARGS_ARG[self.family]
        mask = call[attn_name].get("attention_mask") if isinstance(call.get(attn_name), dict) else None
        if isinstance(mask, torch.Tensor) and mask.ndim >= 2 and mask.shape[0] not in (1, batch):
            # (one of 2 dims may be [S, S], a row per query of the joint sequence for every sample)
            text = call.get("encoder_hidden_states")
            joint = call["hidden_states"].shape[1] + (text.shape[1] if isinstance(text, torch.Tensor) else 0)
            if mask.ndim > 2 or mask.shape[0] != joint:
                self._refuse_batch_rows(f"{attn_name}['attention_mask']", mask.shape[0], batch)
        for name in _BATCH_ARGS[self.family]:
            value = call.get(name)
            for tensor in value if _tensor_sequence(value) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.shape[0] not in (1, batch):
                    self._refuse_batch_rows(name, tensor.shape[0], batch)

    @staticmethod
    def _refuse_batch_rows(name: str, rows: int, batch: int) -> None:
        raise ValueError(f"{name} has {rows} rows for a batch of {batch} (hidden_states): the batch's samples keep "
                         "different reference tokens and run apart, so each per-sample input needs one row per "
                         "sample (or one for all); repeat it over the batch as the pipeline repeats its prompt for "
                         "num_images_per_prompt")

    # -- outputs back to the input's layout ----------------------------------------------------------------------
    def _merge(self, call: dict, plan: _Plan, results: list):
        first = results[0]
        kv_step = call.get("kv_cache_mode") in (KV_EXTRACT, KV_CACHED)
        if self.family in (FLUX3, QWEN21, JOYEDIT) or kv_step:  # each group's output is whole (FLUX.3 and the KV
            # steps: the target rows; Qwen-Image 2.1: the joint sequence's, JoyImage-Edit: the latents' items, their
            # target rows written): samples back in batch order
            if len(results) == 1:  # (one group: the whole batch)
                return first
            full = _sample_of(first).new_empty((call["hidden_states"].shape[0], *_sample_of(first).shape[1:]))
            for group, result in zip(plan.groups, results):
                full.index_copy_(0, group.samples, _sample_of(result))
            return _with_sample(first, full)
        hidden = call["hidden_states"]
        sample0 = _sample_of(first)
        full = sample0.new_zeros((hidden.shape[0], hidden.shape[1], *sample0.shape[2:]))
        for group, result in zip(plan.groups, results):
            rows = _sample_of(result).index_select(1, group.out_rows)  # reference rows of the output stay zero
            if group.samples is None:
                full.index_copy_(1, group.out_dest, rows)
            else:
                full[group.samples[:, None], group.out_dest[None, :]] = rows
        return _with_sample(first, full)


def _check_klein_cache_batch(call: dict) -> None:
    """``ValueError`` for a FLUX.2 klein cached step whose cache holds another number of samples than its batch: one
    group's cache of an extract step whose samples kept different tokens, whose other groups' caches went with the
    sparsectx patch that held them (disabled since; diffusers' forward would fail on the shapes)."""
    cache = call.get("kv_cache")
    if cache is None or cache not in _KLEIN_GROUP_CACHES:  # (another cache: diffusers' forward says what it finds)
        return
    layers = getattr(cache, "double_block_caches", None)
    cached = getattr(layers[0], "k_ref", None) if layers else None
    batch = call["hidden_states"].shape[0]
    if cached is not None and cached.shape[0] != batch:
        raise ValueError(f"kv_cache holds {cached.shape[0]} samples for a batch of {batch}: it is one group's cache "
                         "of an extract step whose samples kept different tokens, each group into a cache of its own "
                         "held by the sparsectx patch of that step, which is gone (sparsectx disabled since): run the "
                         "extract step again")


def _glm_cache_mode(call: dict) -> Optional[str]:
    """The mode of a GLM-Image forward's KV cache (``glmimage.cache_mode``): a write forward and a read step of one
    size are planned apart."""
    from .glmimage import cache_mode

    return cache_mode(call.get("kv_caches"))


GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: splitmix64's increment, spreading consecutive seeds apart


def _glm_seed(seed: Union[int, tuple, None], written) -> Optional[int]:
    """The seed of GLM-Image's write forward ``written`` (``glmimage.Written``): a per-prompt tuple's entry for its
    slot (``_prompt_seeds``), then image i's own, ``seed + i·GOLDEN_GAMMA`` mod 2^64 (image 0: the seed itself, as a
    request of one image alone draws; the others far from any seed a nearby request is given)."""
    if seed is None:
        return None
    if isinstance(seed, tuple):
        seed = seed[written.slot] if written.slot < len(seed) else seed[0]
    return (seed + (written.image or 0) * GOLDEN_GAMMA) % 2 ** 64


def _prompt_seeds(seed: Union[int, tuple, None], base: type, pipe, args: tuple, kwargs: dict):
    """GLM-Image's pipeline call: one generator per image (``num_images_per_prompt`` per prompt) -> the seed of
    each prompt's first image, one per cache slot (a prompt's images share its references' slot)."""
    if not isinstance(seed, tuple):
        return seed
    try:
        bound = inspect.signature(base.__call__).bind(pipe, *args, **kwargs).arguments
        per_prompt = operator.index(bound.get("num_images_per_prompt", 1))
        prompt, embeds = bound.get("prompt"), bound.get("prompt_embeds")
        prompts = 1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else \
            embeds.shape[0] if isinstance(embeds, torch.Tensor) else None
    except (TypeError, AttributeError):  # (the pipeline's own call raises it)
        return seed[0]
    # a list of another length than the call's images seeds every prompt with the first generator's seed
    return seed[::per_prompt] if prompts and per_prompt > 0 and len(seed) == prompts * per_prompt else seed[0]


def _glm_request_budget(budget: Budget, request: int) -> Budget:
    """The budget of the images of GLM-Image's request ``request`` (a cache sample slot): a per-request list's entry
    for it (one entry: every request's), else ``budget`` itself."""
    if not _is_per_request(budget):
        return budget
    if len(budget) > 1 and request >= len(budget):
        raise ValueError(f"budget has {len(budget)} per-request entries, but this KV-cache write forward stores "
                         f"the references of request {request + 1} (GLM-Image's requests are its prompts, one "
                         "sample slot of the cache each)")
    return budget[request if len(budget) > 1 else 0]


def _glm_image_budget(budget: Budget, request: int, image: Optional[int]) -> Budget:
    """The budget of GLM-Image's write forward storing reference image ``image`` of the cache's sample slot
    ``request`` (the pipeline writes one slot per prompt): a per-request list's entry for that prompt, then a per-image
    list's entry for that image. A budget object with per-request or per-image settings is refused (each write
    forward is sized alone)."""
    if budget is None:
        return None
    if _is_budget_fn(budget):
        settings = budget.settings() if callable(getattr(budget, "settings", None)) else {}
        if any((isinstance(v, (list, tuple)) and len(v) > 1) or (isinstance(v, torch.Tensor) and v.numel() > 1)
               for v in settings.values()):
            raise ValueError(f"budget {budget!r}: GLM-Image selects each reference image in its own KV-cache write "
                             "forward, so a budget object takes one value per setting there; give per-request or "
                             "per-image budgets as lists of ratios or counts")
        return budget
    spec = _glm_request_budget(budget, request)
    if not isinstance(spec, list) or len(spec) == 1:
        return spec[0] if isinstance(spec, list) else spec
    if image is None:
        raise ValueError("a per-image budget needs to know which reference image a KV-cache write forward stores, "
                         "but the cache's sample slot holds rows no enabled write forward of it stored (written while "
                         "disabled?): clear the cache (kv_caches.clear()) and write it again")
    if image >= len(spec):
        raise ValueError(f"budget has {len(spec)} per-image entries, but request {request + 1} writes a reference "
                         f"image {image + 1} into the KV cache")
    return spec[image]


def _check_glm_selector(selector, signals: dict) -> None:
    """GLM-Image writes each reference image into its KV cache in a forward of its own, before the denoising loop,
    with no prompt and no target in the sequence: the attention probe has no query to read there, so a selector that
    needs it must be given its signals."""
    from .selection import get_selector

    needs = {"attention": ("queries", "text_queries", "target_queries"), "edit": ("user_mask", "text_queries")}
    for name, given in needs.items():
        if selector is get_selector(name) and all(signals.get(n) is None for n in given):
            raise ValueError(f"selector {name!r} on GLM-Image needs signals {' or '.join(map(repr, given))}: "
                             "GLM-Image writes each reference image into its KV cache in a forward of its own, "
                             "before the denoising loop, with no prompt and no target in that sequence, so the "
                             "attention probe has no query to read; use 'random', 'uniform', 'subject' (its "
                             "saliency), 'edit' with signals={'user_mask': ...}, or a callable")


def _kept_key_columns(mask: torch.Tensor, n_text: int, n_image: int, positions: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` over the joint ``[text, image]`` sequence (boolean or additive; its last dim the
    ``n_text + n_image`` keys, and a dim before it of that length, one row per query, too) restricted to the text and
    the kept image rows ``positions``."""
    n = n_text + n_image
    if not isinstance(mask, torch.Tensor) or mask.ndim == 0 or mask.shape[-1] != n:
        raise ValueError(f"attention_mask must be a mask over the joint sequence's keys, its last dim {n} ({n_text} "
                         f"text + {n_image} image tokens), got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    columns = torch.cat([torch.arange(n_text, device=mask.device), positions.to(mask.device) + n_text])
    mask = mask.index_select(-1, columns)
    return mask.index_select(-2, columns) if mask.ndim >= 2 and mask.shape[-2] == n else mask


def _keeps_every_token(budget: Budget, batch: int, lengths: list, guidance_pairs: Optional[str] = None) -> bool:
    """Whether ``budget`` keeps every reference token of each sample of the batch, sample ``b`` with the reference
    token counts ``lengths[b]`` (False for a budget whose counts depend on scores, or that does not fit a sample).
    ``guidance_pairs``: the batch holds guidance's two branches, the budget read as ``_select_guidance_pairs`` reads
    it (the conditional half's requests; each unconditional sample keeps what its partner keeps)."""
    if budget is None or _is_budget_fn(budget):
        return False
    if guidance_pairs and batch % 2 == 0:
        half = batch // 2
        rows = slice(half, batch) if guidance_pairs == "second" else slice(0, half)
        partners = lengths[:half] == lengths[half:]  # (each unconditional sample with its partner's references)
        if _is_per_request(budget) and len(budget) == batch:
            budget = budget[rows]
        return partners and _keeps_every_token(budget, half, lengths[rows])
    per_request = _is_per_request(budget) and len(budget) == batch  # (a request's budget: its own images)
    for b, sample_lengths in enumerate(lengths):
        try:
            counts = budget_counts(budget[b], 1, sample_lengths)[0] if per_request else \
                budget_counts(budget, batch, sample_lengths)[b]
        except (TypeError, ValueError):
            return False
        if list(counts) != list(sample_lengths):
            return False
    return True


def _per_sample(value, batch: int) -> bool:
    """Whether ``value`` is a per-sample tensor (leading dim = the batch) or a list/tuple holding one."""
    if isinstance(value, torch.Tensor):
        return bool(value.ndim) and value.shape[0] == batch
    return _tensor_sequence(value) and any(_per_sample(v, batch) for v in value)


def _tensor_sequence(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _sample_rows(value, samples: torch.Tensor, batch: int):
    """``value``'s rows ``samples`` when it is a per-sample tensor (leading dim = the batch) or a list/tuple of them,
    else ``value`` unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, samples.to(value.device)) if _per_sample(value, batch) else value
    if _tensor_sequence(value):
        return type(value)(_sample_rows(v, samples, batch) for v in value)
    return value


def _uniform_over_batch(call: dict) -> torch.Tensor:
    """bool ``[n]`` on the device: whether every sample has the first sample's timestep (and guidance)."""
    flags = [torch.ones((), dtype=torch.bool, device=call["hidden_states"].device)]
    for name in ("timestep", "guidance"):
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] > 1:
            flags.append(torch.eq(value, value[:1]).all())
    return torch.stack(flags)


_THE_CALLS_CACHE = object()  # in a klein entry of ``extracted``: the cache the entry is kept under
_PATCH_SERIALS = itertools.count()  # each _SparsePatch's number, in the order they were made


def _sample_of(result) -> torch.Tensor:
    """The output tensor of a forward's result: a tuple's first, a diffusers output's ``sample``, or (a subclass
    returning it bare) the tensor itself."""
    if isinstance(result, torch.Tensor):
        return result
    return result[0] if isinstance(result, tuple) else result.sample


def _with_sample(result, sample: torch.Tensor):
    if isinstance(result, torch.Tensor):
        return sample
    if isinstance(result, tuple):
        return (sample, *result[1:])
    result.sample = sample
    return result


# ----------------------------------------------------------------------------------------------------------------
# pipelines: a new __call__ starts a new selection
# ----------------------------------------------------------------------------------------------------------------
_PIPELINE_CLASSES: dict = {}  # original pipeline class -> its sparsectx subclass


def _initial_seed(generator) -> Union[int, tuple, None]:
    """The initial seed of a pipeline call's ``generator``, read without advancing it: an int, or for a list of
    generators (diffusers: one per image of the batch) the tuple of their seeds (an int when they are all equal)."""
    if isinstance(generator, (list, tuple)) and generator:
        seeds = tuple(g.initial_seed() if isinstance(g, torch.Generator) else None for g in generator)
        if None in seeds:
            return None
        return seeds[0] if len(set(seeds)) == 1 else seeds
    return generator.initial_seed() if isinstance(generator, torch.Generator) else None


def _call_seed(base: type, pipe, args: tuple, kwargs: dict) -> Union[int, tuple, None]:
    """The initial seed of a ``base`` pipeline call: its ``generator``'s (``_initial_seed``), given by keyword or
    position, or without one an integer ``seed`` argument (Bria FIBO Edit's, from which the pipeline makes its
    generator)."""
    generator = kwargs.get("generator")
    if generator is None and (args or "seed" in kwargs):
        try:
            bound = inspect.signature(base.__call__).bind(pipe, *args, **kwargs).arguments
        except TypeError:  # (the pipeline's own call raises it)
            bound = {}
        generator = bound.get("generator")
        seed = bound.get("seed")
        if generator is None and isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            return int(seed)
    return _initial_seed(generator)


_ENABLED_THROUGH = weakref.WeakKeyDictionary()  # pipeline -> weakref of the transformer enable(pipeline) patched


def _weakly_keyed(pipe) -> bool:
    """Whether ``pipe`` can key ``_ENABLED_THROUGH`` (hashable and weakly referenceable)."""
    try:
        hash(pipe)
        weakref.ref(pipe)
    except TypeError:
        return False
    return True


def _note_enabled_through(pipe, transformer) -> None:
    if _weakly_keyed(pipe):  # (else replacements of the pipeline's transformer go unnoticed)
        _ENABLED_THROUGH[pipe] = weakref.ref(transformer)


def _changed_by_enable(pipe) -> bool:
    """Whether ``enable(pipe)`` changed ``pipe`` (its class, or the transformer it patched) and it is not undone."""
    return hasattr(type(pipe), "_sparsectx_base") or (_weakly_keyed(pipe) and _ENABLED_THROUGH.get(pipe) is not None)


def _replaced_transformer(pipe):
    """The transformer ``enable(pipe)`` patched, when ``pipe.transformer`` is another one and it is still enabled
    (the pipeline's transformer was replaced since: ``pipe.transformer = ...``, ``update_components``), else None."""
    ref = _ENABLED_THROUGH.get(pipe) if _weakly_keyed(pipe) else None
    old = ref() if ref is not None else None
    if old is None or old is _unwrapped(getattr(pipe, "transformer", None)) or \
            getattr(old, PATCH_ATTR, None) is None:
        return None
    return old


def _overrides_place(pipeline_kwarg: str, transformer_kwarg: str) -> str:
    """Where per-call settings came from, for messages: the pipeline's keyword (and the transformer's, if other)."""
    return f"{pipeline_kwarg}['{CALL_KWARG}']" + (
        f" (the transformer's {transformer_kwarg}['{CALL_KWARG}'])" if pipeline_kwarg != transformer_kwarg else "")


@functools.lru_cache(maxsize=None)
def _pipeline_attn_kwarg(base: type, family: str) -> str:
    """The keyword through which a pipeline class hands attention kwargs to its transformer: the one its
    ``__call__`` names, or (a modular pipeline, whose ``__call__`` takes ``**kwargs`` for its blocks' inputs) the
    transformer's own, which diffusers' modular denoise blocks take under the transformer's name."""
    for cls in base.__mro__:  # (a subclass's __call__ that hands **kwargs on to its base's: the base's keyword)
        if "__call__" not in cls.__dict__:
            continue
        try:
            parameters = inspect.signature(cls.__dict__["__call__"]).parameters
        except (TypeError, ValueError):
            break
        named = [name for name in _ATTN_KWARGS_NAMES if name in parameters]
        if len(named) == 1:
            return named[0]
        if named or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return _ATTN_KWARGS_ARG[family]


@functools.lru_cache(maxsize=None)
def _takes_keyword(base: type, name: str) -> bool:
    """Whether the pipeline class's ``__call__`` takes the keyword ``name``: by name, or through ``**kwargs`` that a
    subclass hands on to its base's ``__call__`` (whose signature then decides, as in ``_pipeline_attn_kwarg``), or a
    ``**kwargs`` of the base-most ``__call__``."""
    for cls in base.__mro__:
        if "__call__" not in cls.__dict__:
            continue
        try:
            parameters = inspect.signature(cls.__dict__["__call__"]).parameters
        except (TypeError, ValueError):
            return True
        if name in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False
    return True


# pipelines that run guidance's two branches as one batch, the variable of their __call__ (and its threshold) that
# turns guidance on for the running step, and which half of the batch holds the conditional samples: the forwards of
# their calls select on the conditional samples, whose selection the unconditional ones share (whether the
# pipeline, its transformer alone, or a pipeline sharing it is enabled); other pipelines call the transformer once
# per branch, and both share the call's selection. (Z-Image Omni's apply_cfg: a local of its denoising loop, off
# at the steps its cfg_truncation runs without guidance, whose batch holds the conditional samples alone)
_BATCHED_GUIDANCE = {"BriaFiboEditPipeline": ("guidance_scale", 1.0, "second"),
                     "JoyImageEditPlusPipeline": ("guidance_scale", 1.0, "second"),
                     "ZImageOmniPipeline": ("apply_cfg", 0, "first")}


def _guidance_batched(pipeline, frame) -> Optional[str]:
    """Which half of the batch holds the conditional samples (``"first"`` or ``"second"``) where the pipeline call
    running at ``frame`` (``_innermost_pipeline_call``) batches guidance's branches (``_BATCHED_GUIDANCE``: its
    variable, a number or a one-element tensor, above the threshold), else None."""
    if pipeline is None:
        return None
    entry = next((_BATCHED_GUIDANCE[c.__name__] for c in type(pipeline).__mro__ if c.__name__ in _BATCHED_GUIDANCE),
                 None)
    if entry is None:
        return None
    name, threshold, conditional = entry
    value = frame.f_locals.get(name)
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    return conditional if isinstance(value, numbers.Real) and value > threshold else None


def _enabled_call(self, base: type, args: tuple, kwargs: dict):
    """An enabled pipeline's call (``base.__call__``), run under its transformer's lock: the patch's per-call state
    set for it, or, where the transformer is no longer enabled, the plain call with a warning."""
    patch = getattr(self.transformer, PATCH_ATTR, None)
    if patch is None:
        if _replaced_transformer(self) is not None:
            _warn(f"{base.__name__}.transformer was replaced since sparsectx.enable: this call runs "
                  "every reference token. Enable the pipeline again (enabling or disabling the "
                  "pipeline restores the transformer it replaced)", RuntimeWarning)
        else:  # the settings belong to the transformer: disabled through it or another pipeline holding it
            _warn(f"this {base.__name__} was enabled but its transformer no longer is (disabled "
                  "directly or through another pipeline sharing it): this call runs every reference "
                  "token. Enable the pipeline again, or disable it", RuntimeWarning)
        if _weakly_keyed(self):  # (this call selected nothing: an earlier call's selection is not its)
            _CALL_SELECTIONS[self] = None
        return base.__call__(self, *args, **kwargs)
    pipeline_kwarg = _pipeline_attn_kwarg(base, patch.family)
    attn_kwargs = kwargs.get(pipeline_kwarg)
    overrides = None
    if isinstance(attn_kwargs, collections.abc.Mapping) and CALL_KWARG in attn_kwargs:
        # checked before the pipeline's own work (encoding the prompt and images), not at its first step;
        # kept for a pipeline whose blocks do not hand the keyword to the transformer (FLUX.3's
        # step-distilled blocks: the call's settings were checked, then ignored)
        overrides = patch.checked_overrides(attn_kwargs[CALL_KWARG], _overrides_place(
            pipeline_kwarg, _ATTN_KWARGS_ARG[patch.family]))
    if isinstance(attn_kwargs, collections.abc.Mapping) and set(attn_kwargs) <= {CALL_KWARG} and \
            not _takes_keyword(base, pipeline_kwarg):
        # a pipeline without the keyword (JoyImage-Edit-Plus): the settings reach the forwards through this
        # call (call_overrides), the pipeline gets the call without them
        kwargs = {name: value for name, value in kwargs.items() if name != pipeline_kwarg}
    elif isinstance(attn_kwargs, dict):  # the call gets a copy: Bria FIBO's pipeline writes its prompt mask
        kwargs = {**kwargs, pipeline_kwarg: dict(attn_kwargs)}  # into it (a reused dict carried it over)
    with patch.lock:  # (calls from other threads on this transformer wait: see ForwardPatch.lock)
        # a call inside another enabled call on this transformer (e.g. from a step-end callback): the outer
        # call's selection is put back after it, for the outer call's later steps
        outer_plans = (patch.call_epoch, patch.plans) if patch.pipeline_calls else None
        patch.new_call()
        patch.pipeline_calls += 1
        outer_seed, patch.call_seed = patch.call_seed, _call_seed(base, self, args, kwargs)
        if patch.family == GLM:
            patch.call_seed = _prompt_seeds(patch.call_seed, base, self, args, kwargs)
        outer_kwarg, patch.pipeline_kwarg = patch.pipeline_kwarg, pipeline_kwarg
        outer_overrides = patch.call_overrides, patch.call_overrides_arrived, patch.call_pipeline
        patch.call_overrides, patch.call_overrides_arrived, patch.call_pipeline = overrides, False, self
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            if _weakly_keyed(self):  # (last_selection(pipe): this pipeline's call, whichever ran since)
                _CALL_SELECTIONS[self] = _selection_of(patch.own_cache)
            patch.pipeline_calls -= 1
            patch.call_seed = outer_seed
            patch.pipeline_kwarg = outer_kwarg
            patch.call_overrides, patch.call_overrides_arrived, patch.call_pipeline = outer_overrides
            if outer_plans is not None:
                inner = patch.cache
                patch.call_epoch, patch.plans = outer_plans
                patch.reported = inner


def _new_sparse_pipeline(base: type, *args):
    """Unpickling: a new instance of ``base``'s sparsectx subclass (made in this process if not yet)."""
    cls = _pipeline_class(base)
    return cls.__new__(cls, *args)


def _pipeline_class(base: type) -> type:
    """A subclass of ``base`` whose ``__call__`` tells the transformer's patch that a new call begins (Python
    looks ``__call__`` up on the type, so the instance's class is swapped; ``disable`` swaps it back)."""
    if base not in _PIPELINE_CLASSES:
        def __call__(self, *args, **kwargs):
            # the transformer's lock first, then its patch: calls, enable and disable from other threads wait, and a
            # call that waited runs with the patch (or none) they left, not one they removed
            held = _unwrapped(getattr(self, "transformer", None))
            with transformer_lock(held) if isinstance(held, torch.nn.Module) else contextlib.nullcontext():
                return _enabled_call(self, base, args, kwargs)

        def __reduce_ex__(self, protocol):
            # pickled as made by _new_sparse_pipeline(base): a process that never enabled such a pipeline (where
            # this module has no attribute of the class's name) makes the class again to load it
            constructor, args, *rest = super(cls, self).__reduce_ex__(max(protocol, 2))
            if constructor is copyreg.__newobj__ and args[:1] == (cls,):
                constructor, args = _new_sparse_pipeline, (base, *args[1:])
            return (constructor, args, *rest)

        # the class keeps the base's name (diffusers' save_pretrained writes it as _class_name); a pipeline whose
        # transformer was disabled alone still pickles (one with an enabled transformer raises the transformer's
        # TypeError, which says to disable first)
        qualname = f"_Sparse_{base.__module__.replace('.', '_')}_{base.__qualname__.replace('.', '_')}"
        cls = type(base.__name__, (base,), {
            "__call__": functools.wraps(base.__call__)(__call__), "__reduce_ex__": __reduce_ex__,
            "__module__": __name__, "__qualname__": qualname, "_sparsectx_base": base})
        globals()[qualname] = cls
        _PIPELINE_CLASSES[base] = cls
    return _PIPELINE_CLASSES[base]


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def _innermost_pipeline_call(frame) -> tuple:
    """``(pipeline, frame)`` of the innermost pipeline ``__call__`` running at ``frame`` or above it on the stack,
    or ``(None, None)``."""
    while frame is not None:
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if _is_pipeline(owner):
                return owner, frame
        frame = frame.f_back
    return None, None


def _is_pipeline(obj) -> bool:
    """Whether ``obj`` is a diffusers pipeline (a ``DiffusionPipeline`` or a modular pipeline)."""
    from diffusers import DiffusionPipeline  # deferred: diffusers is imported where a pipeline is enabled

    if isinstance(obj, DiffusionPipeline):
        return True
    try:
        from diffusers.modular_pipelines import ModularPipeline
    except ImportError:  # (a release without modular pipelines)
        return False
    return isinstance(obj, ModularPipeline)


def _family_of(module) -> Optional[str]:
    if not isinstance(module, torch.nn.Module):
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED_TRANSFORMERS and cls.__module__.startswith("diffusers."):
            return SUPPORTED_TRANSFORMERS[cls.__name__]
    return None


def _unwrapped(module):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``), a data-parallel wrapper
    (``DistributedDataParallel``, as accelerate's ``prepare`` makes, ``DataParallel``, or FSDP's
    ``FullyShardedDataParallel``, which accelerate's FSDP plugin makes; FSDP2's ``fully_shard`` keeps the class) or
    a peft wrapper
    (``get_peft_model``'s ``PeftModel``, whose ``base_model`` is a tuner holding the model as ``model``) holds, or
    ``module`` itself: sparsectx patches the real transformer, and the wrapper calls it."""
    while isinstance(module, torch.nn.Module):
        if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None),
                                                                     torch.nn.Module):
            module = module._orig_mod
        elif isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) \
                or _is_fsdp_wrapper(module):
            module = module.module
        elif type(module).__module__.startswith("peft.") and _peft_inner(module) is not None:
            module = _peft_inner(module)
        else:
            break
    return module


def _is_fsdp_wrapper(module: torch.nn.Module) -> bool:
    """An FSDP (version 1) ``FullyShardedDataParallel`` wrapper, told without importing torch.distributed's FSDP
    where nothing imported it (then no module can be one)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FullyShardedDataParallel)


def _peft_inner(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """What a peft module wraps: a ``PeftModel``'s ``base_model`` (the tuner), a tuner's ``model``; else None."""
    for name in ("base_model", "model"):
        inner = module._modules.get(name)
        if isinstance(inner, torch.nn.Module):
            return inner
    return None


def _parallelism(transformer) -> str:
    """What a transformer's diffusers ``_parallel_config`` sets up, for messages (diffusers >= 0.42 records tensor
    parallelism there too)."""
    config = transformer._parallel_config
    kinds = [kind for kind in ("context", "tensor") if getattr(config, f"{kind}_parallel_config", None) is not None]
    return " and ".join(kinds) + " parallelism" if kinds else "parallelism"


def check_diffusers_version() -> None:
    """ImportError when the installed diffusers is older than MIN_DIFFUSERS (e.g. installed with ``--no-deps``):
    older releases hand Qwen-Image's text mask to the attention processors in another form, which would silently
    mislead the probe, and lack classes the processors replace."""
    import diffusers

    release = tuple(int(part) for part in re.findall(r"\d+", diffusers.__version__)[:2])
    if release < MIN_DIFFUSERS:
        raise ImportError(f"sparsectx needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))}, found "
                          f"{diffusers.__version__}: pip install -U diffusers")
    if release > MAX_TESTED_DIFFUSERS:
        _warn_untested_diffusers(diffusers.__version__)


@functools.lru_cache(maxsize=None)
def _warn_untested_diffusers(version: str) -> None:
    _warn(f"diffusers {version} is newer than the releases sparsectx was tested with "
          f"({'.'.join(map(str, MIN_DIFFUSERS))} to {'.'.join(map(str, MAX_TESTED_DIFFUSERS))}.x): sparsectx's "
          "attention processors, attention probe and token removal follow those releases' code (its FLUX RoPE copy "
          "is checked against the module; the rest is not). Check once that enable(pipe, budget=1.0, "
          "attention='sparsectx') gives the unpatched pipeline's output within rounding, or run sparsectx's test "
          "suite with this release", UserWarning)


def _split_target(pipe_or_transformer):
    """(pipeline or None, transformer, family); TypeError naming the supported classes otherwise."""
    family = _family_of(_unwrapped(pipe_or_transformer))
    if family is not None:
        return None, _unwrapped(pipe_or_transformer), family
    transformer = _unwrapped(getattr(pipe_or_transformer, "transformer", None))
    family = _family_of(transformer)
    if family is not None and not isinstance(pipe_or_transformer, torch.nn.Module):
        return pipe_or_transformer, transformer, family
    got = type(pipe_or_transformer).__name__
    if hasattr(pipe_or_transformer, "transformer") and not isinstance(pipe_or_transformer, torch.nn.Module):
        held = getattr(pipe_or_transformer, "transformer", None)  # (a supported pipeline loaded without one)
        got += f" whose transformer is {'None' if held is None else type(held).__name__}"
    raise TypeError(f"sparsectx supports the pipelines {', '.join(SUPPORTED_PIPELINES)} (or any pipeline whose "
                    f"transformer is supported) and the transformers {', '.join(SUPPORTED_TRANSFORMERS)}; got "
                    f"{got}")


def _check_attention(attention) -> str:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    return attention


def check_enable_arguments(budget: Budget = 0.25, selector: Union[str, Callable] = "random",
                           seed: Optional[int] = None, attention: str = NATIVE, signals: Optional[dict] = None) -> None:
    """The errors ``enable`` raises for its arguments before it touches a model (its warnings are left to
    ``enable``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _make_settings(budget, selector, seed, signals)
    _check_attention(attention)


def enable(pipe_or_transformer, budget: Budget = 0.25, selector: Union[str, Callable] = "random",
           seed: Optional[int] = None, attention: str = NATIVE, signals: Optional[dict] = None):
    """Sparse Context on a diffusers pipeline or transformer: each reference image keeps ``budget`` of its tokens
    (a ratio in [0, 1] or a count; one value, one per reference image, or a list of such lists, one per request;
    or an adaptive budget, ``sparsectx.selection.adaptive(coverage, floor, cap)``, whose count follows each image's
    scores (tensor settings ``[R, 1]`` or ``[R, n_images]``: one row per request, as a per-request list), or any
    budget callable ``(scores, ref_lengths) -> BudgetResult``),
    chosen by ``selector`` (a name from ``sparsectx.selection.available_selectors()`` or a callable
    ``(reference_latents [B, N, C], context) -> scores [B, N] | keep mask [B, N]``, JoyImage-Edit-Plus's patches
    flattened to ``C``; the budget caps a keep mask or
    pads it with evenly spread tokens, as ``sparsectx.selection.select`` does; ``budget=None`` keeps a selector's
    keep mask as given).
    ``seed`` makes random selectors deterministic (a fresh generator per selection); without it a pipeline call
    given a ``generator`` seeds the selection with that generator's initial seed (without advancing it; a list of
    one generator per image seeds each image with its own, also under the KV cache), and other calls draw from
    torch's global RNG. ``signals`` are the inputs
    task-aware selectors read from ``context.extra`` (e.g. ``{"user_mask": bool [B or 1, N]}`` for ``"edit"``, or
    probe queries/keys; see ``sparsectx.selection``); tensors go to the model's device. Probe
    tensors missing from ``signals`` come from the automatic attention probe (module docstring).

    ``attention`` picks what computes attention on the compacted sequence:

    - ``"native"`` (default): the transformer's own attention processors (diffusers' dispatcher: SDPA with torch's
      default backend choice, or whichever backend ``set_attention_backend`` chose).
      Exact: the model's own attention on the compacted sequence (``"sparsectx"`` measured faster per step on an
      H200, bench/RESULTS.md).
    - ``"sparsectx"``: every attention layer gets a sparsectx processor (``sparsectx.processors``) that keeps the
      layer's projections, norms, RoPE and output projections and runs ``sparsectx.sparse_attention`` (the Triton
      kernel; the Triton interpreter or the torch reference off the GPU). Equal to ``"native"`` within floating
      point rounding. ``disable`` puts the original processor objects back.

    Enabling again replaces the settings (and switches ``attention`` if it changed). Context parallelism is
    rejected with a ``RuntimeError``. Returns ``pipe_or_transformer``."""
    pipe, transformer, family = _split_target(pipe_or_transformer)
    _check_enable_target(transformer, family)
    settings = _make_settings(budget, selector, seed, signals)
    _warn_ids_grid(family, settings.selector, settings.signals)
    _check_attention_for(family, attention)
    _check_transformer_state(transformer)
    with transformer_lock(transformer):  # (a call running in another thread finishes with the settings it started with)
        patch = getattr(transformer, PATCH_ATTR, None)
        if patch is None:
            patch = _SparsePatch(transformer, family, settings)
            patch.set_attention(attention)  # first: raises before anything changed when a processor is unsupported
            patch.install()
        else:
            patch.set_attention(attention)  # first: on an unsupported processor nothing changes
            patch.settings = settings
            patch.new_call()
    if pipe is not None:
        if _weakly_keyed(pipe):  # (its calls so far ran other settings: it has selected nothing under these)
            _CALL_SELECTIONS.pop(pipe, None)
        if not hasattr(type(pipe), "_sparsectx_base"):
            pipe.__class__ = _pipeline_class(type(pipe))
        replaced = _replaced_transformer(pipe)
        if replaced is not None:  # the transformer an earlier enable patched, since replaced in the pipeline
            with transformer_lock(replaced):
                old_patch = getattr(replaced, PATCH_ATTR, None)
                if old_patch is not None:
                    old_patch.uninstall()
        _note_enabled_through(pipe, transformer)
    return pipe_or_transformer


def _check_enable_target(transformer, family: str) -> None:
    """``enable``'s refusals of a supported class it still can not run (and of a diffusers too old)."""
    check_diffusers_version()
    if family == QWEN and getattr(getattr(transformer, "config", None), "use_layer3d_rope", False):
        raise TypeError("sparsectx does not support Qwen-Image-Layered (a transformer with use_layer3d_rope): its "
                        "image sequence holds several target layers, not target + references")


def _check_attention_for(family: str, attention) -> None:
    """``attention`` checked (``_check_attention``), and refused where the family has no sparsectx processor."""
    _check_attention(attention)
    if family == GLM and attention == SPARSECTX:
        raise ValueError("attention='sparsectx' is not available for GLM-Image yet (sparsectx has no processor for "
                         "its KV-cache attention); use attention='native' (the compacted cache and steps run the "
                         "model's own processors)")
    if family == QWEN21 and attention == SPARSECTX:
        raise ValueError("attention='sparsectx' is not available for Qwen-Image 2.1: its attention is block-causal "
                         "over text and condition images, and sparsectx's kernel attends bidirectionally; use "
                         "attention='native' (the compacted sequence runs the model's own processors)")


def _check_transformer_state(transformer) -> None:
    """``RuntimeError`` for a transformer whose state the drop-in can not run with (parallelism, drop training)."""
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError(f"sparsectx's drop-in does not support diffusers {_parallelism(transformer)} (the "
                           "transformer has a _parallel_config); enable it on a model without parallelism")
    if getattr(transformer, DROP_TRAINING_ATTR, None) is not None:
        raise RuntimeError("drop training is enabled on this transformer; call sparsectx.disable_drop_training "
                           "first (for a validation pass during fine-tuning: disable_drop_training, enable, run, "
                           "disable, enable_drop_training again)")


def check_enable_target(pipe_or_transformer, attention: str = NATIVE) -> None:
    """The checks ``enable`` makes of its target and ``attention`` before it changes anything, without enabling
    (``sparsectx.sweep`` makes them for every setting before its first call): ``TypeError`` for an unsupported
    pipeline or transformer (Qwen-Image-Layered included), ``ValueError`` for an attention the family has no
    processor for, ``RuntimeError`` for parallelism or drop training, ``ImportError`` for a diffusers too old."""
    _, transformer, family = _split_target(pipe_or_transformer)
    _check_enable_target(transformer, family)
    _check_attention_for(family, attention)
    _check_transformer_state(transformer)


def restore_stale_processors(transformer: torch.nn.Module) -> None:
    """The diffusers processors back in place of sparsectx processors set back by hand since their install was taken
    off (``processors.restore_stale_processors``; none exist where that module was never imported, and then it is
    not imported: it imports diffusers' model modules)."""
    processors = sys.modules.get(__package__ + ".processors")
    if processors is not None:
        processors.restore_stale_processors(transformer)


def disable(pipe_or_transformer):
    """Restores the original forward, attention processors and pipeline class exactly (the same objects); when
    sparsectx is not enabled, only puts back the diffusers processors of sparsectx processors set back by hand since
    their install was taken off. On a pipeline whose transformer was replaced since ``enable``, the transformer
    ``enable`` patched is restored too."""
    try:
        pipe, transformer, _ = _split_target(pipe_or_transformer)
    except TypeError:
        # a pipeline enable(pipe) changed, whose transformer is now None or unsupported: undone all the same
        if not _changed_by_enable(pipe_or_transformer):
            raise
        pipe, transformer = pipe_or_transformer, None
    replaced = _replaced_transformer(pipe) if pipe is not None else None
    for module in (transformer, replaced):
        if module is None:
            continue
        with transformer_lock(module):  # (a call running in another thread finishes as it started: sparse)
            patch = getattr(module, PATCH_ATTR, None)
            if patch is not None:
                patch.uninstall()
            else:
                restore_stale_processors(module)
    if pipe is not None and hasattr(type(pipe), "_sparsectx_base"):
        pipe.__class__ = type(pipe)._sparsectx_base
    if pipe is not None and _weakly_keyed(pipe):  # a transformer enabled later by itself is not this pipeline's
        _ENABLED_THROUGH.pop(pipe, None)
        _CALL_SELECTIONS.pop(pipe, None)
    return pipe_or_transformer


def is_enabled(pipe_or_transformer) -> bool:
    """Whether Sparse Context is enabled on the transformer of ``pipe_or_transformer`` (a pipeline or a bare
    transformer of a supported family, else ``TypeError``): the settings belong to the transformer, so a pipeline
    sharing an enabled transformer reads True, and an enabled pipeline whose transformer was disabled reads False.
    Drop training is not Sparse Context: see ``is_drop_training_enabled``."""
    _, transformer, _ = _split_target(pipe_or_transformer)
    return getattr(transformer, PATCH_ATTR, None) is not None


class Selection(NamedTuple):
    """What the latest selection kept: ``keep`` bool ``[B, N]`` over the reference tokens in sequence order (the
    reference images one after another), ``ref_lengths`` their token counts, ``ref_positions`` long ``[N]`` where
    those tokens sit in the transformer's image sequence (FLUX.3: in ``image_cond_hidden_states``), and
    ``ref_shapes`` the ``(h, w)`` token grid of each reference where the layout gives it (FLUX ids forming row-major
    grids, as the pipelines make them; Qwen-Image's ``img_shapes``), else None."""

    keep: torch.Tensor
    ref_lengths: list
    ref_positions: torch.Tensor
    ref_shapes: Optional[list] = None

    def per_image(self) -> list:
        """``keep`` split into one bool ``[B, L_i]`` mask per reference image (e.g. to view it on the latent grid)."""
        return list(self.keep.split(self.ref_lengths, dim=1))

    def grids(self) -> list:
        """One bool ``[B, h, w]`` mask per reference image, on its token grid (row-major; e.g.
        ``matplotlib.pyplot.imshow(selection.grids()[0][0].cpu())``; a FLUX token covers 16 x 16 pixels of the
        reference as the pipeline encoded it). ``ValueError`` when the layout gave no grid (``ref_shapes`` None)."""
        if self.ref_shapes is None:
            raise ValueError("this selection's layout gives no token grid (reference ids that are not row-major "
                             "grids): use per_image()")
        return [mask.view(mask.shape[0], h, w) for mask, (h, w) in zip(self.per_image(), self.ref_shapes)]


# each enabled pipeline's latest call's selection (last_selection(pipe): another pipeline or thread sharing the
# transformer may have called it since)
_CALL_SELECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def last_selection(pipe_or_transformer) -> Optional[Selection]:
    """The reference tokens the latest pipeline (or transformer) call kept, or None when sparsectx is not enabled or
    has not selected yet in this call. Given a pipeline of the enabled class, its own latest call's (running, or the
    last it ran), whatever other pipelines sharing its transformer (``from_pipe``, other threads) ran since; given a
    transformer (or a pipeline that ran no call), the transformer's latest call's. Its tensors are copies."""
    pipe, transformer, _ = _split_target(pipe_or_transformer)
    patch = getattr(transformer, PATCH_ATTR, None)
    if patch is None:
        return None
    if pipe is not None and hasattr(type(pipe), "_sparsectx_base") and _weakly_keyed(pipe):
        if patch.pipeline_calls and patch.call_pipeline is pipe:  # its call runs now (e.g. a step callback)
            return _selection_of(patch.own_cache)
        if pipe in _CALL_SELECTIONS:
            recorded = _CALL_SELECTIONS[pipe]
            return None if recorded is None else recorded._replace(keep=recorded.keep.clone(),
                                                                   ref_positions=recorded.ref_positions.clone())
    return _selection_of(patch.cache)


def _selection_of(plan: Optional["_Plan"]) -> Optional[Selection]:
    """A plan's selection as ``last_selection`` returns it (copies), or None."""
    if plan is None:
        return None
    from .selection import IDS_GRID_SHAPES

    extra = plan.layout.extra
    shapes = extra.get(IDS_GRID_SHAPES) or extra.get("ref_shapes")
    # copies: a caller editing them in place (e.g. inverting the mask to plot the dropped tokens) leaves what the
    # drop-in holds, and what it reports next, unchanged
    return Selection(plan.keep.clone(), list(plan.layout.ref_lengths), plan.layout.ref_positions.clone(),
                     None if shapes is None else [(int(h), int(w)) for h, w in shapes])


@contextlib.contextmanager
def restored_state(pipe_or_transformer):
    """On exit from the block, the Sparse Context state of its start comes back: disabled, or the settings enabled
    then (the same processor objects, a user's own included), whatever the block enabled or disabled; on a pipeline
    whose transformer was replaced since ``enable(pipe)``, the transformer that call patched too (an ``enable(pipe)``
    in the block undoes its patch)."""
    pipe, transformer, _ = _split_target(pipe_or_transformer)
    replaced = _replaced_transformer(pipe) if pipe is not None else None
    states = [(module, _patch_state(module)) for module in (transformer, replaced) if module is not None]
    pipe_class = type(pipe) if pipe is not None else None  # sparsectx's subclass only if the pipeline was enabled
    enabled_through = _ENABLED_THROUGH.get(pipe) if pipe is not None and _weakly_keyed(pipe) else None
    first_new_patch = next(_PATCH_SERIALS)  # patches numbered from here on are made inside the block
    try:
        yield pipe_or_transformer
    finally:
        for module, state in states:
            _restore_patch_state(module, state)
        # a transformer put into the pipeline inside the block and enabled there: disabled, as the block found it
        now = _unwrapped(getattr(pipe, "transformer", None)) if pipe is not None else None
        patch = getattr(now, PATCH_ATTR, None)
        if patch is not None and all(now is not module for module, _ in states) and patch.serial > first_new_patch:
            patch.uninstall()
        if pipe is not None:  # e.g. only the transformer was enabled before: the pipeline's class comes back
            pipe.__class__ = pipe_class
        if pipe is not None and _weakly_keyed(pipe):  # which transformer enable(pipe) patched, as before the block
            if enabled_through is None:
                _ENABLED_THROUGH.pop(pipe, None)
            else:
                _ENABLED_THROUGH[pipe] = enabled_through


def _patch_state(transformer) -> Optional[tuple]:
    """``(family, settings, attention processors)`` of the transformer's patch, or None when not enabled."""
    patch = getattr(transformer, PATCH_ATTR, None)
    return None if patch is None else (patch.family, patch.settings, patch.attention_snapshot())


def _restore_patch_state(transformer, state: Optional[tuple]) -> None:
    """The transformer's patch as ``_patch_state`` gave it: removed (None), or its settings and the processor objects
    of then (a user's own included), installed anew if removed since."""
    patch = getattr(transformer, PATCH_ATTR, None)
    if state is None:
        if patch is not None:
            patch.uninstall()
        else:
            restore_stale_processors(transformer)
        return
    family, settings, attention = state
    if patch is None:  # disabled since: the settings enabled before come back all the same
        patch = _SparsePatch(transformer, family, settings)
        patch.install()
    patch.settings = settings
    patch.restore_attention(attention)
    patch.new_call()


@contextlib.contextmanager
def sparse_context(pipe_or_transformer, budget: Budget = 0.25, selector: Union[str, Callable] = "random",
                   seed: Optional[int] = None, attention: str = NATIVE, signals: Optional[dict] = None):
    """``with sparse_context(pipe, budget=...):`` enables Sparse Context inside the block (arguments as for
    ``enable``); on exit the previous state comes back (disabled, or the settings enabled before). The block holds
    the transformer as an enabled call does: calls and blocks of other threads on it wait until it exits (so each
    block's calls run with its settings, and its exit restores the state its start found), while this thread's
    calls inside it run; a block that waits for another thread's call on the same transformer would wait forever.
    (The transformer's lock, also on a transformer not enabled before: two threads' blocks on it never overlap.)"""
    _, transformer, _ = _split_target(pipe_or_transformer)
    with transformer_lock(transformer), restored_state(pipe_or_transformer):
        enable(pipe_or_transformer, budget=budget, selector=selector, seed=seed, attention=attention,
               signals=signals)
        yield pipe_or_transformer
