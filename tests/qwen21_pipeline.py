"""A tiny, offline QwenImage21Pipeline (diffusers 0.42.1): random-weight components built from configs, fp32, CPU.

No Qwen3-VL model or processor can be loaded offline, so two small fakes stand in for them. They are faithful enough
for the pipeline's own `_get_qwen_prompt_embeds` to run unchanged (chat template, left padding, system-prefix drop,
`image_pad_mask`):
- `FakeQwen3VLProcessor` tokenizes with a regex (special tokens get fixed ids) and, like Qwen3-VL (patch 16, merge 2),
  expands each `<|image_pad|>` into one slot per 32x32 pixel tile of its (already 32-aligned) image, i.e. one slot
  per 2x2 group of the 16x VAE's latent tokens. `pixel_values` holds each slot's mean colour (N_slots, 3).
- `FakeQwen3VLTextEncoder` embeds the tokens, adds a projection of the slot colours at image positions, mixes in a
  causal running mean, and ends with `model.language_model.norm` (which the pipeline neutralizes with a hook).

Sizes: 16 pixels per latent token; `output_resolution` (default here 64) sets both the target (from the LAST
condition image's aspect ratio) and every condition image's area, each rounded to multiples of 32 px.
E.g. a (128, 64) image -> 96x32 px -> 6x2 latents -> 3 VLM slots; (64, 64) -> 4x4 latents -> 4 slots.
"""
import re
import zlib
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                       QwenImage21Transformer2DModel)

Z_DIM = 4  # VAE latent channels == transformer in/out channels (latents are not patchified in 2.1)
TEXT_DIM = 32  # text-encoder hidden size == transformer context_in_dim
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
VOCAB = 1000
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
PAD_ID, IMAGE_PAD_ID = 0, SPECIAL.index("<|image_pad|>")
SLOT_PX = 32  # one VLM slot = 32x32 pixels = 2x2 latent tokens of 16x16 pixels
PADDING_TOKENS = 3  # trailing padding positions added by run(padded_prompt=True)


class FakeQwen3VLTokenizer:
    pad_token_id = PAD_ID
    _split = re.compile(r"<\|[a-z_]+\|>|\w+|\s|[^\w\s]")

    def encode(self, text):
        return [SPECIAL.index(t) if t in SPECIAL else len(SPECIAL) + zlib.crc32(t.encode()) % (VOCAB - len(SPECIAL))
                for t in self._split.findall(text)]


class FakeQwen3VLProcessor:
    tokenizer = FakeQwen3VLTokenizer()

    def apply_chat_template(self, messages, tokenize=True, return_dict=False):
        text = "".join(f"<|im_start|>{m['role']}\n" + "".join(c["text"] for c in m["content"]) + "<|im_end|>\n"
                       for m in messages)
        return [self.tokenizer.encode(text)] if tokenize else text

    def __call__(self, text, images=None, padding=True, padding_side="left", return_tensors="pt"):
        images = iter(images or [])
        rows, pixel_values, grids = [], [], []
        for prompt in text:
            ids = []
            for tok in self.tokenizer.encode(prompt):
                if tok != IMAGE_PAD_ID:
                    ids.append(tok)
                    continue
                img = next(images).convert("RGB")
                w, h = img.size
                assert w % SLOT_PX == 0 and h % SLOT_PX == 0, img.size
                tiles = img.resize((w // SLOT_PX, h // SLOT_PX), Image.BOX)  # mean colour of each 32x32 tile
                pixel_values.append(torch.tensor(np.asarray(tiles).reshape(-1, 3), dtype=torch.float32) / 127.5 - 1)
                grids.append([1, h // 16, w // 16])
                ids += [IMAGE_PAD_ID] * (w // SLOT_PX) * (h // SLOT_PX)
            rows.append(ids)
        length = max(map(len, rows))
        pad = [[PAD_ID] * (length - len(r)) for r in rows]
        data = {"input_ids": torch.tensor([p + r if padding_side == "left" else r + p for p, r in zip(pad, rows)]),
                "attention_mask": torch.tensor([[0] * len(p) + [1] * len(r) if padding_side == "left"
                                                else [1] * len(r) + [0] * len(p) for p, r in zip(pad, rows)])}
        if pixel_values:
            data.update(pixel_values=torch.cat(pixel_values), image_grid_thw=torch.tensor(grids))
        return BatchFeature(data)


class FakeQwen3VLTextEncoder(nn.Module):
    def __init__(self, dim=TEXT_DIM):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        self.model.language_model.embed_tokens = nn.Embedding(VOCAB, dim)
        self.model.language_model.norm = nn.RMSNorm(dim)
        self.vision_proj = nn.Linear(3, dim)

    dtype = property(lambda self: self.vision_proj.weight.dtype)
    device = property(lambda self: self.vision_proj.weight.device)

    def forward(self, input_ids, attention_mask, output_hidden_states=True, pixel_values=None, image_grid_thw=None):
        lm = self.model.language_model
        h = lm.embed_tokens(input_ids)
        if pixel_values is not None:
            is_image = input_ids == IMAGE_PAD_ID
            h[is_image] = h[is_image] + self.vision_proj(pixel_values.to(h.dtype))
        m = attention_mask[..., None].to(h.dtype)
        h = h + (h * m).cumsum(1) / m.cumsum(1).clamp(min=1)  # causal context
        # transformers 5.x: hidden_states[-1] is the normed last_hidden_state (the pipeline's hook undoes the norm)
        last = lm.norm(h)
        return SimpleNamespace(hidden_states=(lm.embed_tokens(input_ids), last), last_hidden_state=last)


def tiny_qwen21_pipeline(seed=0, causal_condition=True):
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,  # 4 downs = 16x
        temperal_downsample=[False, True, True, True], latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
    ).eval()
    transformer = QwenImage21Transformer2DModel(
        in_channels=Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        context_in_dim=TEXT_DIM, axes_dims_rope=AXES, causal_condition=causal_condition,
    ).eval()
    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=FakeQwen3VLTextEncoder().eval(),
        processor=FakeQwen3VLProcessor(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref_images(sizes, seed=0):
    """Random RGB images of the given (width, height) sizes."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


def _with_trailing_padding(encode, n):
    """Wrap `_get_qwen_prompt_embeds` so each prompt gets `n` padded (mask False) text positions at its end, as a
    shorter prompt of a batch gets. They hold garbage, not zeros, so a path that ignores the mask shows up."""
    def wrapped(*args, **kwargs):
        embeds, mask, image_pad_mask = encode(*args, **kwargs)
        b, d = embeds.shape[0], embeds.shape[2]
        garbage = torch.randn(b, n, d, generator=torch.Generator().manual_seed(123)).to(embeds)
        return (torch.cat([embeds, 10 * garbage], 1), torch.cat([mask, mask.new_zeros(b, n)], 1),
                torch.cat([image_pad_mask, image_pad_mask.new_zeros(b, n)], 1))
    return wrapped


def run(pipe, images, prompt="a cat", num_inference_steps=2, use_kv_cache=True, true_cfg_scale=1.0,
        negative_prompt=None, num_images_per_prompt=1, generator_seed=0, padded_prompt=False, output_resolution=64,
        **kwargs):
    """One pipeline call; returns the packed output latents [B * num_images_per_prompt, target tokens, Z_DIM]."""
    if padded_prompt:
        pipe._get_qwen_prompt_embeds = _with_trailing_padding(pipe._get_qwen_prompt_embeds, PADDING_TOKENS)
    try:
        return pipe(
            prompt=prompt, image=images, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt,
            generator=torch.Generator().manual_seed(generator_seed), output_type="latent",
            output_resolution=output_resolution, use_kv_cache=use_kv_cache, **kwargs,
        ).images
    finally:
        pipe.__dict__.pop("_get_qwen_prompt_embeds", None)
