"""A tiny, offline JoyImageEditPipeline (single reference; diffusers 0.42.1): random-weight components, fp32, CPU.

Reuses the fakes of `joyimage_pipeline` (the Plus fixture): `FakeQwen3VL`, `FakeQwen3VLProcessor` (for
`encode_prompt_multiple_images`, the path taken with a reference image) and `SmallJoyImageProcessor`. The text-only
path (`encode_prompt` -> `_get_qwen_prompt_embeds`, template "image", taken without an image) calls the tokenizer
itself, so `FakeQwen2TokenizerCallable` adds a `__call__` (right padding, truncation to `max_length`) to the Plus
fake. Both templates have the same 33-token system turn, so the pipeline's drop of 34 positions keeps `user`, `\n`,
the image slots and the prompt's words.

The VAE is the Plus fixture's small Wan 2.1 `AutoencoderKLWan` with one change: this pipeline SAMPLES the
reference's posterior (`latent_dist.sample()`, global RNG, no generator), and a random encoder's posterior std is
~1 against means of std ~0.18, so the reference latents would be mostly noise. `quant_conv` is set so that the
log-variance is -30 (std ~3e-7) and the means are scaled by `MEAN_GAIN` (std ~0.9 on random images).

Sizes: `pipe.vae_image_processor` (bucket snapping to >= 512 px a side) is replaced by `SmallJoyImageProcessor`:
(height, width) is the reference's own size (or the given height/width) snapped DOWN to a multiple of 16 px, 64x64
with neither. The pipeline then resizes and center-crops the reference to exactly that size: the reference and the
target always have the same latent size (the transformer stacks them along its frame axis). `pipe.image_processor`
(a VaeImageProcessor) only post-processes the output and is kept.

The transformer gets `hidden_states` (B, num_items, 16, 1, H/8, W/8): num_items = 2 with a reference (reference
first, target last), 1 without. Guidance runs as two forwards per step (prompt, then negative prompt), with no text
attention mask: a batch's shorter prompts carry their padding positions into the attention.
"""
import torch
from transformers import BatchFeature

from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, JoyImageEditPipeline,
                       JoyImageEditTransformer3DModel)
from joyimage_pipeline import (HEADS, HIDDEN, PATCH, PAD_ID, PX_PER_TOKEN, ROPE, TEXT_DIM, VAE_SCALE, Z_DIM,
                               FakeQwen2Tokenizer, FakeQwen3VL, FakeQwen3VLProcessor, SmallJoyImageProcessor,
                               reference_image, with_random_modulation)

MEAN_GAIN = 5.0  # the random encoder's posterior means have std ~0.18 on random images

__all__ = ["FakeQwen2TokenizerCallable", "tiny_joyimage_edit_pipeline", "run", "reference_image", "latent_size",
           "PX_PER_TOKEN", "VAE_SCALE", "Z_DIM"]


class FakeQwen2TokenizerCallable(FakeQwen2Tokenizer):
    """The Plus fixture's tokenizer, callable like a HF tokenizer: pads on the right to the longest text, truncates
    to ``max_length`` (keeping the start), returns a `BatchFeature` with ``input_ids`` and ``attention_mask``."""

    def __call__(self, text, max_length=None, padding=True, truncation=False, return_tensors="pt", **kwargs):
        rows = [self.encode(t) for t in ([text] if isinstance(text, str) else text)]
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        width = max(map(len, rows))
        return BatchFeature({"input_ids": torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows]),
                             "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])})


def tiny_joyimage_edit_pipeline(seed=0):
    """A `JoyImageEditPipeline` with a small Wan 2.1 VAE (8x, z_dim 16), a 2-layer `JoyImageEditTransformer3DModel`
    (hidden 32, 2 heads, patch [1, 2, 2]: one token = 16x16 px) with random modulation tables, the fake Qwen3-VL
    encoder, processor and tokenizer, and `SmallJoyImageProcessor` sizing. Progress bar off."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,  # 3 downsamples = 8x, as Wan 2.1
        temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
        scale_factor_spatial=VAE_SCALE, dropout=0.0).eval()
    with torch.no_grad():  # the pipeline samples the posterior: make it ~deterministic and the means ~unit scale
        vae.quant_conv.weight[:Z_DIM] *= MEAN_GAIN
        vae.quant_conv.bias[:Z_DIM] *= MEAN_GAIN
        vae.quant_conv.weight[Z_DIM:] = 0.0
        vae.quant_conv.bias[Z_DIM:] = -30.0  # log-variance: std = exp(-15) ~ 3e-7
    transformer = with_random_modulation(JoyImageEditTransformer3DModel(
        patch_size=PATCH, in_channels=Z_DIM, hidden_size=HIDDEN, num_attention_heads=HEADS, text_dim=TEXT_DIM,
        num_layers=2, rope_dim_list=ROPE))
    pipe = JoyImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=FakeQwen3VL().eval(),
        tokenizer=FakeQwen2TokenizerCallable(), transformer=transformer.eval(), processor=FakeQwen3VLProcessor())
    pipe.vae_image_processor = SmallJoyImageProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_size(size=(64, 64)):
    """(height, width) of the latents of an image of ``size`` (width, height), snapped down to 16 pixels."""
    w, h = (max(PX_PER_TOKEN, s // PX_PER_TOKEN * PX_PER_TOKEN) for s in size)
    return h // VAE_SCALE, w // VAE_SCALE


def run(pipe, image=None, prompt="make it blue", num_inference_steps=2, guidance_scale=4.0, negative_prompt=None,
        generator_seed=0, **kwargs):
    """One pipeline call with ``output_type="latent"`` under `torch.no_grad()`; returns its ``.images``.

    That is already the target alone: the pipeline keeps the last item of its (B, num_items, C, T, H, W) latents, so
    the result is (B * num_images_per_prompt, 16, H/8, W/8) with (H, W) the reference's size snapped down to 16 px
    (see `latent_size`), or the given height/width, or 64x64. ``image``: one PIL image (shared by all prompts) or a
    list, one per prompt; None takes the text-only path (num_items = 1).

    The pipeline samples the reference's VAE posterior with the global RNG (``latent_dist.sample()``, no generator):
    the call runs under a forked RNG seeded with ``generator_seed``, so it is deterministic and leaves the global RNG
    as it was."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return pipe(image=image, prompt=prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                    generator=torch.Generator().manual_seed(generator_seed), output_type="latent", **kwargs).images
