"""Qwen-Image 2.1 (``QwenImage21Transformer2DModel``) on a compacted joint sequence: the drop-in's forward for it.

Qwen-Image 2.1 builds one joint sequence inside its forward: the vision-language encoder's sequence
(``encoder_hidden_states``), each of its image slots (``img_mask``) expanded to the 2x2 group of latent tokens it
stands for and filled with the packed latents (``hidden_states``: the condition images, then the target), the
target's slots appended last. Attention is block-causal over it: ``q >= k`` or both in one image block. Dropped
condition tokens must leave that sequence before the first block, which diffusers' forward offers no argument for,
so ``compacted_forward`` is the model's forward with the dropped rows removed once the sequence is assembled:
every per-token quantity (the rows, their RoPE rows, their image-block ids, the target mask, the text padding
mask) is taken at the kept positions, and what the forward derives from them (the prefix length, the causal
segments or flex ``BlockMask``, the KV cache's write slice) is computed on the compacted sequence. Removing rows
keeps the order of the rest, so ``q >= k`` and "same image block" hold between the kept tokens exactly as before,
and the result equals the full model with the dropped tokens masked as keys in every attention.

The KV cache: the extract step caches the kept prefix only (text and kept condition tokens); the cached steps'
target queries attend to it (their text padding mask is compacted to match).

Written against diffusers 0.42.1's forward (``check_diffusers_version`` warns on untested releases); the test
suite checks that it equals diffusers' forward when every token is kept.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple, Optional

import torch

from .ops import _eager_under_compile

SLOT_TOKENS = 4  # latent tokens per image slot of the vision-language sequence (a 2x2 group)


class JointLayout(NamedTuple):
    """Where each kind of row lies in one forward's joint sequence, on the host (``img_mask``'s first row: the
    samples share the layout). ``keep``: the kept joint rows in order (all when nothing is dropped)."""

    n_full: int  # rows of the full joint sequence
    image_pad: torch.Tensor  # bool [n_full]: image rows
    vlm_text: torch.Tensor  # long [n_text]: text rows of encoder_hidden_states
    keep: torch.Tensor  # long [n_kept]: kept joint rows, in order
    is_image: torch.Tensor  # bool [n_kept]: which kept rows are image rows
    image_ids: torch.Tensor  # long [n_kept]: image block of each kept row (-1: text)
    target: torch.Tensor  # bool [n_kept]: target rows (the last n_target)
    n_target: int

    @property
    def prefix_len(self) -> int:
        return self.keep.numel() - self.n_target

    def rows(self, kind: str) -> torch.Tensor:
        """Positions in the kept sequence of its ``"text"``, ``"target"`` or ``"reference"`` rows (host, long)."""
        mask = {"text": ~self.is_image, "target": self.target, "reference": self.is_image & ~self.target}[kind]
        return torch.nonzero(mask).flatten()


def joint_layout(img_mask: torch.Tensor, img_shapes: list, n_text_embeds: int, n_images: int,
                 kept_images: Optional[torch.Tensor] = None) -> JointLayout:
    """The joint layout of a forward whose image sequence (``hidden_states``, ``n_images`` rows) keeps the rows
    ``kept_images`` (host long, sorted; None: all). One host read of ``img_mask``'s first row. ``ValueError`` when
    ``img_mask``, ``img_shapes`` and the inputs' lengths do not describe one sequence (diffusers fails later, on a
    shape)."""
    vlm = img_mask[0].detach().to("cpu", torch.bool)
    shapes = [tuple(shape) for shape in img_shapes[0]]
    n_target = math.prod(shapes[-1])
    if vlm.numel() != n_text_embeds + n_target // SLOT_TOKENS:
        raise ValueError(f"img_mask has {vlm.numel()} positions but encoder_hidden_states {n_text_embeds} and the "
                         f"target {n_target} tokens ({n_target // SLOT_TOKENS} slots): it must cover the "
                         "vision-language sequence and the target's slots appended after it")
    repeats = torch.where(vlm, SLOT_TOKENS, 1)
    image_pad = torch.repeat_interleave(vlm, repeats)
    n_image_rows = int(image_pad.sum())
    if n_image_rows != n_images or sum(math.prod(shape) for shape in shapes) != n_images:
        raise ValueError(f"hidden_states has {n_images} image tokens, img_mask's slots hold {n_image_rows} and "
                         f"img_shapes {shapes} describe {sum(math.prod(shape) for shape in shapes)}")
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(image_pad, shapes)
    if not bool(target[target.numel() - n_target:].all()):
        raise ValueError("img_mask must end with the target's slots (the target rows last in the joint sequence)")
    keep_mask = ~image_pad
    image_rows = torch.nonzero(image_pad).flatten()
    keep_mask[image_rows if kept_images is None else image_rows[kept_images]] = True
    keep = torch.nonzero(keep_mask).flatten()
    return JointLayout(image_pad.numel(), image_pad, torch.nonzero(~vlm[:n_text_embeds]).flatten(), keep,
                       image_pad[keep], image_ids[keep], target[keep], n_target)


def _device(values: torch.Tensor, device) -> torch.Tensor:
    return values.to(device, non_blocking=True) if values.device != torch.device(device) else values


class Prepared(NamedTuple):
    """A forward's joint layout and what the forward takes from it, on the model's device."""

    layout: JointLayout
    rotary_emb: torch.Tensor  # RoPE rows of the kept sequence
    vlm_text: torch.Tensor  # text rows of encoder_hidden_states
    order: torch.Tensor  # the kept sequence as rows of [text rows, image rows]
    text_rows: torch.Tensor  # text rows of the kept sequence
    target: torch.Tensor  # bool: target rows of the kept sequence
    image_ids: torch.Tensor  # image block of each kept row
    segments: list  # the prefix's causal segments (diffusers' QwenImage21AttnProcessor)


MAX_PREPARED = 4  # per memo: e.g. the two guidance branches' prompts of a pipeline call


@_eager_under_compile  # host work (torch.compile of the whole model: not traced)
def prepare(model, img_mask: torch.Tensor, img_shapes: list, n_text_embeds: int, n_images: int,
            kept_images: Optional[torch.Tensor], device, memo: Optional[dict] = None) -> Prepared:
    """The ``Prepared`` of a forward, from ``memo`` when it holds one for the very same ``img_mask`` and ``kept_images``
    tensors (unchanged since: their versions) and the same shapes, else made (the host reads of ``joint_layout`` and of
    diffusers' ``pos_embed``) and kept there. The steps of a pipeline call pass the same ``img_mask``: from the
    second on, nothing is read back from the device."""
    from diffusers.models.transformers.transformer_qwenimage21 import _qwenimage21_prefix_segments

    key = None
    tensors = (img_mask,) if kept_images is None else (img_mask, kept_images)
    if memo is not None and not any(t.is_inference() for t in tensors):  # (no version counter: not memoised)
        key = (*((id(t), t._version) for t in tensors), repr(img_shapes[0]), n_text_embeds, n_images, str(device))
        found = memo.get(key)
        if found is not None and all(ref() is t for ref, t in zip(found[0], tensors)):
            return found[1]
    layout = joint_layout(img_mask, img_shapes, n_text_embeds, n_images, kept_images)
    order = torch.empty(layout.keep.numel(), dtype=torch.long)
    order[~layout.is_image] = torch.arange(layout.vlm_text.numel())
    order[layout.is_image] = torch.arange(int(layout.is_image.sum())) + layout.vlm_text.numel()
    rotary_emb = model.pos_embed(img_shapes[0], _device(layout.image_pad, device), device=device)
    prepared = Prepared(layout, rotary_emb.index_select(0, _device(layout.keep, device)),
                        *(_device(t, device) for t in (layout.vlm_text, order, layout.rows("text"), layout.target,
                                                       layout.image_ids)),
                        _qwenimage21_prefix_segments(layout.image_ids, layout.prefix_len))
    if key is not None:
        if len(memo) >= MAX_PREPARED:
            memo.pop(next(iter(memo)))
        memo[key] = (tuple(weakref.ref(t) for t in tensors), prepared)
    return prepared


def _lora_scaled(forward):
    """diffusers' LoRA scaling by ``attention_kwargs["scale"]``, as the model's own forward applies it."""
    from diffusers.utils.peft_utils import apply_lora_scale

    return apply_lora_scale("attention_kwargs")(forward)


@_lora_scaled
def compacted_forward(model, kept_images: torch.Tensor, hidden_states: torch.Tensor,
                      encoder_hidden_states: torch.Tensor, timestep: torch.Tensor, img_shapes: list,
                      img_mask: torch.Tensor, encoder_hidden_states_mask: Optional[torch.Tensor] = None,
                      attention_kwargs: Optional[dict] = None, kv_cache=None, kv_cache_mode: Optional[str] = None,
                      return_dict: bool = True, memo: Optional[dict] = None):
    """``model.forward`` with only the image rows ``kept_images`` (host long, sorted, over the full image sequence
    of ``img_shapes``) in the joint sequence: ``hidden_states`` holds those rows only. Returns what the model
    returns, its target rows computed on the kept sequence: ``[B, n_full, C]`` with the target rows (the last) and
    zeros elsewhere (pipelines read the target rows only); the cached steps: the target rows, as the model.
    ``memo``: a dict kept across the forwards on these kept rows (``prepare``)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    if kv_cache is not None and not model.config.causal_condition:
        raise ValueError("kv_cache requires the model's causal_condition=True")
    if kv_cache is not None and kv_cache_mode not in ("extract", "cached"):
        raise ValueError(f"kv_cache_mode must be 'extract' or 'cached' with a kv_cache, got {kv_cache_mode!r}")
    if kv_cache is None and kv_cache_mode is not None:
        raise ValueError(f"kv_cache_mode is {kv_cache_mode!r} but no kv_cache was passed")
    if kept_images is not None and (kept_images.device.type != "cpu" or kept_images.dtype != torch.long):
        raise ValueError(f"kept_images must be a host (CPU) tensor of int64 row indices, got {kept_images.dtype} on "
                         f"{kept_images.device}")
    batch, device = hidden_states.shape[0], hidden_states.device
    n_images = sum(math.prod(shape) for shape in img_shapes[0])
    prepared = prepare(model, img_mask, img_shapes, encoder_hidden_states.shape[1], n_images, kept_images, device,
                       memo)
    layout, target = prepared.layout, prepared.target
    if hidden_states.shape[1] != layout.keep.numel() - layout.vlm_text.numel():
        raise ValueError(f"hidden_states has {hidden_states.shape[1]} rows but kept_images names "
                         f"{layout.keep.numel() - layout.vlm_text.numel()}")
    prefix_len = layout.prefix_len
    cached_step = kv_cache_mode == "cached"
    if cached_step:  # the target's rows only (the prefix is in the cache)
        images = model.img_in(hidden_states[:, hidden_states.shape[1] - layout.n_target:])
        joint, rotary_emb = images, prepared.rotary_emb[prefix_len:]
    else:  # the kept joint sequence: the text rows of the encoder's sequence and the kept image rows, interleaved
        # in sequence order (one gather from [text rows, image rows])
        text = model.txt_in(encoder_hidden_states).index_select(1, prepared.vlm_text)
        images = model.img_in(hidden_states)
        joint = torch.cat([text, images], dim=1).index_select(1, prepared.order)
        rotary_emb = prepared.rotary_emb

    timestep = timestep.to(images.dtype)
    if model.config.causal_condition:  # text and condition rows modulate from an extra t = 0 row
        timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)
        modulation_mask = target
    else:
        modulation_mask = None
    temb = model.time_text_embed(timestep, images)
    modulation = model.modulation(temb)

    key_valid = None  # the prompt's padding, as keys of the kept sequence
    if encoder_hidden_states_mask is not None:
        key_valid = torch.ones(batch, layout.keep.numel(), dtype=torch.bool, device=device)
        key_valid[:, prepared.text_rows] = encoder_hidden_states_mask.bool().index_select(1, prepared.vlm_text)

    if cached_step:  # the target's queries against the cached (kept) prefix
        cached = kv_cache.get_layer(0).k
        if cached is not None and cached.shape[1] != prefix_len:
            raise ValueError(f"the KV cache holds {cached.shape[1]} prefix tokens but this step keeps {prefix_len}: "
                             "the cached steps must keep the reference tokens their extract step kept")
        modulation_mask = None if modulation_mask is None else modulation_mask[prefix_len:]
        attention_mask = None if key_valid is None else key_valid[:, None, None, :]
        cache_write_slice, segments, block_key_valid = None, None, None
    else:  # the block-causal structure in the form the installed processors read
        processors = [block.attn.processor for block in model.transformer_blocks]
        flex = [isinstance(p, q21.QwenImage21FlexAttnProcessor) for p in processors]
        attention_mask = q21.build_qwenimage21_block_causal_mask(
            prepared.image_ids, key_valid, batch, device) if any(flex) else None
        segments = None if all(flex) else prepared.segments
        cache_write_slice = slice(0, prefix_len) if kv_cache_mode == "extract" else None
        block_key_valid = key_valid

    for index, block in enumerate(model.transformer_blocks):
        layer_cache = kv_cache.get_layer(index) if kv_cache is not None else None
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            joint = model._gradient_checkpointing_func(
                block, joint, modulation, rotary_emb, attention_mask, modulation_mask, layer_cache, kv_cache_mode,
                cache_write_slice, segments, block_key_valid)
        else:
            joint = block(hidden_states=joint, modulation=modulation, rotary_emb=rotary_emb,
                          attention_mask=attention_mask, target_token_mask=modulation_mask, layer_cache=layer_cache,
                          kv_cache_mode=kv_cache_mode, cache_write_slice=cache_write_slice, segments=segments,
                          key_valid=block_key_valid)

    output = model.proj_out(model.norm_out(joint, temb, modulation_mask))
    if not cached_step:  # the target rows (the last) at their rows of the full sequence, zeros elsewhere
        full = output.new_zeros((batch, layout.n_full, *output.shape[2:]))
        full[:, layout.n_full - layout.n_target:] = output[:, prefix_len:]
        output = full
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)
