"""A tiny, offline JoyImageEditPlusPipeline (diffusers 0.42.1): random-weight components built from configs, fp32, CPU.

No Qwen3-VL model or processor can be loaded offline, so two small fakes stand in for them. They are faithful enough
for the pipeline's own `encode_prompt_multiple_images` (hook on `text_encoder.model.language_model.layers[-1]`, drop
of the first 34 positions of the hidden states and of `attention_mask`) to run unchanged:
- `FakeQwen3VLProcessor` tokenizes with a regex shaped like Qwen's BPE (special tokens get fixed ids; a word keeps its
  leading space; camel case splits, so the system turn's ` \\nDescribe` is ` \\`, `n`, `Describe`). The system turn
  is 33 tokens, as with Qwen's tokenizer, so the pipeline's drop of 34 removes it and the user turn's
  `<|im_start|>`; every prompt keeps `user`, `\n`, its images and its words. Like Qwen3-VL (patch 16, merge 2) it
  expands each `<|image_pad|>` into one slot per 32x32 pixel tile, here ceil(w / 32) * ceil(h / 32) slots of the
  image as given (no min_pixels upscaling); `pixel_values` holds each slot's mean colour (N_slots, 3). It pads on
  the RIGHT to the longest prompt (the transformers default padding side), so a shorter prompt's trailing positions
  have mask 0 after the drop. It returns a `transformers.BatchFeature` (`.to(device)`, unpacks with `**`).
- `FakeQwen3VL` embeds the tokens, adds a projection of the slot colours at the image-pad positions (so the prompt
  embeddings depend on the reference images), runs `model.language_model.layers` (each a causal running mean over
  the unpadded tokens, then a linear layer and tanh) and a final `norm`; the pipeline reads the last layer's
  pre-norm output through its hook.

Sizes: the VAE is a small Wan 2.1 `AutoencoderKLWan` (8x spatial, z_dim 16) and the transformer patchifies latents
with patch_size [1, 2, 2], so one token is 16x16 pixels. The pipeline snaps every reference image to a 1024-base
bucket (>= 512 px a side), far too big for CPU tests, so `pipe.image_processor` is replaced by
`SmallJoyImageProcessor`, whose `get_default_height_width` returns the image's own (height, width) snapped DOWN to a
multiple of 16 px (the bucket snap's resize_center_crop then only crops). With no height/width the target takes the
last reference's snapped size. Output latents are the pipeline's 6-D padded patches [B, max_patches, 16, 1, 2, 2]:
per sample, the target's rows first, then each reference's, then padding up to the batch's longest sample. Only
the target rows are meaningful: with output_type="latent" the pipeline returns its latents after the last scheduler
step, which also moved the reference and padding rows (it restores the clean references only before decoding).
"""
import math
import re
import zlib
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

import diffusers
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.joyimage.image_processor import JoyImageEditImageProcessor

Z_DIM = 16  # the Wan 2.1 VAE's z_dim == the transformer's in_channels
TEXT_DIM = 32  # the fake encoder's hidden size == the transformer's text_dim
HIDDEN, HEADS, ROPE = 32, 2, [4, 6, 6]  # head dim 16 = sum(ROPE)
PATCH = [1, 2, 2]
VAE_SCALE = 8
PX_PER_TOKEN = VAE_SCALE * PATCH[1]  # 16 pixels a side per transformer token
SLOT_PX = 32  # one VLM image slot = 32x32 pixels (Qwen3-VL: patch 16, merge 2)
VOCAB = 1000
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
PAD_ID, IMAGE_PAD_ID = 0, SPECIAL.index("<|image_pad|>")


class FakeQwen2Tokenizer:
    pad_token_id = PAD_ID
    padding_side = "right"
    _split = re.compile(r"<\|[a-z_]+\|>|\n| ?[A-Z]?[a-z]+| ?\w| ?(?!<\|)[^\w\s]|\s")

    def tokenize(self, text):
        return self._split.findall(text)

    def encode(self, text):
        return [SPECIAL.index(t) if t in SPECIAL else len(SPECIAL) + zlib.crc32(t.encode()) % (VOCAB - len(SPECIAL))
                for t in self.tokenize(text)]


class FakeQwen3VLProcessor:
    tokenizer = FakeQwen2Tokenizer()

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        text = [text] if isinstance(text, str) else text
        images = iter(images or [])
        rows, pixel_values, grids = [], [], []
        for prompt in text:
            ids = []
            for tok in self.tokenizer.encode(prompt):
                if tok != IMAGE_PAD_ID:
                    ids.append(tok)
                    continue
                img = next(images).convert("RGB")
                gw, gh = math.ceil(img.width / SLOT_PX), math.ceil(img.height / SLOT_PX)
                tiles = img.resize((gw, gh), Image.BOX)  # mean colour of each ~32x32 tile
                pixel_values.append(torch.tensor(np.asarray(tiles).reshape(-1, 3), dtype=torch.float32) / 127.5 - 1)
                grids.append([1, 2 * gh, 2 * gw])
                ids += [IMAGE_PAD_ID] * (gw * gh)
            rows.append(ids)
        assert next(images, None) is None, "more images than <|image_pad|> tokens"
        width = max(map(len, rows))
        data = {"input_ids": torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}
        if pixel_values:
            data.update(pixel_values=torch.cat(pixel_values), image_grid_thw=torch.tensor(grids))
        return BatchFeature(data)


class FakeDecoderLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, mask):
        m = mask[..., None].to(h.dtype)
        return torch.tanh(self.proj(h + (h * m).cumsum(1) / m.cumsum(1).clamp(min=1)))  # causal context


class FakeQwen3VL(nn.Module):
    def __init__(self, dim=TEXT_DIM, num_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = lm = nn.Module()
        lm.embed_tokens = nn.Embedding(VOCAB, dim)
        lm.layers = nn.ModuleList(FakeDecoderLayer(dim) for _ in range(num_layers))
        lm.norm = nn.RMSNorm(dim)
        self.model.visual = nn.Linear(3, dim)  # slot colour -> embedding

    dtype = property(lambda self: self.model.visual.weight.dtype)
    device = property(lambda self: self.model.visual.weight.device)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, **kwargs):
        lm = self.model.language_model
        h = lm.embed_tokens(input_ids)
        if pixel_values is not None:
            is_image = input_ids == IMAGE_PAD_ID
            assert int(is_image.sum()) == pixel_values.shape[0], "image slots != pad tokens"
            h[is_image] = h[is_image] + self.model.visual(pixel_values.to(h.dtype))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for layer in lm.layers:
            h = layer(h, mask)
        return SimpleNamespace(last_hidden_state=lm.norm(h))


class SmallJoyImageProcessor(JoyImageEditImageProcessor):
    """JoyImage's processor without the 1024-base buckets: an image's own (height, width), snapped down to a
    multiple of 16 pixels (one transformer token), at least 16."""

    def get_default_height_width(self, image, height=None, width=None):
        if height is not None and width is not None:
            src_w, src_h = width, height
        elif image is None:
            src_w = src_h = 64
        elif isinstance(image, list):
            src_w, src_h = image[0].size
        else:
            src_w, src_h = image.size
        snap = PX_PER_TOKEN
        return max(snap, src_h // snap * snap), max(snap, src_w // snap * snap)


def with_random_modulation(transformer):
    """``transformer`` (a JoyImage model) with random modulation tables (diffusers initialises them to zeros), in
    eval mode."""
    with torch.no_grad():
        for block in transformer.double_blocks:
            for mod in (block.img_mod, block.txt_mod):
                mod.modulate_table.normal_(0, 0.1)
    return transformer.eval()


def tiny_joyimage_pipeline(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,  # 3 downsamples = 8x, as Wan 2.1
        temperal_downsample=[False, True, True], latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
        scale_factor_spatial=VAE_SCALE, dropout=0.0).eval()
    # (the Plus classes by attribute: diffusers 0.39 ships JoyImage-Edit only, whose fixture imports this module's
    # fakes)
    transformer = with_random_modulation(diffusers.JoyImageEditPlusTransformer3DModel(
        patch_size=PATCH, in_channels=Z_DIM, hidden_size=HIDDEN, num_attention_heads=HEADS, text_dim=TEXT_DIM,
        num_layers=2, rope_dim_list=ROPE))
    processor = FakeQwen3VLProcessor()
    pipe = diffusers.JoyImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=FakeQwen3VL().eval(),
        tokenizer=processor.tokenizer, transformer=transformer, processor=processor)
    pipe.image_processor = SmallJoyImageProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(size=(64, 64), seed=0):
    """A random RGB image of ``size`` (width, height)."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def tokens(size=(64, 64)):
    """Latent tokens (transformer rows) of an image of ``size`` (width, height), snapped down to 16 pixels."""
    return (size[0] // PX_PER_TOKEN) * (size[1] // PX_PER_TOKEN)


def target_rows(latents, n_target):
    """The target's rows of the pipeline's 6-D output: [B, n_target, C, pt, ph, pw]."""
    return latents[:, :n_target]


def run(pipe, images=None, prompt="make it blue", num_inference_steps=2, guidance_scale=4.0, negative_prompt=None,
        generator_seed=0, **kwargs):
    """One pipeline call; returns the output latents, the 6-D padded patches [B, max_patches, 16, 1, 2, 2] whose first
    ``tokens(target size)`` rows per sample are the target. ``images``: a list of lists of PIL images, one list per
    prompt (a flat list is one sample's references)."""
    with torch.no_grad():
        return pipe(images=images, prompt=prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                    generator=torch.Generator().manual_seed(generator_seed), output_type="latent", **kwargs).images
