"""diffusers attention processors that run sparsectx's attention kernel.

Each processor does what the diffusers processor it replaces does (projections, QK norms, RoPE, output
projections, the KV-cache bookkeeping of FLUX.2 klein) and swaps the attention call, and the QK norms, RoPE and
text/image concatenation of q and k, which ``sparsectx.rms_norm_rope`` computes in one pass per tensor (where the
norms are plain ``torch.nn.RMSNorm`` (FLUX) or diffusers ``RMSNorm`` (Qwen-Image) modules without hooks, of one
eps per layer and tensor; elsewhere diffusers' modules run as they are; FLUX.3's norms compute in fp32; JoyImage's
norms and RoPE run diffusers' own modules and functions):

- no key mask: ``sparsectx.sparse_attention`` on the dense equal-length batch (``[B, S, H, D]`` viewed as packed
  ``[B*S, H, D]``, ``cu_seqlens = arange(B+1) * S``; nothing waits for the device);
- a key keep-mask (training with random drop masks, Qwen-Image's text padding mask, a boolean ``attention_mask``):
  ``sparsectx.masked_attention`` on the dense layout, optionally skipping the dropped queries;
- a packed batch (``AttentionState.packed``: the drop-in runs FLUX.2 samples that keep different tokens as one
  sequence): ``packed_attention``, each sample's queries over its own text and image keys, no padding.

Per-call state (the drop mask of the current training step) lives in a shared ``AttentionState``, never in the
processor, so one processor instance may serve every layer (diffusers' ``set_attn_processor(proc)``).

| diffusers processor                   | sparsectx processor                   |
|---------------------------------------|---------------------------------------|
| ``Flux2AttnProcessor``                | ``SparsectxFlux2AttnProcessor``       |
| ``Flux2ParallelSelfAttnProcessor``    | ``SparsectxFlux2ParallelSelfAttnProcessor`` |
| ``Flux2KVAttnProcessor``              | ``SparsectxFlux2KVAttnProcessor``     |
| ``Flux2KVParallelSelfAttnProcessor``  | ``SparsectxFlux2KVParallelSelfAttnProcessor`` |
| ``FluxAttnProcessor``                 | ``SparsectxFluxAttnProcessor``        |
| ``QwenDoubleStreamAttnProcessor2_0``  | ``SparsectxQwenDoubleStreamAttnProcessor`` |
| ``Flux3AttnProcessor`` (diffusers >= 0.42) | ``SparsectxFlux3AttnProcessor`` |
| ``LongCatImageAttnProcessor``         | ``SparsectxLongCatImageAttnProcessor`` |
| ``BriaFiboAttnProcessor``             | ``SparsectxBriaFiboAttnProcessor``    |
| ``BriaAttnProcessor`` (Bria FIBO's single-stream blocks) | ``SparsectxBriaAttnProcessor`` |
| ``JoyImageAttnProcessor`` (JoyImage-Edit) | ``SparsectxJoyImageAttnProcessor`` |
| ``JoyImageEditPlusAttnProcessor``     | ``SparsectxJoyImagePlusAttnProcessor`` |
| ``ZSingleStreamAttnProcessor`` (Z-Image) | ``SparsectxZImageAttnProcessor`` |

``install_processors(transformer, state)`` swaps every supported processor of a transformer (and returns the
originals); ``restore_processors(transformer, originals, state)`` puts the very same objects back.

Context parallelism (a processor's ``_parallel_config`` holding a ``context_parallel_config``) splits the sequence
across devices inside diffusers' dispatcher; these processors do not, and raise a ``RuntimeError`` instead.

diffusers' layer skip (``apply_layer_skip``, used by its skip-layer and perturbed-attention guiders) finds a
layer's skip behaviour by its processor class: each sparsectx processor is registered with the metadata of the
processor it replaces (where diffusers has some), and ``skip_attention_scores``, which diffusers implements by
making ``scaled_dot_product_attention`` return its values, is honoured the same way (sparsectx's op is not that
function): attention of equal query and key lengths outputs the values.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers import transformer_flux, transformer_flux2, transformer_qwenimage

try:  # FLUX.3 (diffusers >= 0.42)
    from diffusers.models.transformers import transformer_flux3
except ImportError:
    transformer_flux3 = None
try:  # LongCat-Image (absent from older releases)
    from diffusers.models.transformers import transformer_longcat_image
except ImportError:
    transformer_longcat_image = None
try:  # Bria FIBO (absent from older releases); its single-stream blocks run Bria's processor
    from diffusers.models.transformers import transformer_bria, transformer_bria_fibo
except ImportError:
    transformer_bria = transformer_bria_fibo = None
try:  # JoyImage-Edit (diffusers >= 0.39) and JoyImage-Edit-Plus (>= 0.40)
    from diffusers.models.transformers import transformer_joyimage
except ImportError:
    transformer_joyimage = None
try:
    from diffusers.models.transformers import transformer_joyimage_edit_plus
except ImportError:
    transformer_joyimage_edit_plus = None
try:  # Z-Image (diffusers >= 0.39)
    from diffusers.models.transformers import transformer_z_image
except ImportError:
    transformer_z_image = None
try:  # diffusers' dtype choice for RoPE angles (absent from older releases: the devices it names are used)
    from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device
except ImportError:
    maybe_adjust_dtype_for_device = None
try:  # diffusers' layer skip: absent from some releases, then nothing to honour
    from diffusers.hooks._helpers import AttentionProcessorRegistry
    from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
except ImportError:
    AttentionProcessorRegistry = AttentionScoreSkipFunctionMode = None

from ._warn import warn as _warn
from .ops import ROPE_MAX_AXES, masked_attention, rms_norm_rope, rope_tables, sparse_attention, uniform_cu_seqlens

KV_EXTRACT, KV_CACHED = "extract", "cached"  # FLUX.2 klein's kv_cache_mode values
KEPT_INDEX = "kept_index"  # optional attribute of a KV layer cache: [B, n] cached rows the cached steps attend to


# ----------------------------------------------------------------------------------------------------------------
# shared per-call state
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionState:
    """What every sparsectx processor of one transformer reads at each call.

    ``image_keep``: bool ``[B, S_image]`` keep mask of the image-stream tokens (the last ``S_image`` tokens of the
    joint ``[text, image]`` sequence in every family), or None (all kept). Dropped tokens are never keys.
    ``image_kept_prefix``: how many leading image tokens ``image_keep`` always keeps (the target before the
    references); with the text tokens they are read as contiguous key blocks instead of gathered rows.
    ``skip_dropped_queries``: dropped tokens are not computed as queries either (their attention output is zero).
    ``delegate_when_unmasked``: with no mask active, call the processor that was replaced instead of the kernel
    (bit-exact with the unpatched model: drop training in eval mode).
    ``retired``: the processors reading this state were taken off (``restore_processors``); one set back on a layer
    since (by hand, from a saved ``attn_processors``) runs the processor it replaced, and install and restore take it
    for that processor, as an orphan.
    """

    image_keep: Optional[torch.Tensor] = None
    image_kept_prefix: int = 0
    skip_dropped_queries: bool = True
    delegate_when_unmasked: bool = False
    retired: bool = False
    packed: Optional["PackedBatch"] = None
    # the range of each KV layer cache's kept_index, by tensor id, read once per forward (set by the drop-in for the
    # length of one forward; None: read at each layer)
    index_ranges: Optional[dict] = None


@dataclass
class PackedBatch:
    """Several samples run as one sequence (a batch of 1): the joint ``[text, image]`` sequence holds every sample's
    text tokens first, sample after sample (``cu_text``), then every sample's image tokens (``cu_image``). Sample b
    attends to its own text and image tokens only: text rows as the kernel's own keys, image rows as packed
    references, its text queries and its image queries in two launches. Built on the device once per selection."""

    cu_text: torch.Tensor  # int32 [B+1]
    cu_image: torch.Tensor  # int32 [B+1]
    n_text: int  # text tokens of all samples (the joint sequence's first n_text rows)
    max_text: int
    max_image: int
    # the three counts as the shape of an empty tensor, ``[n_text, max_text, max_image, 0]`` on the device: what a
    # compiled block reads (dynamo guards a Python int held here as a constant, so each new packing recompiled the
    # blocks, and fullgraph failed at the recompile limit; a tensor's sizes become symbols after one recompile)
    counts: Optional[torch.Tensor] = None

    def sizes(self) -> tuple:
        """``(n_text, max_text, max_image)``: the ints, or, while dynamo traces, the sizes of ``counts``."""
        if self.counts is not None and torch.compiler.is_compiling():
            return tuple(self.counts.shape[:3])
        return self.n_text, self.max_text, self.max_image


# ----------------------------------------------------------------------------------------------------------------
# the attention call
# ----------------------------------------------------------------------------------------------------------------
def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    ref_key: Optional[torch.Tensor] = None, ref_value: Optional[torch.Tensor] = None,
                    ref_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Full attention of ``query [B, Sq, H, D]`` over ``key/value [B, Sk, H, D]`` (and, when given, rows of
    ``ref_key/ref_value [B, R, H, D]`` as further keys, never concatenated: every row, read as contiguous packed
    references, or with ``ref_index [B, n]`` the rows ``ref_key[b, ref_index[b]]``, gathered by the kernel) through
    ``sparse_attention``. Returns ``[B, Sq, H, D]``."""
    batch, seq_q, heads, dim = query.shape
    seq_k = key.shape[1]
    device = query.device
    extra = {}
    if ref_key is not None and ref_index is not None:
        n_ref = ref_index.shape[1]
        extra = dict(ref_k=ref_key, ref_v=ref_value, ref_index=ref_index.reshape(-1).to(torch.int32),
                     max_seqlen_ref=n_ref, cu_seqlens_ref=uniform_cu_seqlens(batch, n_ref, device))
    elif ref_key is not None:
        n_ref = ref_key.shape[1]
        extra = dict(ref_k=ref_key.reshape(batch * n_ref, heads, dim),
                     ref_v=ref_value.reshape(batch * n_ref, heads, dim), max_seqlen_ref=n_ref,
                     cu_seqlens_ref=uniform_cu_seqlens(batch, n_ref, device))
    out = sparse_attention(query.reshape(batch * seq_q, heads, dim), key.reshape(batch * seq_k, heads, dim),
                           value.reshape(batch * seq_k, heads, dim), uniform_cu_seqlens(batch, seq_q, device),
                           uniform_cu_seqlens(batch, seq_k, device), seq_q, seq_k, validate=False, **extra)
    return out.view(batch, seq_q, heads, dim)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Attention of a packed batch's joint ``[1, L, H, D]`` sequence (``PackedBatch``): each sample's text and image
    queries attend to that sample's text keys (own keys) and image keys (packed references), in two launches (text
    queries, image queries) that share the key description. Returns ``[1, L, H, D]``."""
    q, k, v = query[0], key[0], value[0]
    n_text, max_text, max_image = packed.sizes()
    # the packing is built where the forward starts; a model split over GPUs runs this block on another one
    cu_text, cu_image = packed.cu_text.to(q.device), packed.cu_image.to(q.device)
    keys = dict(ref_k=k[n_text:], ref_v=v[n_text:], cu_seqlens_ref=cu_image, max_seqlen_ref=max_image,
                validate=False)
    text = sparse_attention(q[:n_text], k[:n_text], v[:n_text], cu_text, cu_text, max_text, max_text, **keys)
    image = sparse_attention(q[n_text:], k[:n_text], v[:n_text], cu_image, cu_text, max_image, max_text, **keys)
    return torch.cat([text, image])[None]


def _key_mask_from_attention_mask(attention_mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """diffusers' boolean key masks (``[B, S]`` or ``[B, 1, 1, S]``) -> bool ``[B, S]``."""
    if attention_mask.dtype != torch.bool:
        raise ValueError("sparsectx processors take a boolean key mask as attention_mask (True = attend), got "
                         f"dtype {attention_mask.dtype}")
    mask = attention_mask
    if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    # (not ``shape[0] not in (1, batch)``: under dynamo with a dynamic batch, a tuple holding a SymInt answers True)
    if mask.ndim != 2 or mask.shape[1] != seq or (mask.shape[0] != 1 and mask.shape[0] != batch):
        raise ValueError(f"attention_mask must be a key mask [B={batch}, S={seq}] or [B, 1, 1, S], got "
                         f"{tuple(attention_mask.shape)}")
    return mask.expand(batch, seq)


def _attention_scores_skipped() -> bool:
    """Whether diffusers' layer skip runs this call with ``skip_attention_scores`` (its torch function mode, under
    which attention of equal query and key lengths returns the values, is active)."""
    return AttentionScoreSkipFunctionMode is not None and any(
        isinstance(mode, AttentionScoreSkipFunctionMode) for mode in torch.overrides._get_current_function_mode_stack())


class _OnOriginal:
    """A diffusers per-processor setting (``set_attention_backend`` / ``reset_attention_backend`` and
    ``enable_parallelism`` walk the layers' processors) kept on the replaced processor, so that it holds what was set
    while sparsectx was installed when disable puts it back; a processor without one keeps it itself."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, processor, owner=None):
        if processor is None:
            return self
        if processor.original is not None:
            return getattr(processor.original, self.name, None)
        return processor._own.get(self.name)

    def __set__(self, processor, value) -> None:
        if processor.original is not None:
            setattr(processor.original, self.name, value)
        else:
            processor._own[self.name] = value
            if processor._made_replaced is not None:  # (the diffusers processor it runs for some masks)
                setattr(processor._made_replaced, self.name, value)


class _SparsectxProcessor:
    """Common part: the attention call with the state's mask, and the checks diffusers' dispatcher would do."""

    _attention_backend = _OnOriginal()  # unused by sparsectx's op
    _parallel_config = _OnOriginal()  # context parallelism is rejected at call time

    def __init__(self, state: Optional[AttentionState] = None, original=None):
        # built without a state: by hand, or as diffusers rebuilds a layer's processor (``type(p)()`` in
        # unload_ip_adapter): it attends unmasked with a state of its own, and install/restore take it for the
        # diffusers processor it stands for
        self.orphan = state is None
        self.state = state if state is not None else AttentionState()
        self.original = original  # the replaced processor (delegate_when_unmasked)
        self._own = {}  # the _OnOriginal settings of a processor without an original
        self._made_replaced = None  # (``_replaced``)

    def _check_parallel(self) -> None:
        config = self._parallel_config
        if config is not None and getattr(config, "context_parallel_config", config) is not None:
            raise RuntimeError(f"{type(self).__name__} does not support diffusers context parallelism (the sequence "
                               "is split across devices by diffusers' own attention dispatch); restore the original "
                               "processors (sparsectx.disable / disable_drop_training) before enable_parallelism")

    def _check_inputs(self, query: torch.Tensor) -> None:
        """Before a sparsectx attention call: no context parallelism, and a dtype the op computes."""
        self._check_parallel()
        if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{type(self).__name__} computes attention in fp16, bf16 or fp32; this model runs "
                            f"{query.dtype}: enable with attention='native' (the drop-in), or run the model in a "
                            "supported dtype (drop training needs one)")

    @property
    def stale(self) -> bool:
        """Whether no drop-in or drop training runs this processor: built without a state (an orphan), or its state
        retired; install and restore take it for the diffusers processor it stands for."""
        return self.orphan or self.state.retired

    def _delegates(self) -> bool:
        """Whether this call goes to the replaced processor (checked first in every call, with the parallelism)."""
        self._check_parallel()
        return self.original is not None and (self.state.retired or (
            self.state.delegate_when_unmasked and self.state.image_keep is None))

    def _replaced(self):
        """The replaced processor: the one this was built over, or for a processor built alone a new one of the class
        it stands for (made once)."""
        if self.original is not None:
            return self.original
        if self._made_replaced is None:
            made = _REPLACED[type(self)]()
            for name, value in self._own.items():  # the settings diffusers wrote on this one (its backend)
                setattr(made, name, value)
            self._made_replaced = made
        return self._made_replaced

    def _mask_needs_original(self, attention_mask: Optional[torch.Tensor], batch: int) -> bool:
        """Whether ``attention_mask`` is one sparsectx's attention does not take, additive (float) or with a row per
        query (``[B, 1, S, S]``, or ``[S, S]``: a 2-D mask is a key mask ``[B or 1, S]`` only where its first dim is
        the ``batch``'s or 1, as diffusers' native attention reads it), so the call runs the replaced processor
        (diffusers' attention: exact for any mask). ``ValueError`` naming the mask where sparsectx must mask tokens
        itself (drop training's mask, a packed batch)."""
        if attention_mask is None or (attention_mask.dtype == torch.bool and (
                (attention_mask.ndim == 2 and attention_mask.shape[0] in (1, batch)) or (
                attention_mask.ndim == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1))):
            return False
        if self.state.image_keep is not None or self.state.packed is not None:
            raise ValueError(f"{type(self).__name__} takes a boolean key mask as attention_mask ([B, S] or "
                             f"[B, 1, 1, S], True = attend) with drop training's mask or a packed batch, got "
                             f"{attention_mask.dtype} of shape {list(attention_mask.shape)}")
        return True

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of the joint ``[B, S, H, D]`` sequence ``[text, image]`` (FLUX.1 / FLUX.2): the state's
        ``image_keep`` masks the last ``S_image`` tokens, a packed batch attends within each sample, and a boolean
        ``attention_mask`` masks keys."""
        self._check_inputs(query)
        if _attention_scores_skipped():
            return value
        batch, seq = query.shape[:2]
        image_keep = self.state.image_keep
        if self.state.packed is not None:
            if image_keep is not None or attention_mask is not None or batch != 1:
                raise ValueError("a packed batch (one sequence of several samples) takes no key mask, and its "
                                 f"attention sees one sequence (got a batch of {batch})")
            return packed_attention(query, key, value, self.state.packed)
        if image_keep is None and attention_mask is None:
            return dense_attention(query, key, value)
        key_mask = torch.ones((batch, seq), dtype=torch.bool, device=query.device)
        query_mask = None
        if image_keep is not None:
            n_image = image_keep.shape[1]
            if image_keep.shape[0] != batch or n_image > seq:
                raise ValueError(f"the drop mask is [{image_keep.shape[0]}, {n_image}] but attention sees a batch "
                                 f"of {batch} sequences of {seq} tokens")
            query_mask = self._apply_drop_mask(key_mask, slice(seq - n_image, seq))
        kept_prefix = 0
        if attention_mask is not None:
            key_mask &= _key_mask_from_attention_mask(attention_mask, batch, seq)
        else:  # every text token and the leading image tokens
            kept_prefix = seq - image_keep.shape[1] + self.state.image_kept_prefix
        return masked_attention(query, key, value, key_mask, query_mask=query_mask, kept_prefix=kept_prefix)

    def _apply_drop_mask(self, key_mask: torch.Tensor, image_columns: slice) -> Optional[torch.Tensor]:
        """Drops the state's dropped image tokens from ``key_mask`` (bool ``[B, S]``, in place) at the joint
        sequence's ``image_columns``; returns the query mask that skips them too, or None (queries not skipped)."""
        image_keep = self.state.image_keep.to(key_mask.device)
        key_mask[:, image_columns] &= image_keep
        if not self.state.skip_dropped_queries:
            return None
        query_mask = torch.ones_like(key_mask)
        query_mask[:, image_columns] = image_keep
        return query_mask

    def _attend_image_first(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_text: int,
                            text_keep: Optional[torch.Tensor] = None,
                            image_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of a joint ``[B, S, H, D]`` sequence laid out ``[image, text]`` (Qwen-Image, whose text carries a
        padding mask; JoyImage): the always-kept image tokens (all of them, or under a drop mask the ones before the
        first reference) lead, so the kernel reads them as contiguous key blocks; the text (through ``text_keep``)
        and the kept references are gathered. ``image_valid`` (bool ``[B, S_image]``, JoyImage-Edit-Plus's padding of
        shorter samples) masks image keys too: then no image key is known kept."""
        self._check_inputs(query)
        if _attention_scores_skipped():
            return value
        batch, seq = query.shape[:2]
        n_image = seq - n_text
        image_keep = self.state.image_keep
        if self.state.packed is not None:
            raise ValueError(f"{type(self).__name__} does not run packed batches")
        if image_keep is None and text_keep is None and image_valid is None:
            return dense_attention(query, key, value)
        key_mask = torch.ones((batch, seq), dtype=torch.bool, device=query.device)
        query_mask = None
        if text_keep is not None:
            key_mask[:, n_image:] = text_keep
        kept_prefix = n_image
        if image_valid is not None:
            key_mask[:, :n_image] = image_valid
            kept_prefix = 0
        if image_keep is not None:
            if tuple(image_keep.shape) != (batch, n_image):
                raise ValueError(f"the drop mask is {list(image_keep.shape)} but attention sees a batch of {batch} "
                                 f"sequences of {n_image} image tokens")
            query_mask = self._apply_drop_mask(key_mask, slice(0, n_image))
            kept_prefix = min(kept_prefix, self.state.image_kept_prefix)
        return masked_attention(query, key, value, key_mask, query_mask=query_mask, kept_prefix=kept_prefix)

    def _no_mask_with_kv_cache(self, kv_cache_mode) -> None:
        if kv_cache_mode is not None and self.state.image_keep is not None:
            raise ValueError("random drop masks can not be combined with the FLUX.2 reference KV cache "
                             f"(kv_cache_mode={kv_cache_mode!r})")


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 (klein) and FLUX.1: joint attention blocks and single-stream blocks
# ----------------------------------------------------------------------------------------------------------------
def _without_hooks(module) -> bool:
    """Whether calling ``module`` runs only its class's ``forward``: no forward or backward hooks (its own or global;
    a full backward hook fires only when the module's ``__call__`` runs) and no ``forward`` wrapped by diffusers'
    offloading or hook registry."""
    nn_module = torch.nn.modules.module
    return ("forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks and not module._backward_pre_hooks
            and not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks
            and not nn_module._global_backward_hooks and not nn_module._global_backward_pre_hooks)


def _plain_rms_norm(module, x: torch.Tensor) -> bool:
    """Whether ``module`` is exactly ``torch.nn.RMSNorm`` over ``x``'s head dim, on x's device and called without
    hooks (diffusers' offloading and hook registry wrap ``forward`` or add hooks): what ``rms_norm_rope`` may compute
    in its place."""
    return (type(module) is torch.nn.RMSNorm and tuple(module.normalized_shape) == (x.shape[-1],)
            and _without_hooks(module) and (module.weight is None or module.weight.device == x.device))


def _joinable(first: torch.Tensor, first_norm, second: torch.Tensor, second_norm) -> bool:
    """Whether two streams' q (or k) may be normalised in one ``rms_norm_rope`` call: one eps (the op takes one),
    one dtype and one device (diffusers normalises each stream in its own, and its ``torch.cat`` promotes)."""
    return first_norm.eps == second_norm.eps and first.dtype == second.dtype and first.device == second.device


def _norm_kind(module, x: torch.Tensor) -> Optional[str]:
    """``"torch"`` for a plain ``torch.nn.RMSNorm`` over ``x`` (``_plain_rms_norm``), ``"diffusers"`` for a plain
    diffusers ``RMSNorm`` (``_plain_diffusers_rms_norm``: Bria FIBO's single-stream blocks), else None: the norms
    ``rms_norm_rope`` may compute in their place (the second with ``round_before_weight``)."""
    if _plain_rms_norm(module, x):
        return "torch"
    return "diffusers" if _plain_diffusers_rms_norm(module, x) else None


def _fusable(x: torch.Tensor, norm, rotary_emb, n_rows: int) -> bool:
    """Whether ``rms_norm_rope`` may compute ``norm`` and RoPE of ``x`` (``n_rows`` rows with a prefix): autocast
    off (under it the norm's output dtype is autocast's to decide), FLUX's fp32 ``(cos, sin)`` tables of those rows
    on x's device (the kernel rotates in fp32), a plain RMS norm (``_norm_kind``)."""
    return (not torch.is_autocast_enabled(x.device.type) and isinstance(rotary_emb, (tuple, list))
            and len(rotary_emb) == 2
            and all(isinstance(t, torch.Tensor) and t.device == x.device and t.dtype == torch.float32
                    and tuple(t.shape) == (n_rows, x.shape[-1]) for t in rotary_emb)
            and _norm_kind(norm, x) is not None)


def _norm_rope(x: torch.Tensor, norm, rotary_emb, prefix: Optional[torch.Tensor] = None, prefix_norm=None):
    """``[prefix_norm(prefix), norm(x)]`` joined on the sequence (x alone without a prefix), then diffusers'
    ``apply_rotary_emb`` (when ``rotary_emb`` is given): one ``sparsectx.rms_norm_rope`` pass where the norms are
    plain RMS norms of one class and one eps (``_norm_kind``) and the tables FLUX's fp32 ``(cos, sin)`` rows of this
    sequence on x's device (and autocast is off), else diffusers' modules and function as they are."""
    n_rows = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    fusable = (_fusable(x, norm, rotary_emb, n_rows)
               and (prefix is None or (_norm_kind(prefix_norm, prefix) == _norm_kind(norm, x)
                                       and _joinable(prefix, prefix_norm, x, norm))))
    if fusable:
        return rms_norm_rope(x, rotary_emb[0], rotary_emb[1], norm.weight, norm.eps, prefix=prefix,
                             prefix_weight=None if prefix is None else prefix_norm.weight,
                             round_before_weight=_norm_kind(norm, x) == "diffusers")
    x = norm(x)
    if prefix is not None:
        x = torch.cat([prefix_norm(prefix), x], dim=1)
    return x if rotary_emb is None else apply_rotary_emb(x, rotary_emb, sequence_dim=1)


def _head_dim(attn) -> int:
    """An attention module's head dim: its ``head_dim``, or where it has none (diffusers' legacy ``Attention``, in
    Bria FIBO's single-stream blocks) ``inner_dim // heads``."""
    head_dim = getattr(attn, "head_dim", None)
    return attn.inner_dim // attn.heads if head_dim is None else head_dim


def _joint_qkv(attn, hidden_states, encoder_hidden_states, get_qkv_projections, rotary_emb):
    """Projections, QK norms, [text, image] concatenation and RoPE of FLUX.1/FLUX.2 attention: ``(q, k, v)``."""
    query, key, value, encoder_query, encoder_key, encoder_value = get_qkv_projections(
        attn, hidden_states, encoder_hidden_states)
    head_dim = _head_dim(attn)
    query, key, value = (t.unflatten(-1, (-1, head_dim)) for t in (query, key, value))
    if attn.added_kv_proj_dim is None:
        return _norm_rope(query, attn.norm_q, rotary_emb), _norm_rope(key, attn.norm_k, rotary_emb), value
    encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, head_dim))
                                                 for t in (encoder_query, encoder_key, encoder_value))
    query = _norm_rope(query, attn.norm_q, rotary_emb, encoder_query, attn.norm_added_q)
    key = _norm_rope(key, attn.norm_k, rotary_emb, encoder_key, attn.norm_added_k)
    return query, key, torch.cat([encoder_value, value], dim=1)


def _rotary_rows(rotary_emb, rows):
    """Rows ``rows`` (a slice or an index) of a RoPE table: FLUX's ``(cos, sin)`` pair or Qwen-Image's complex
    frequencies."""
    if isinstance(rotary_emb, (tuple, list)):
        return tuple(t[rows] for t in rotary_emb)
    return rotary_emb[rows]


# the modules whose forward flux_rope_tables computes (LongCat-Image's and Bria FIBO's are FLUX.1's; _tables_match
# checks each)
FLUX_POS_EMBEDS = (transformer_flux.FluxPosEmbed, transformer_flux2.Flux2PosEmbed) + (
    () if transformer_longcat_image is None else (transformer_longcat_image.LongCatImagePosEmbed,)) + (
    () if transformer_bria_fibo is None else (transformer_bria_fibo.BriaFiboEmbedND,))


def _rope_dtype(device: torch.device) -> torch.dtype:
    """The dtype of diffusers' FLUX RoPE angles on ``device``: float64, or float32 where its helper says the device
    lacks float64."""
    if maybe_adjust_dtype_for_device is not None:
        return maybe_adjust_dtype_for_device(torch.float64, device)
    return torch.float32 if device.type in ("mps", "npu") else torch.float64  # (what those releases check)


@functools.lru_cache(maxsize=16)
def _rope_frequencies(axes_dim: tuple, theta, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every axis's RoPE frequencies, computed as diffusers' ``get_1d_rotary_pos_embed`` computes them
    (``1 / theta ** (arange(0, dim, 2) / dim)`` in ``dtype`` on ``device``), each repeated for the two features of
    its pair (``repeat_interleave_real``) and joined into one ``[sum(dim)]`` row. Made once per configuration and
    device, as a plain tensor even when first asked for under inference mode (shared: never modify it)."""
    with torch.inference_mode(False), torch.no_grad():
        freqs = [1.0 / ((theta * 1.0) ** (torch.arange(0, dim, 2, dtype=dtype, device=device)[: dim // 2] / dim))
                 / 1.0 for dim in axes_dim]
        return torch.cat(freqs).repeat_interleave(2)


def _rope_axes(pos_embed, ids: torch.Tensor) -> Optional[tuple]:
    """The axis sizes ``pos_embed(ids)`` reads (FLUX.2: every configured axis; FLUX.1: one per id column), or None
    where ``flux_rope_tables`` does not compute what diffusers does (diffusers raises there: ids not ``[S, n]``, too
    few or too many axes, an odd axis size) or can not (more axes than ``rope_tables`` takes)."""
    n_axes = len(pos_embed.axes_dim) if isinstance(pos_embed, transformer_flux2.Flux2PosEmbed) else ids.shape[-1]
    if ids.ndim != 2 or not 0 < n_axes <= min(ids.shape[-1], len(pos_embed.axes_dim), ROPE_MAX_AXES):
        return None
    axes_dim = tuple(int(dim) for dim in pos_embed.axes_dim[:n_axes])
    return None if any(dim % 2 for dim in axes_dim) else axes_dim


def flux_rope_tables(pos_embed, ids: torch.Tensor) -> tuple:
    """``pos_embed(ids)`` of diffusers' ``FluxPosEmbed`` / ``Flux2PosEmbed`` (fp32 ``(cos, sin)`` ``[S, D]``) by
    ``sparsectx.rope_tables`` (one launch on a GPU) where diffusers runs about thirteen ops per axis: the same
    angles (each axis's float64 frequencies times the float32 position, ``torch.outer``'s promotion), their cosines
    and sines rounded to float32, each repeated for its pair (``repeat_interleave_real``: here the frequencies are
    repeated instead, so each angle is computed twice, the same product both times). Every value is the one
    diffusers computes (the tests compare them bit for bit on the CPU and, in a GPU test, on CUDA). Ids diffusers
    refuses (``_rope_axes``) go to the module's own forward, which raises as it does."""
    axes_dim = _rope_axes(pos_embed, ids)
    if axes_dim is None:
        return type(pos_embed).forward(pos_embed, ids)
    freqs = _rope_frequencies(axes_dim, pos_embed.theta, _rope_dtype(ids.device), ids.device)
    # [S, D]: position on the feature's axis x its pair's frequency (the product in the frequencies' dtype, as
    # torch.outer promotes: the float32 position is exact in float64), one launch on a GPU
    return rope_tables(ids, freqs, axes_dim)


@dataclass
class RopeTablesMemo:
    """The RoPE tables of one id tensor, for ``fast_rope_tables``: made at the first ``pos_embed`` call given that
    very tensor object (``ids``) and returned to the later ones. For id rows that stay the same over many forwards:
    the drop-in's kept image rows, made once per selection and passed to every step's forward."""

    ids: torch.Tensor
    tables: Optional[tuple] = None

    def get(self, pos_embed) -> tuple:
        # (tables made under inference mode can not be saved for a backward: remade outside it)
        if self.tables is None or (self.tables[0].is_inference() and not torch.is_inference_mode_enabled()):
            self.tables = flux_rope_tables(pos_embed, self.ids)
        return self.tables


# module -> ((its class's forward, axes, theta), whether flux_rope_tables computes the module's tables)
_TABLES_MATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tables_match(pos_embed) -> bool:
    """Whether ``flux_rope_tables`` gives, bit for bit, the tables the module's own ``forward`` gives: checked once
    per module, forward function and configuration, on a few CPU ids (no device work). A diffusers release that
    changed the module's computation (or a patch of its forward) keeps the module's own forward, with a warning,
    where the shortcut would change the model's outputs silently."""
    forward = type(pos_embed).forward
    key = (forward, tuple(pos_embed.axes_dim), pos_embed.theta)
    known = _TABLES_MATCH.get(pos_embed)
    if known is None or known[0] != key:
        if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
            return False  # (the module's own forward while dynamo or a torch.func transform runs: checked later)
        n_axes = len(pos_embed.axes_dim)
        # positions as the pipelines make them (whole numbers, references on their own planes) and a few others
        ids = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 1], [10, 7, 5, 0], [0, 63, 127, 2], [3, 0.5, 1e3, 0]],
                           dtype=torch.float32, device="cpu")[:, :n_axes] if n_axes <= 4 else torch.arange(
            5.0 * n_axes, device="cpu").reshape(5, n_axes)  # (on the CPU whatever torch's default device)
        with torch.inference_mode(False), torch.no_grad():
            try:
                expected, got = forward(pos_embed, ids), flux_rope_tables(pos_embed, ids)
                same = len(expected) == len(got) and all(
                    e.dtype == g.dtype and e.shape == g.shape and torch.equal(e, g) for e, g in zip(expected, got))
            except Exception:  # (a forward of another form)
                same = False
        _TABLES_MATCH[pos_embed] = known = (key, same)
        if not same:
            _warn(f"diffusers' {type(pos_embed).__name__}.forward computes other RoPE tables than sparsectx's "
                  "copy of it (a diffusers release newer than those tested, or a patched forward): the module's "
                  "own forward is kept (a few more launches per step)", RuntimeWarning)
    return known[1]


@contextlib.contextmanager
def fast_rope_tables(transformer: torch.nn.Module, memo: Optional[RopeTablesMemo] = None):
    """Inside the block, a FLUX.1 / FLUX.2 transformer's ``pos_embed`` (when it is diffusers' module, called without
    hooks) computes its tables with ``flux_rope_tables``: the same values from far fewer launches (the rows before a
    forward's first block wait on host launch work: the drop-in's attention probe, and every step after its host
    read), and ``memo.ids`` gets ``memo``'s tables (made once). Elsewhere nothing changes."""
    pos_embed = getattr(transformer, "pos_embed", None)
    if type(pos_embed) not in FLUX_POS_EMBEDS or not _without_hooks(pos_embed) or not _tables_match(pos_embed):
        yield
        return

    def fast(ids: torch.Tensor) -> tuple:
        if torch._C._functorch.is_functorch_wrapped_tensor(ids):  # (torch.func: the module's own ops)
            return type(pos_embed).forward(pos_embed, ids)
        return memo.get(pos_embed) if memo is not None and ids is memo.ids else flux_rope_tables(pos_embed, ids)

    pos_embed.forward = fast
    try:
        yield
    finally:
        if pos_embed.__dict__.get("forward") is fast:  # (an overlapping probe may have put the module back first)
            del pos_embed.forward


def flux_probe_qk(attn, hidden_states, encoder_hidden_states, get_qkv_projections, rotary_emb, target_rows,
                  ref_rows):
    """What the attention probe reads of a FLUX.1/FLUX.2 double-stream attention: the text queries, the queries of
    image rows ``target_rows`` and the keys of image rows ``ref_rows`` (each a slice or an index), each
    ``[B, n, H, D]`` exactly as ``_joint_qkv`` computes those rows (projection, QK norm, RoPE), without projecting
    the rows and tensors the probe does not return (a fused QKV matrix projects the needed rows only)."""
    n_text = encoder_hidden_states.shape[1]
    target, refs = hidden_states[:, target_rows], hidden_states[:, ref_rows]
    if getattr(attn, "fused_projections", False):
        target_q, _, _, text_q, _, _ = get_qkv_projections(attn, target, encoder_hidden_states)
        _, ref_k, _, _, _, _ = get_qkv_projections(attn, refs, None)
    else:
        target_q, ref_k, text_q = attn.to_q(target), attn.to_k(refs), attn.add_q_proj(encoder_hidden_states)

    def rows(selected, offset=0):
        """The RoPE table rows of image rows ``selected`` (a slice: a view) past ``offset`` text rows."""
        if rotary_emb is None:
            return None
        shifted = (slice(selected.start + offset, selected.stop + offset) if isinstance(selected, slice)
                   else selected + offset)
        return _rotary_rows(rotary_emb, shifted)

    head_dim = _head_dim(attn)
    return (_norm_rope(text_q.unflatten(-1, (-1, head_dim)), attn.norm_added_q, rows(slice(0, n_text))),
            _norm_rope(target_q.unflatten(-1, (-1, head_dim)), attn.norm_q, rows(target_rows, n_text)),
            _norm_rope(ref_k.unflatten(-1, (-1, head_dim)), attn.norm_k, rows(ref_rows, n_text)))


def flux3_probe_qk(attn, hidden_states, rotary_emb, n_text: int, n_target: int):
    """What the attention probe reads of a FLUX.3 joint attention over ``[text, target, references]`` (``n_text``
    and ``n_target`` rows, then the references): the text and target queries and the reference keys, each
    ``[B, n, H, D]`` as the FLUX.3 processors compute those rows (projection, QK norm in fp32 and RoPE by
    ``_fp32_norm_rope``, back to the projection's dtype), without projecting what the probe does not return."""
    n_queries = n_text + n_target
    if getattr(attn, "fused_projections", False):
        query = attn.to_qkv(hidden_states[:, :n_queries]).chunk(3, dim=-1)[0]
        key = attn.to_qkv(hidden_states[:, n_queries:]).chunk(3, dim=-1)[1]
    else:
        query, key = attn.to_q(hidden_states[:, :n_queries]), attn.to_k(hidden_states[:, n_queries:])

    def norm_rope(x, norm, rows):
        tables = None if rotary_emb is None else _rotary_rows(rotary_emb, rows)
        return _fp32_norm_rope(x.unflatten(-1, (attn.heads, -1)), norm, tables).to(x.dtype)

    query = norm_rope(query, attn.norm_q, slice(0, n_queries))
    key = norm_rope(key, attn.norm_k, slice(n_queries, hidden_states.shape[1]))
    return query[:, :n_text], query[:, n_text:], key


def _split_joint_output(attn, out, encoder_hidden_states, flux1: bool):
    """Text/image split of the joint attention output and the output projections, as diffusers does it: FLUX.1
    makes the halves contiguous and projects the image half first, FLUX.2 projects the text half first (the order
    matters where a projection draws from the RNG, e.g. a LoRA adapter's dropout)."""
    if encoder_hidden_states is None:
        return attn.to_out[1](attn.to_out[0](out))
    n_text = encoder_hidden_states.shape[1]
    text_out, image_out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
    if flux1:
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())
    text_out = attn.to_add_out(text_out)
    return attn.to_out[1](attn.to_out[0](image_out)), text_out


class _JointAttnProcessor(_SparsectxProcessor):
    """Joint ``[text, image]`` attention of FLUX.1 / FLUX.2 / LongCat-Image / Bria FIBO: the projections of diffusers'
    ``diffusers_module._get_qkv_projections`` (the helper the replaced processor calls), QK norms and RoPE, then
    sparsectx's attention and diffusers' output split. FLUX.1's, LongCat's and Bria FIBO's single-stream blocks call
    it without ``encoder_hidden_states`` and project the output themselves."""

    diffusers_module = None  # the diffusers module of the replaced processor
    flux1 = True  # FLUX.1's output split (and single-stream blocks); False: FLUX.2's

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = _joint_qkv(attn, hidden_states, encoder_hidden_states,
                                       self.diffusers_module._get_qkv_projections, image_rotary_emb)
        out = self._attend(query, key, value, attention_mask=attention_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None and self.flux1:  # a single-stream block: it projects the output
            return out
        return _split_joint_output(attn, out, encoder_hidden_states, flux1=self.flux1)


class SparsectxFlux2AttnProcessor(_JointAttnProcessor):
    """Replaces ``Flux2AttnProcessor`` (FLUX.2 double-stream blocks)."""

    diffusers_module = transformer_flux2
    flux1 = False


class SparsectxFluxAttnProcessor(_JointAttnProcessor):
    """Replaces ``FluxAttnProcessor`` (FLUX.1 / Kontext double-stream and single-stream blocks)."""

    diffusers_module = transformer_flux


class SparsectxLongCatImageAttnProcessor(_JointAttnProcessor):
    """Replaces ``LongCatImageAttnProcessor`` (LongCat-Image double-stream and single-stream blocks: FLUX.1's
    attention)."""

    diffusers_module = transformer_longcat_image


class SparsectxBriaFiboAttnProcessor(_JointAttnProcessor):
    """Replaces ``BriaFiboAttnProcessor`` (Bria FIBO double-stream blocks: FLUX.1's attention; the pipeline's prompt
    padding comes as a boolean ``attention_mask``)."""

    diffusers_module = transformer_bria_fibo


class SparsectxBriaAttnProcessor(_JointAttnProcessor):
    """Replaces ``BriaAttnProcessor`` (Bria FIBO single-stream blocks, diffusers' legacy ``Attention``)."""

    diffusers_module = transformer_bria


def _parallel_qkv_mlp(attn, hidden_states, rotary_emb):
    """FLUX.2 single-stream block input: fused QKV + MLP projection, split by the global QKV:MLP ratio (works with
    column-sharded weights), QK norms and RoPE. Returns ``(q, k, v, mlp_hidden_states)``."""
    projected = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp_hidden_states = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
    return _norm_rope(query, attn.norm_q, rotary_emb), _norm_rope(key, attn.norm_k, rotary_emb), value, \
        mlp_hidden_states


def _parallel_output(attn, attn_out, mlp_hidden_states):
    """FLUX.2 single-stream block output: SwiGLU on the MLP half, then the fused output projection."""
    return attn.to_out(torch.cat([attn_out, attn.mlp_act_fn(mlp_hidden_states)], dim=-1))


class SparsectxFlux2ParallelSelfAttnProcessor(_SparsectxProcessor):
    """Replaces ``Flux2ParallelSelfAttnProcessor`` (FLUX.2 single-stream blocks: attention and MLP in parallel)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, attention_mask, image_rotary_emb)
        query, key, value, mlp_hidden_states = _parallel_qkv_mlp(attn, hidden_states, image_rotary_emb)
        out = self._attend(query, key, value, attention_mask=attention_mask).flatten(2, 3).to(query.dtype)
        return _parallel_output(attn, out, mlp_hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# FLUX.2 klein reference KV cache
# ----------------------------------------------------------------------------------------------------------------
def _kv_attention(processor: _SparsectxProcessor, query, key, value, attention_mask, kv_cache, kv_cache_mode,
                  num_txt_tokens: int, num_ref_tokens: int):
    """FLUX.2 klein's KV-cache attention. Extract: the ``[txt, ref, img]`` sequence stores the reference K/V in the
    cache; text and target queries attend to every key, reference queries to the reference keys only. Cached:
    ``[txt, img]`` queries attend to their own keys plus the cached reference keys (passed to the kernel as its
    reference buffer: no concatenation): every cached row, or, when the layer cache carries ``kept_index``
    (``[B, n]`` integer positions in the cache, unique per sample: its shape and range are checked, the range with
    one host read per index tensor and forward; uniqueness is not checked), only those rows, gathered per layer (a cache
    of every reference token read under a selection: the alternative to caching the kept tokens only, measured by
    the ``kv`` bench case).
    Otherwise plain attention."""
    processor._no_mask_with_kv_cache(kv_cache_mode)
    ref_start, ref_end = num_txt_tokens, num_txt_tokens + num_ref_tokens
    if kv_cache_mode == KV_EXTRACT and kv_cache is not None and num_ref_tokens > 0:
        kv_cache.store(key[:, ref_start:ref_end].clone(), value[:, ref_start:ref_end].clone())
    if kv_cache_mode == KV_EXTRACT and num_ref_tokens > 0:
        processor._check_inputs(query)
        outer_query = torch.cat([query[:, :ref_start], query[:, ref_end:]], dim=1)
        outer = dense_attention(outer_query, key, value)
        ref_out = value[:, ref_start:ref_end] if _attention_scores_skipped() else \
            dense_attention(query[:, ref_start:ref_end], key[:, ref_start:ref_end], value[:, ref_start:ref_end])
        return torch.cat([outer[:, :ref_start], ref_out, outer[:, ref_start:]], dim=1)
    if kv_cache_mode == KV_CACHED and kv_cache is not None:
        processor._check_inputs(query)
        ref_key, ref_value = kv_cache.get()
        kept_index = getattr(kv_cache, KEPT_INDEX, None)
        if kept_index is not None:
            _check_kept_index(kept_index, ref_key, processor.state.index_ranges)
        return dense_attention(query, key, value, ref_key, ref_value, kept_index)
    return processor._attend(query, key, value, attention_mask=attention_mask)


def _check_kept_index(kept_index, ref_key: torch.Tensor, ranges: Optional[dict]) -> None:
    """``ValueError`` unless a layer cache's ``kept_index`` is an integer ``[B, n]`` tensor of positions within the
    cache's rows (the kernel reads them unchecked: a wrong one read outside the cache). Its range is read once per
    index tensor and forward (``_index_range``: one host read, not one per layer)."""
    batch, rows = ref_key.shape[0], ref_key.shape[1]
    if not isinstance(kept_index, torch.Tensor) or kept_index.ndim != 2 or kept_index.shape[0] != batch \
            or kept_index.dtype.is_floating_point or kept_index.dtype.is_complex or kept_index.dtype == torch.bool:
        described = (f"{kept_index.dtype} of shape {list(kept_index.shape)}" if isinstance(kept_index, torch.Tensor)
                     else type(kept_index).__name__)
        raise ValueError(f"the layer cache's {KEPT_INDEX} must be an integer tensor [B={batch}, n], got {described}")
    if kept_index.numel():
        low, high = _index_range(kept_index, ranges)
        if low < 0 or high >= rows:
            raise ValueError(f"the layer cache's {KEPT_INDEX} must lie in [0, {rows}) (the cache's rows), got values "
                             f"in [{low}, {high}]")


def _index_range(index: torch.Tensor, ranges: Optional[dict]) -> tuple:
    """``(min, max)`` of a non-empty integer tensor, read from the device, or found in ``ranges`` (one forward's: its
    later layers read the same tensor; each entry holds its tensor, so an id is not reused while the forward runs).
    Kept for one forward only: a write that no version counter sees (``.data``, a numpy view) may come between two."""
    known = ranges.get(id(index)) if ranges is not None else None
    if known is not None:
        return known[1], known[2]
    low, high = (int(v) for v in torch.stack(torch.aminmax(index)).tolist())
    if ranges is not None:
        ranges[id(index)] = (index, low, high)
    return low, high


class SparsectxFlux2KVAttnProcessor(_SparsectxProcessor):
    """Replaces ``Flux2KVAttnProcessor`` (FLUX.2 klein KV pipeline, double-stream blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens)
        query, key, value = _joint_qkv(attn, hidden_states, encoder_hidden_states,
                                       transformer_flux2._get_qkv_projections, image_rotary_emb)
        num_txt_tokens = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        out = _kv_attention(self, query, key, value, attention_mask, kv_cache, kv_cache_mode, num_txt_tokens,
                            num_ref_tokens)
        return _split_joint_output(attn, out.flatten(2, 3).to(query.dtype), encoder_hidden_states, flux1=False)


class SparsectxFlux2KVParallelSelfAttnProcessor(_SparsectxProcessor):
    """Replaces ``Flux2KVParallelSelfAttnProcessor`` (FLUX.2 klein KV pipeline, single-stream blocks)."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, attention_mask, image_rotary_emb, kv_cache=kv_cache,
                                 kv_cache_mode=kv_cache_mode, num_txt_tokens=num_txt_tokens,
                                 num_ref_tokens=num_ref_tokens)
        query, key, value, mlp_hidden_states = _parallel_qkv_mlp(attn, hidden_states, image_rotary_emb)
        out = _kv_attention(self, query, key, value, attention_mask, kv_cache, kv_cache_mode, num_txt_tokens,
                            num_ref_tokens)
        return _parallel_output(attn, out.flatten(2, 3).to(query.dtype), mlp_hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Qwen-Image(-Edit/-Plus)
# ----------------------------------------------------------------------------------------------------------------
def _plain_diffusers_rms_norm(module, x: torch.Tensor) -> bool:
    """Whether ``module`` is exactly diffusers' ``RMSNorm`` over ``x``'s head dim, without bias and hooks, on x's
    device, whose output has x's dtype (no weight, or a weight of x's dtype: an fp32 weight would give an fp32
    output): what ``rms_norm_rope(..., round_before_weight=True)`` may compute in its place."""
    weight = getattr(module, "weight", None)
    return (type(module) is DiffusersRMSNorm and tuple(module.dim) == (x.shape[-1],) and module.bias is None
            and _without_hooks(module) and (weight is None or (weight.device == x.device and weight.dtype == x.dtype)))


def _qwen_fusable(out: torch.Tensor, norm, freqs) -> bool:
    """Whether one Qwen-Image stream's norm and RoPE may run as ``rms_norm_rope``: diffusers' plain ``RMSNorm``
    (``_plain_diffusers_rms_norm``), complex64 frequencies ``[n, D/2]`` of these rows on the device (the kernel
    rotates in fp32: wider tables run diffusers' code), no autocast."""
    return (norm is not None and isinstance(freqs, torch.Tensor) and freqs.dtype == torch.complex64
            and freqs.device == out.device and tuple(freqs.shape) == (out.shape[1], out.shape[-1] // 2)
            and not torch.is_autocast_enabled(out.device.type) and _plain_diffusers_rms_norm(norm, out))


def _qwen_norm_rope(out: torch.Tensor, norm, freqs) -> torch.Tensor:
    """One Qwen-Image stream's projected rows ``[B, n, H, D]`` through its QK norm (if any) and RoPE with those
    rows' frequencies (if given): in one ``rms_norm_rope`` pass where ``_qwen_fusable``."""
    if _qwen_fusable(out, norm, freqs):
        return rms_norm_rope(out, freqs.real, freqs.imag, norm.weight, norm.eps, round_before_weight=True)
    if norm is not None:
        out = norm(out)
    if freqs is not None:
        if not freqs.is_complex():  # (newer diffusers hands some devices real angles, with a RoPE of their own)
            raise RuntimeError(f"Qwen-Image's RoPE frequencies reached sparsectx's processor as {freqs.dtype}, not "
                               "complex (a diffusers release newer than those tested, or a device without complex "
                               "dtypes): sparsectx's Qwen-Image processor and attention probe apply diffusers' "
                               "complex RoPE only; use attention='native' with a selector that reads no probe "
                               "(random, uniform)")
        out = transformer_qwenimage.apply_rotary_emb_qwen(out, freqs, use_real=False)
    return out


def _qwen_projection(attn, rows, linear, norm=None, freqs=None):
    """``[B, n, H, D]``: rows of one Qwen-Image stream through one projection, then ``_qwen_norm_rope``."""
    return _qwen_norm_rope(linear(rows).unflatten(-1, (-1, attn.inner_dim // attn.heads)), norm, freqs)


def _qwen_joint_stream(first, second):
    """q or k of the joint sequence from its two projected stream parts, each ``(part [B, n, H, D], norm, freqs)`` in
    sequence order: both normalised, rotated and joined by one ``rms_norm_rope`` call (the first as its prefix, on
    the concatenated frequency tables) where both streams are ``_qwen_fusable`` and ``_joinable``, else stream by
    stream and concatenated."""
    (first_part, first_norm, first_freqs), (second_part, second_norm, second_freqs) = first, second
    parts = [first_part, second_part]
    if (_qwen_fusable(parts[0], first_norm, first_freqs) and _qwen_fusable(parts[1], second_norm, second_freqs)
            and _joinable(parts[0], first_norm, parts[1], second_norm)):
        freqs = torch.cat([first_freqs, second_freqs])
        return rms_norm_rope(parts[1], freqs.real, freqs.imag, second_norm.weight, second_norm.eps, prefix=parts[0],
                             prefix_weight=first_norm.weight, round_before_weight=True)
    return torch.cat([_qwen_norm_rope(parts[0], first_norm, first_freqs),
                      _qwen_norm_rope(parts[1], second_norm, second_freqs)], dim=1)


def _qwen_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, image_first: bool = False):
    """Projections, QK norms and RoPE of both Qwen-Image streams, joined as ``[text, image]`` (diffusers' order) or,
    with ``image_first``, ``[image, text]``: ``(q, k, v)``, each ``[B, T + S, H, D]``."""
    image_freqs, text_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)

    def in_order(text_part, image_part):
        return (image_part, text_part) if image_first else (text_part, image_part)

    def project(rows, linear):
        return linear(rows).unflatten(-1, (-1, attn.inner_dim // attn.heads))

    # diffusers' order of the projections (one draws from the RNG where it has dropout, e.g. a LoRA adapter's)
    img_q, img_k, img_v = (project(hidden_states, linear) for linear in (attn.to_q, attn.to_k, attn.to_v))
    txt_q, txt_k, txt_v = (project(encoder_hidden_states, linear)
                           for linear in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    query = _qwen_joint_stream(*in_order((txt_q, attn.norm_added_q, text_freqs), (img_q, attn.norm_q, image_freqs)))
    key = _qwen_joint_stream(*in_order((txt_k, attn.norm_added_k, text_freqs), (img_k, attn.norm_k, image_freqs)))
    return query, key, torch.cat(in_order(txt_v, img_v), dim=1)


def qwen_probe_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb, target_rows, ref_rows):
    """``flux_probe_qk`` for a Qwen-Image double-stream attention: text queries, queries of image rows
    ``target_rows``, keys of image rows ``ref_rows``, each ``[B, n, H, D]`` as ``_qwen_joint_qkv`` computes them."""
    image_freqs, text_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
    target_freqs, ref_freqs = (None, None) if image_freqs is None else \
        (_rotary_rows(image_freqs, target_rows), _rotary_rows(image_freqs, ref_rows))
    return (_qwen_projection(attn, encoder_hidden_states, attn.add_q_proj, attn.norm_added_q, text_freqs),
            _qwen_projection(attn, hidden_states[:, target_rows], attn.to_q, attn.norm_q, target_freqs),
            _qwen_projection(attn, hidden_states[:, ref_rows], attn.to_k, attn.norm_k, ref_freqs))


def qwen21_probe_qk(attn, hidden_states, rotary_emb, text_rows, target_rows, ref_rows):
    """The probe's q and k on Qwen-Image 2.1's one joint sequence: queries of rows ``text_rows`` and ``target_rows``,
    keys of rows ``ref_rows``, each ``[B, n, H, D]`` as diffusers' processor computes them (projection, RMS norm,
    RoPE; ``transformer_qwenimage21._qwenimage21_prepare_qkv``)."""
    from diffusers.models.transformers.transformer_qwenimage21 import apply_rotary_emb_qwen

    head_dim = attn.inner_dim // attn.heads

    def project(rows, linear, norm):
        out = linear(hidden_states[:, rows]).unflatten(-1, (-1, head_dim))
        out = norm(out).to(out.dtype)
        if rotary_emb is None or out.shape[1] == 0:  # (no such row, e.g. a prompt of image slots only)
            return out
        return apply_rotary_emb_qwen(out, rotary_emb[rows], use_real=False)

    return (project(text_rows, attn.to_q, attn.norm_q), project(target_rows, attn.to_q, attn.norm_q),
            project(ref_rows, attn.to_k, attn.norm_k))


class SparsectxQwenDoubleStreamAttnProcessor(_SparsectxProcessor):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0``: the text padding mask (``encoder_hidden_states_mask``) becomes
    a key mask of ``masked_attention``. The joint sequence is built ``[image, text]`` (attention does not depend on
    the order of its keys; each query row is its own), so the image tokens are contiguous key blocks and only the
    text goes through the mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if self._delegates():
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} requires encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not accept an external attention_mask; pass "
                             "encoder_hidden_states_mask (the text padding mask)")
        n_text = encoder_hidden_states.shape[1]
        n_image = hidden_states.shape[1]
        query, key, value = _qwen_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                            image_first=True)
        text_keep = None
        if encoder_hidden_states_mask is not None:
            text_keep = encoder_hidden_states_mask.to(device=query.device, dtype=torch.bool)
        out = self._attend_image_first(query, key, value, n_text, text_keep).flatten(2, 3).to(query.dtype)
        image_out = attn.to_out[0](out[:, :n_image].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(out[:, n_image:].contiguous())


# ----------------------------------------------------------------------------------------------------------------
# FLUX.3: self-attention over one sequence (a mode's tokens, or the joint [text, target, references])
# ----------------------------------------------------------------------------------------------------------------
def _fp32_norm_rope(x: torch.Tensor, norm, rotary_emb) -> torch.Tensor:
    """FLUX.3's QK norm and RoPE: ``norm(x.float())`` (its norms are kept in fp32), ``apply_rotary_emb`` in fp32,
    left in fp32 (the caller rounds q and k once, after RoPE): one ``rms_norm_rope`` pass on the fp32 copy where
    ``_fusable``, else diffusers' module and function."""
    x = x.float()
    if _fusable(x, norm, rotary_emb, x.shape[1]):
        return rms_norm_rope(x, rotary_emb[0], rotary_emb[1], norm.weight, norm.eps)
    x = norm(x)
    return x if rotary_emb is None else apply_rotary_emb(x, rotary_emb, sequence_dim=1)


class SparsectxFlux3AttnProcessor(_SparsectxProcessor):
    """Replaces ``Flux3AttnProcessor`` (FLUX.3's per-mode blocks and joint blocks): the same projections, QK norms
    in fp32 and RoPE, q and k rounded once to v's dtype, then ``sparse_attention`` over the sequence."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, attention_mask, image_rotary_emb)
        if self.state.image_keep is not None or self.state.packed is not None:
            raise ValueError(f"{type(self).__name__} takes no drop mask and no packed batch (FLUX.3's drop-in removes "
                             "the dropped rows; drop training does not cover FLUX.3)")
        query, key, value = (t.unflatten(-1, (attn.heads, -1))
                             for t in transformer_flux3._get_qkv_projections(attn, hidden_states))
        query = _fp32_norm_rope(query, attn.norm_q, image_rotary_emb).to(value.dtype)
        key = _fp32_norm_rope(key, attn.norm_k, image_rotary_emb).to(value.dtype)
        out = self._attend(query, key, value, attention_mask=attention_mask).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


# ----------------------------------------------------------------------------------------------------------------
# JoyImage-Edit and JoyImage-Edit-Plus: double-stream attention over [image, text], fused QKV projections
# ----------------------------------------------------------------------------------------------------------------
def _joyimage_joint_qkv(attn, hidden_states, encoder_hidden_states, rotate: Callable) -> tuple:
    """``(q, k, v)`` of the joint ``[image, text]`` sequence as diffusers' JoyImage processors compute them: each
    stream's fused QKV projection split, per-head RMS norms, then ``rotate(img_q, img_k, txt_q, txt_k)`` (the
    family's RoPE, diffusers' own functions)."""
    def split(linear, rows):
        return (t.unflatten(-1, (attn.heads, -1)) for t in linear(rows).chunk(3, dim=-1))

    img_q, img_k, img_v = split(attn.img_attn_qkv, hidden_states)
    txt_q, txt_k, txt_v = split(attn.txt_attn_qkv, encoder_hidden_states)
    img_q, img_k = attn.img_attn_q_norm(img_q), attn.img_attn_k_norm(img_k)
    txt_q, txt_k = attn.txt_attn_q_norm(txt_q), attn.txt_attn_k_norm(txt_k)
    img_q, img_k, txt_q, txt_k = rotate(img_q, img_k, txt_q, txt_k)
    return (torch.cat([img_q, txt_q], dim=1), torch.cat([img_k, txt_k], dim=1), torch.cat([img_v, txt_v], dim=1))


def _key_mask(attention_mask: torch.Tensor, batch: int, seq: int, name: str) -> torch.Tensor:
    """bool ``[B, S]``: a boolean key mask as diffusers' dispatch takes it, ``[B or 1, S]`` or ``[B or 1, 1, 1, S]``
    (other masks run the replaced processor: ``_mask_needs_original``); ``ValueError`` naming ``name`` for a mask
    of another length."""
    shape = tuple(attention_mask.shape)
    if attention_mask.ndim not in (2, 4) or shape[-1] != seq or (shape[0] != 1 and shape[0] != batch) or \
            any(size != 1 for size in shape[1:-1]):
        raise ValueError(f"{name} takes a key mask [B, 1, 1, {seq}] (or [B, {seq}], a batch dim of 1 broadcast), "
                         f"got {shape}")
    return attention_mask.reshape(shape[0], seq).expand(batch, seq)


def _joyimage_out(attn, out: torch.Tensor, n_image: int) -> tuple:
    out = out.flatten(2, 3)
    return attn.img_attn_proj(out[:, :n_image].contiguous()), attn.txt_attn_proj(out[:, n_image:].contiguous())


class SparsectxJoyImageAttnProcessor(_SparsectxProcessor):
    """Replaces ``JoyImageAttnProcessor`` (JoyImage-Edit): its projections, norms and RoPE (one table for the batch;
    the text's too with ``rope_type="mrope"``), then sparsectx's attention of the joint ``[image, text]`` sequence."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, **kwargs):
        if self._delegates():
            return self.original(attn, hidden_states, encoder_hidden_states, image_rotary_emb, **kwargs)
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} requires encoder_hidden_states (the text stream)")
        vis_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)

        def rotate(img_q, img_k, txt_q, txt_k):
            if vis_freqs is not None:
                img_q, img_k = transformer_joyimage._apply_rotary_emb(img_q, img_k, vis_freqs)
            if txt_freqs is not None:
                txt_q, txt_k = transformer_joyimage._apply_rotary_emb(txt_q, txt_k, txt_freqs)
            return img_q, img_k, txt_q, txt_k

        query, key, value = _joyimage_joint_qkv(attn, hidden_states, encoder_hidden_states, rotate)
        out = self._attend_image_first(query, key, value, encoder_hidden_states.shape[1]).to(query.dtype)
        return _joyimage_out(attn, out, hidden_states.shape[1])


class SparsectxJoyImagePlusAttnProcessor(_SparsectxProcessor):
    """Replaces ``JoyImageEditPlusAttnProcessor`` (JoyImage-Edit-Plus): its projections, norms and per-sample RoPE
    tables (image rows only), then sparsectx's attention of the joint ``[image, text]`` sequence; the forward's key
    mask ``[B, 1, 1, S]`` (the text's padding, and the padded image rows of a batch's shorter samples) masks keys."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None, attention_mask=None):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} requires encoder_hidden_states (the text stream)")

        def rotate(img_q, img_k, txt_q, txt_k):
            if image_rotary_emb is not None:
                img_q, img_k = transformer_joyimage_edit_plus._apply_rotary_emb_batched(img_q, img_k,
                                                                                        image_rotary_emb)
            return img_q, img_k, txt_q, txt_k

        n_image, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        query, key, value = _joyimage_joint_qkv(attn, hidden_states, encoder_hidden_states, rotate)
        text_keep = image_valid = None
        if attention_mask is not None:
            keys = _key_mask(attention_mask, query.shape[0], n_image + n_text, type(self).__name__).to(query.device)
            image_valid, text_keep = keys[:, :n_image], keys[:, n_image:]
        out = self._attend_image_first(query, key, value, n_text, text_keep, image_valid).to(query.dtype)
        return _joyimage_out(attn, out, n_image)


def _zimage_norm_rope(x: torch.Tensor, norm, freqs_cis: Optional[torch.Tensor]) -> torch.Tensor:
    """Z-Image's per-head norm and RoPE of q or k ``[B, S, H, D]`` with each sample's complex frequencies
    ``freqs_cis [B, S, D/2]``: one ``rms_norm_rope`` pass per sample (its tables are one sample's rows) where the
    norm and that sample's frequencies are ``_qwen_fusable`` (diffusers' plain ``RMSNorm``, complex64 rows on the
    device, no autocast; the same rounding as diffusers' norm and complex product in fp32), else diffusers' code
    (``zimage.rotated``)."""
    from .zimage import rotated

    if freqs_cis is not None and freqs_cis.ndim == 3 and freqs_cis.shape[0] == x.shape[0] and all(
            _qwen_fusable(x[b:b + 1], norm, freqs_cis[b]) for b in range(x.shape[0])):
        parts = [rms_norm_rope(x[b:b + 1], freqs_cis[b].real, freqs_cis[b].imag, norm.weight, norm.eps,
                               round_before_weight=True) for b in range(x.shape[0])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return rotated(norm(x) if norm is not None else x, freqs_cis)


class SparsectxZImageAttnProcessor(_SparsectxProcessor):
    """Replaces ``ZSingleStreamAttnProcessor`` (Z-Image): its projections, then per-head norms and RoPE (one fused
    ``rms_norm_rope`` pass per sample where ``_zimage_norm_rope`` may, else diffusers' code), then sparsectx's
    attention of the one sequence it attends over (the images in the noise refiner, the caption in the context
    refiner, ``[caption, images, siglip]`` in the main layers); the forward's key mask ``[B, S]`` (the padding of a
    batch's shorter samples) masks keys."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if self._delegates() or self._mask_needs_original(attention_mask, hidden_states.shape[0]):
            return self._replaced()(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if self.state.image_keep is not None or self.state.packed is not None:
            raise ValueError(f"{type(self).__name__} takes no drop mask and runs no packed batch (Z-Image trains "
                             "with the dropped references removed)")
        # (diffusers' order of the projections: one draws from the RNG where it has dropout, e.g. a LoRA adapter's)
        query, key, value = (linear(hidden_states).unflatten(-1, (attn.heads, -1))
                             for linear in (attn.to_q, attn.to_k, attn.to_v))
        query, key = _zimage_norm_rope(query, attn.norm_q, freqs_cis), _zimage_norm_rope(key, attn.norm_k, freqs_cis)
        self._check_inputs(query)
        batch, seq = query.shape[:2]
        if _attention_scores_skipped():
            out = value
        elif attention_mask is None:
            out = dense_attention(query, key, value)
        else:
            keys = _key_mask(attention_mask, batch, seq, type(self).__name__).to(query.device)
            out = masked_attention(query, key, value, keys)
        output = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        return attn.to_out[1](output) if len(attn.to_out) > 1 else output


# ----------------------------------------------------------------------------------------------------------------
# installing and restoring
# ----------------------------------------------------------------------------------------------------------------
_REPLACEMENTS = (  # (diffusers module, processor class name, its sparsectx replacement)
    (transformer_flux2, "Flux2AttnProcessor", SparsectxFlux2AttnProcessor),
    (transformer_flux2, "Flux2ParallelSelfAttnProcessor", SparsectxFlux2ParallelSelfAttnProcessor),
    (transformer_flux2, "Flux2KVAttnProcessor", SparsectxFlux2KVAttnProcessor),
    (transformer_flux2, "Flux2KVParallelSelfAttnProcessor", SparsectxFlux2KVParallelSelfAttnProcessor),
    (transformer_flux, "FluxAttnProcessor", SparsectxFluxAttnProcessor),
    (transformer_qwenimage, "QwenDoubleStreamAttnProcessor2_0", SparsectxQwenDoubleStreamAttnProcessor),
    (transformer_flux3, "Flux3AttnProcessor", SparsectxFlux3AttnProcessor),
    (transformer_longcat_image, "LongCatImageAttnProcessor", SparsectxLongCatImageAttnProcessor),
    (transformer_bria_fibo, "BriaFiboAttnProcessor", SparsectxBriaFiboAttnProcessor),
    (transformer_bria, "BriaAttnProcessor", SparsectxBriaAttnProcessor),
    (transformer_joyimage, "JoyImageAttnProcessor", SparsectxJoyImageAttnProcessor),
    (transformer_joyimage_edit_plus, "JoyImageEditPlusAttnProcessor", SparsectxJoyImagePlusAttnProcessor),
    (transformer_z_image, "ZSingleStreamAttnProcessor", SparsectxZImageAttnProcessor),
)
# diffusers processor class -> its sparsectx replacement (all exist in diffusers >= 0.39, setup.py's floor; a
# class a later release drops is left out rather than failing the import)
PROCESSOR_MAP = {getattr(module, name): replacement for module, name, replacement in _REPLACEMENTS
                 if hasattr(module, name)}
SPARSECTX_PROCESSORS = tuple(PROCESSOR_MAP.values())
_REPLACED = {replacement: original for original, replacement in PROCESSOR_MAP.items()}


def _register_for_layer_skip() -> None:
    """Gives each sparsectx processor diffusers' layer-skip metadata of the processor it replaces, where diffusers
    has some (in 0.42.1: Qwen-Image's and FLUX.1's), so ``apply_layer_skip`` treats a layer running sparsectx as
    diffusers'. Run at import (processors set by hand are known too) and again at each install (idempotent)."""
    if AttentionProcessorRegistry is None:
        return
    for original, replacement in PROCESSOR_MAP.items():
        try:
            metadata = AttentionProcessorRegistry.get(original)
        except ValueError:  # diffusers' layer skip does not know this processor: neither does it know ours
            continue
        AttentionProcessorRegistry.register(replacement, metadata)


_LAYER_SKIP_FAILED: list = []  # the error of a failed registration, once warned about


def _register_for_layer_skip_or_warn() -> None:
    """``_register_for_layer_skip``, warning once on failure instead of raising: layer-skip metadata is a
    convenience, and neither importing sparsectx nor enabling it must fail for it. (diffusers fills its registry
    lazily, importing other model families; a failure there can leave it marked as filled, so a later call may
    register nothing either.)"""
    try:
        _register_for_layer_skip()
    except Exception as error:  # noqa: BLE001
        if not _LAYER_SKIP_FAILED:
            _LAYER_SKIP_FAILED.append(error)
            _warn(f"sparsectx could not register its processors for diffusers' layer skip ({error}): "
                  "apply_layer_skip may not treat the layers running sparsectx's processors as diffusers' own",
                  RuntimeWarning)


_register_for_layer_skip_or_warn()


# the submodule a wrapper holds: torch's checkpoint_wrapper / offload_wrapper, FSDP1, torch.compile
_WRAPPED_MODULE_NAMES = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod"})


def _named_modules(transformer: torch.nn.Module) -> dict:
    """``{name: module}`` of every submodule, named without the wrappers' segments: a layer keeps its name when
    its block is wrapped after install (``apply_activation_checkpointing``, FSDP)."""
    return {_unwrapped_name(name): module for name, module in transformer.named_modules()}


def _unwrapped_name(name: str) -> str:
    if "_wrapped_module" not in name and "_orig_mod" not in name:  # (most names: no split)
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPED_MODULE_NAMES)


def _attention_modules(transformer: torch.nn.Module):
    """``(name, module)`` of every submodule that carries a diffusers attention processor."""
    return [(name, module) for name, module in _named_modules(transformer).items()
            if hasattr(module, "processor") and hasattr(module, "set_processor")]


def _uses_context_parallel(transformer: torch.nn.Module, processors) -> bool:
    configs = [getattr(transformer, "_parallel_config", None)] + [getattr(p, "_parallel_config", None)
                                                                  for p in processors]
    return any(c is not None and getattr(c, "context_parallel_config", c) is not None for c in configs)


def install_processors(transformer: torch.nn.Module, state: AttentionState, hint: str = "") -> dict:
    """Replaces every supported diffusers attention processor of ``transformer`` with a sparsectx processor (one
    instance per layer, all reading ``state``). Returns ``{module name: original processor}`` for
    ``restore_processors``. Raises ``TypeError`` (naming the supported classes, then ``hint``) when a layer has a
    processor sparsectx can not replace (nothing is changed then), ``RuntimeError`` under context parallelism."""
    modules = _attention_modules(transformer)
    if not modules:
        raise TypeError(f"{type(transformer).__name__} has no diffusers attention layers")
    check_replaceable(transformer, hint)
    if any(isinstance(m.processor, SPARSECTX_PROCESSORS) and not m.processor.stale for _, m in modules):
        raise RuntimeError(f"{type(transformer).__name__} already runs sparsectx processors")
    if _uses_context_parallel(transformer, [m.processor for _, m in modules]):
        raise RuntimeError("sparsectx processors do not support diffusers context parallelism; install them on a "
                           "model without it")
    _register_for_layer_skip_or_warn()
    originals = {}
    state.retired = False  # (drop training installs its state again after restoring it)
    for name, module in modules:
        original = _diffusers_processor(module.processor)
        originals[name] = original
        _warn_new_parameters(type(original))
        module.set_processor(PROCESSOR_MAP[type(original)](state, original=original))
    return originals


@functools.lru_cache(maxsize=None)
def _warn_new_parameters(diffusers_class: type) -> None:
    """Warns (once per class) when diffusers' processor takes call parameters its sparsectx replacement does not:
    diffusers hands a processor only the keyword arguments its ``__call__`` names, so a call passing one of them
    would lose it (a diffusers release newer than those tested)."""
    ours = inspect.signature(PROCESSOR_MAP[diffusers_class].__call__).parameters
    missing = [name for name in inspect.signature(diffusers_class.__call__).parameters if name not in ours]
    if missing:
        _warn(f"diffusers' {diffusers_class.__name__}.__call__ takes {missing}, which sparsectx's "
              f"{PROCESSOR_MAP[diffusers_class].__name__} does not: a call passing them loses them (a diffusers "
              "release newer than those sparsectx was tested with)", RuntimeWarning)


def _diffusers_processor(processor):
    """The diffusers processor a layer runs: ``processor``, or for a stale sparsectx processor (an orphan, or one of
    a retired state) the one it stands for: the one it was built over, or new with the settings diffusers wrote on
    it (its attention backend)."""
    if isinstance(processor, SPARSECTX_PROCESSORS) and processor.stale:
        return processor._replaced()
    return processor


def check_replaceable(transformer: torch.nn.Module, hint: str = "") -> None:
    """``TypeError`` naming the processors of ``transformer`` that sparsectx can not replace, if any (then
    ``hint``)."""
    unsupported = unsupported_processors(transformer)
    if unsupported:
        raise TypeError(f"sparsectx can not replace the attention processors {unsupported}; supported: "
                        f"{', '.join(cls.__name__ for cls in PROCESSOR_MAP)}{hint}")


def layer_processors(transformer: torch.nn.Module) -> dict:
    """``{layer name: processor object}`` of every attention layer, for ``set_layer_processors``."""
    return {name: module.processor for name, module in _attention_modules(transformer)}


def set_layer_processors(transformer: torch.nn.Module, saved: dict) -> None:
    """Puts the processor objects of ``layer_processors`` back on the layers that still exist."""
    modules = _named_modules(transformer)
    for name, processor in saved.items():
        module = modules.get(name)
        if module is not None and module.processor is not processor:
            module.set_processor(processor)


def unsupported_processors(transformer: torch.nn.Module) -> list[str]:
    """Class names of the processors of ``transformer`` that sparsectx can not replace (sorted, unique)."""
    return sorted({type(m.processor).__name__ for _, m in _attention_modules(transformer)
                   if type(m.processor) not in PROCESSOR_MAP and not isinstance(m.processor, SPARSECTX_PROCESSORS)})


def restore_processors(transformer: torch.nn.Module, originals: dict, state: Optional[AttentionState]) -> None:
    """Puts back the very processor objects ``install_processors`` replaced, in the layers that still run the
    sparsectx processor installed over them, and retires ``state`` (their state): a processor set since (e.g. the
    KV-cache processors that ``Flux2KleinKVPipeline.from_pipe`` installs on a shared transformer) stays, except a
    stale sparsectx processor (built without a state, as diffusers' ``unload_ip_adapter`` rebuilds processors as
    ``type(p)()``, or of a retired state), which becomes the diffusers processor it stands for."""
    modules = _named_modules(transformer)
    for name, processor in originals.items():
        if _runs_ours_over(modules.get(name), processor):
            modules[name].set_processor(processor)
    if state is not None:
        state.retired = True
    restore_stale_processors(transformer)


def restore_stale_processors(transformer: torch.nn.Module) -> None:
    """Puts the diffusers processor each stale sparsectx processor stands for on its layer (e.g. one left by
    ``unload_ip_adapter``, or set back by hand after its drop-in was taken off)."""
    for _, module in _attention_modules(transformer):
        if isinstance(module.processor, SPARSECTX_PROCESSORS) and module.processor.stale:
            module.set_processor(_diffusers_processor(module.processor))


def processors_installed(transformer: torch.nn.Module, originals: Optional[dict]) -> bool:
    """Whether every layer ``install_processors`` replaced still runs the sparsectx processor it installed."""
    modules = _named_modules(transformer)
    return bool(originals) and all(_runs_ours_over(modules.get(name), p) for name, p in originals.items())


def _runs_ours_over(module, original) -> bool:
    """Whether ``module`` runs a live sparsectx processor built over ``original`` (not a stale one: another install
    over the same original, set back by hand)."""
    current = getattr(module, "processor", None)
    return isinstance(current, SPARSECTX_PROCESSORS) and current.original is original and not current.stale
