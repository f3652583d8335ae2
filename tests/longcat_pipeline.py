"""A tiny, offline LongCatImageEditPipeline (diffusers 0.42.1): random-weight components built from configs, fp32, CPU.

The pipeline needs its text encoder (its ``encode_prompt`` fails on ``prompt_embeds`` without a ``prompt``), so
two small fakes stand in for the Qwen2.5-VL tokenizer and model, faithful enough for the pipeline's own
``_encode_prompt`` to run unchanged (template prefix cut at ``<|vision_start|>``, padding to
``tokenizer_max_length``, suffix cut):
- ``FakeQwen2Tokenizer`` tokenizes with a regex (special tokens get fixed ids) and pads on the right;
- ``FakeQwen25VLTextEncoder`` embeds the tokens, adds a projection of each merged 2x2 patch group of the real
  ``Qwen2VLImageProcessor``'s ``pixel_values`` at the image positions, and mixes in a causal running mean.

Sizes: the pipeline sizes the target and the reference as ``calculate_dimensions(1024 * 1024, aspect)``; the tests
shrink that area (``small_area``) to keep the sequences short: 16 pixels per latent token (8x VAE, 2x2 packing).
"""
import contextlib
import re
import zlib
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn
from transformers import BatchEncoding

try:  # (the PIL image processor, which needs no torchvision; what Qwen2VLImageProcessor falls back to without it)
    from transformers import Qwen2VLImageProcessorPil as Qwen2VLImageProcessor
except ImportError:
    from transformers import Qwen2VLImageProcessor

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImageEditPipeline
from diffusers import LongCatImageTransformer2DModel
from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as longcat_edit

LATENT_CHANNELS = 16  # the pipeline's fixed num_channels_latents
TEXT_DIM = 32  # text-encoder hidden size == transformer joint_attention_dim
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
VOCAB = 1000
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
PAD_ID, IMAGE_PAD_ID = 0, SPECIAL.index("<|image_pad|>")
TEXT_MAX_LENGTH = 6  # the pipeline's tokenizer_max_length (512) for the tests: the prompt padded to this length
PX_PER_TOKEN = 16
AREA = 64 * 64  # the tests' target area (the pipeline's 1024²): a 4x4-token target for a square reference


class FakeQwen2Tokenizer:
    pad_token_id = PAD_ID
    _split = re.compile(r"<\|[a-z_]+\|>|\w+|\s|[^\w\s]")

    def _ids(self, text):
        return [SPECIAL.index(t) if t in SPECIAL else len(SPECIAL) + zlib.crc32(t.encode()) % (VOCAB - len(SPECIAL))
                for t in self._split.findall(text)]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self._ids(text)}

    def convert_tokens_to_ids(self, token):
        return SPECIAL.index(token)

    def pad(self, encoded, max_length, padding="max_length", return_attention_mask=True, return_tensors="pt"):
        rows = encoded["input_ids"]
        return BatchEncoding({"input_ids": torch.tensor([r + [PAD_ID] * (max_length - len(r)) for r in rows]),
                              "attention_mask": torch.tensor([[1] * len(r) + [0] * (max_length - len(r))
                                                              for r in rows])})


class FakeQwen2VLProcessor:
    def __init__(self):
        self.image_processor = Qwen2VLImageProcessor()


class FakeQwen25VLTextEncoder(nn.Module):
    def __init__(self, dim=TEXT_DIM):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, dim)
        self.vision_proj = nn.Linear(3 * 2 * 14 * 14, dim)  # one patch of Qwen2VLImageProcessor's pixel_values

    dtype = property(lambda self: self.vision_proj.weight.dtype)
    device = property(lambda self: self.vision_proj.weight.device)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, output_hidden_states=True):
        h = self.embed_tokens(input_ids)
        if pixel_values is not None:
            is_image = input_ids == IMAGE_PAD_ID
            merged = pixel_values.to(h.dtype).unflatten(0, (-1, 4)).mean(1)  # one row per 2x2 merged patch group
            h[is_image] = h[is_image] + self.vision_proj(merged)
        m = attention_mask[..., None].to(h.dtype)
        h = h + (h * m).cumsum(1) / m.cumsum(1).clamp(min=1)  # causal context
        return SimpleNamespace(hidden_states=(self.embed_tokens(input_ids), h), last_hidden_state=h)


def tiny_longcat_pipeline(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=64, shift_factor=0.1, scaling_factor=0.5,
        mid_block_add_attention=False).eval()
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=AXES).eval()
    pipe = LongCatImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=FakeQwen25VLTextEncoder().eval(),
        tokenizer=FakeQwen2Tokenizer(), text_processor=FakeQwen2VLProcessor(), transformer=transformer)
    pipe.tokenizer_max_length = TEXT_MAX_LENGTH
    pipe.set_progress_bar_config(disable=True)
    return pipe


_CALCULATE_DIMENSIONS = longcat_edit.calculate_dimensions


@contextlib.contextmanager
def small_area(area=AREA):
    """The pipeline sizes target and reference to ``area`` pixels instead of 1024²."""
    original = _CALCULATE_DIMENSIONS

    def calculate(target_area, ratio):
        return original(area, ratio)

    longcat_edit.calculate_dimensions = calculate
    try:
        yield
    finally:
        longcat_edit.calculate_dimensions = original


def reference_image(size=(64, 64), seed=0):
    """A random RGB image of ``size`` (width, height)."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def tokens(size=(64, 64), area=AREA):
    """Latent tokens of the target (= of the reference: the pipeline gives both the same size) for a reference of
    ``size`` (width, height)."""
    w, h = _CALCULATE_DIMENSIONS(area, size[0] / size[1])
    return (w // PX_PER_TOKEN) * (h // PX_PER_TOKEN)


def run(pipe, image=None, prompt="a cat", num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=1,
        generator_seed=0, **kwargs):
    """One pipeline call at the tests' area; returns the packed output latents [B, target tokens, 64]."""
    with small_area(), torch.no_grad():
        return pipe(image=reference_image() if image is None else image, prompt=prompt,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    num_images_per_prompt=num_images_per_prompt,
                    generator=torch.Generator().manual_seed(generator_seed), output_type="latent", **kwargs).images
