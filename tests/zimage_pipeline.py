"""A tiny, offline ZImageOmniPipeline (diffusers 0.39 - 0.42.1): random-weight components built from configs, fp32, CPU.

Real classes with tiny configs, except the tokenizer:
- text encoder: a 2-layer `transformers.Qwen3Model` (hidden size 32). The pipeline reads `hidden_states[-2]` (the
  first layer's output here) at the unpadded positions of each prompt segment.
- `FakeQwen2Tokenizer` stands in for Qwen's tokenizer (a file). The pipeline writes the chat template itself (no
  `apply_chat_template`) and only calls the tokenizer: a list of segments, `padding="max_length"`,
  `max_length=max_sequence_length` (512), `truncation=True`, `return_tensors="pt"`; it reads `input_ids` and
  `attention_mask`. The fake splits text with a regex shaped like Qwen's BPE (`<|im_start|>` and the other special
  tokens whole, a word keeps its leading space, `\n` alone), hashes every other token into the vocabulary, pads on
  the right to `max_length` and truncates to it. With condition images each prompt is 2 + N segments (N = images):
  `<|im_start|>user\n<|vision_start|>`, N - 1 times `<|vision_end|><|vision_start|>`, the prompt's words and
  `<|im_start|>assistant\n<|vision_start|>`, and `<|vision_end|><|im_end|>`; without images it is one segment.
- VAE: a small `AutoencoderKL` shaped like Flux's (4 levels = 8x, 16 latent channels, no quant convs, Flux's
  scaling/shift factors). The pipeline encodes condition images as `vae.encode(image.bfloat16())`, which only works
  with a bf16 VAE; a forward pre-hook on `vae.encoder` casts its input to the VAE's dtype, so the fp32 VAE sees the
  bf16-rounded image, as the real pipeline's bf16 VAE does.
- SigLIP: a 1-layer `Siglip2VisionModel` (hidden size 16, patch 16, no pooling head) and a real
  `Siglip2ImageProcessor` (the Pil backend without torchvision) with `max_num_patches=16`: every image is rescaled
  (up or down) to at most 16 patches of 16x16 pixels, so SigLIP stays tiny whatever the image size (the real
  processor's 256 patches would upsample a 64x64 image to 256x256).
- transformer: `ZImageTransformer2DModel` with dim 32, 2 heads (head dim 16 = sum(AXES_DIMS)), 2 layers, 1 refiner
  layer per stream, `siglip_feat_dim` set (omni mode).

Sizes. A condition image is cropped to multiples of 16 pixels (`vae_scale_factor * 2`); the target takes the LAST
condition image's cropped size unless `height`/`width` are given (without images the pipeline's default is
1024x1024, so `run` defaults to 64x64). One transformer token is 16x16 pixels (VAE 8x, patch 2): a 64x64 image is a
4x4 token grid (16 x rows), 64x96 (h x w) is 4x6 (24 rows); each image's x rows are padded to a multiple of 32
(`SEQ_MULTI_OF`), so both take 32. SigLIP rows: 64x64 -> 4x4 = 16, 64x96 -> 3x5 = 15 (rescaled to 48x80), each padded
to 32; the target has no SigLIP features and gets 32 pad rows when there are condition images. Each caption segment
is padded to a multiple of 32 rows. So one sample with a 64x64 and a 64x96 image and a short prompt (segments of 4, 2,
10 and 2 tokens) is 4 * 32 = 128 caption rows, 3 * 32 = 96 x rows, 3 * 32 = 96 SigLIP rows: a 320-row unified
sequence (a 64x64 text-to-image sample: 32 + 32 = 64). The transformer gives samples of equal length no attention
mask: CFG's negative prompt "" pads to the same 32-row segments as a prompt segment of up to 32 tokens (the prompt's
words plus 7 template tokens with images, 8 without); a longer one adds 32 rows and a key padding mask for the
shorter samples. `run` returns the pipeline's output with `output_type="latent"`: the target
latents [B * num_images_per_prompt, 16, height / 8, width / 8] after the last scheduler step. CFG is on when
`guidance_scale > 0` (`do_classifier_free_guidance = guidance_scale > 0`; the default negative prompt is "") and off
at `guidance_scale=0.0`.
"""
import re
import zlib

import torch
from PIL import Image
from transformers import BatchEncoding, Qwen3Config, Qwen3Model
from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline, ZImageTransformer2DModel

LATENT_CHANNELS = 16  # the VAE's latent channels == the transformer's in_channels (4 * 16 == its X_PAD_DIM 64)
TEXT_DIM = 32  # the Qwen3 hidden size == the transformer's cap_feat_dim
SIGLIP_DIM = 16  # the SigLIP hidden size == the transformer's siglip_feat_dim
DIM, HEADS, AXES_DIMS, AXES_LENS = 32, 2, [4, 6, 6], [1024, 128, 128]  # head dim 16 = sum(AXES_DIMS)
SIGLIP_PATCH, SIGLIP_MAX_PATCHES = 16, 16
VAE_SCALE = 8
PX_PER_TOKEN = 2 * VAE_SCALE  # 16 pixels a side per transformer token (patch 2)
SEQ_MULTI_OF = 32  # the transformer pads every caption segment, image and SigLIP grid to a multiple of 32 rows
VOCAB = 1000
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
PAD_ID = SPECIAL.index("<|endoftext|>")


class FakeQwen2Tokenizer:
    pad_token = "<|endoftext|>"
    pad_token_id = PAD_ID
    padding_side = "right"
    _split = re.compile(r"<\|[a-z_]+\|>|\n| ?[A-Z]?[a-z]+| ?\w| ?(?!<\|)[^\w\s]|\s")

    def tokenize(self, text):
        return self._split.findall(text)

    def encode(self, text):
        return [SPECIAL.index(t) if t in SPECIAL else len(SPECIAL) + zlib.crc32(t.encode()) % (VOCAB - len(SPECIAL))
                for t in self.tokenize(text)]

    def __call__(self, text, padding="max_length", max_length=512, truncation=True, return_tensors="pt", **kwargs):
        text = [text] if isinstance(text, str) else text
        rows = [self.encode(t)[:max_length] if truncation else self.encode(t) for t in text]
        width = max_length if padding == "max_length" else max(map(len, rows))
        return BatchEncoding({
            "input_ids": torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])})


def _cast_to_weight_dtype(encoder, args):
    """The pipeline hands the VAE a bf16 image; cast it to the encoder's dtype."""
    return (args[0].to(encoder.conv_in.weight.dtype),) + tuple(args[1:])


def tiny_vae():
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=False)
    vae.encoder.register_forward_pre_hook(_cast_to_weight_dtype)
    return vae.eval()


def tiny_zimage_omni_pipeline(seed: int = 0) -> ZImageOmniPipeline:
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=VOCAB, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, pad_token_id=PAD_ID)).eval()
    siglip = Siglip2VisionModel(Siglip2VisionConfig(
        hidden_size=SIGLIP_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        patch_size=SIGLIP_PATCH, num_patches=SIGLIP_MAX_PATCHES, vision_use_head=False)).eval()
    siglip_processor = Siglip2ImageProcessor(patch_size=SIGLIP_PATCH, max_num_patches=SIGLIP_MAX_PATCHES)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=DIM, n_layers=2,
        n_refiner_layers=1, n_heads=HEADS, n_kv_heads=HEADS, cap_feat_dim=TEXT_DIM, siglip_feat_dim=SIGLIP_DIM,
        axes_dims=AXES_DIMS, axes_lens=AXES_LENS).eval()
    pipe = ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=text_encoder,
        tokenizer=FakeQwen2Tokenizer(), transformer=transformer, siglip=siglip, siglip_processor=siglip_processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(height: int = 64, width: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB image of ``height`` x ``width`` pixels: a seeded colour gradient plus noise."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height)[:, None, None]
    xs = torch.linspace(0, 1, width)[None, :, None]
    a, b, c = torch.rand(3, 1, 1, 3, generator=g)
    img = 255 * (a * ys + b * xs + c * ys * xs) / 2 + 64 * torch.rand(height, width, 3, generator=g)
    return Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy())


def tokens(height: int = 64, width: int = 64) -> int:
    """Latent tokens (transformer x rows, before padding) of an image of ``height`` x ``width`` pixels, cropped to
    multiples of 16 pixels."""
    return (height // PX_PER_TOKEN) * (width // PX_PER_TOKEN)


def padded(rows: int) -> int:
    """``rows`` padded to a multiple of 32, as the transformer pads every caption segment, image and SigLIP grid."""
    return rows + (-rows) % SEQ_MULTI_OF


def run(pipe, images=None, prompt="make it blue", num_inference_steps=2, guidance_scale=4.0, seed=0, **kwargs):
    """One pipeline call with ``output_type="latent"``; returns the target latents
    [B * num_images_per_prompt, 16, height / 8, width / 8]. ``images``: a PIL condition image or a list of them (None
    or [] for none; every prompt of a batch gets the same images). Without images the target defaults to 64x64
    pixels; with them, to the last image's size cropped to multiples of 16. CFG is on for ``guidance_scale > 0``."""
    images = [images] if isinstance(images, Image.Image) else list(images) if images else None
    if images is None:
        kwargs.setdefault("height", 64)
        kwargs.setdefault("width", 64)
    with torch.no_grad():
        return pipe(image=images, prompt=prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                    output_type="latent", **kwargs).images
