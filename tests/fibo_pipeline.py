"""A tiny, offline BriaFiboEditPipeline (diffusers 0.42.1): random-weight components built from configs, fp32, CPU.

The pipeline needs its text encoder (it takes no ``prompt_embeds``), so two small fakes stand in for the SmolLM3
tokenizer and model, faithful enough for the pipeline's own ``get_prompt_embeds`` to run unchanged:
- ``FakeTokenizer`` tokenizes with a regex and pads on the right to the longest prompt (with its attention mask);
- ``FakeSmolLM3`` embeds the tokens and returns ``hidden_states``: the embeddings and two layers of a causal running
  mean over the unpadded tokens (the pipeline joins the last two as the prompt embedding and hands every layer to
  the transformer's per-block text projections).

Sizes: the target follows the first reference's size (16 pixels per latent token: the Wan VAE's 16x, no patching);
``_auto_resize`` is off so the tests' small images are not snapped to the 1024² resolutions. The prompt must be an
edit JSON (``{"edit_instruction": ...}``); a negative prompt of another length pads the shorter prompt, which the
pipeline hands the transformer as a boolean key mask (``joint_attention_kwargs["attention_mask"]``).
"""
import json
import re
import zlib
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from diffusers import AutoencoderKLWan, BriaFiboEditPipeline, BriaFiboTransformer2DModel
from diffusers import FlowMatchEulerDiscreteScheduler

LATENT_CHANNELS = 16  # the Wan VAE's z_dim == the transformer's in_channels (no patching)
TEXT_DIM = 16  # the fake encoder's hidden size == the transformer's text_encoder_dim; joint_attention_dim is twice it
HEADS, HEAD_DIM, AXES = 2, 16, (4, 6, 6)
VOCAB = 1000
PAD_ID = 0
PX_PER_TOKEN = 16


class FakeTokenizer:
    pad_token_id = PAD_ID
    _split = re.compile(r"\w+|[^\w\s]")

    def _ids(self, text):
        return [1 + zlib.crc32(t.encode()) % (VOCAB - 1) for t in self._split.findall(text)]

    def __call__(self, prompts, padding="longest", max_length=None, truncation=True, add_special_tokens=True,
                 return_tensors="pt"):
        rows = [self._ids(p)[:max_length] for p in prompts]
        width = max(map(len, rows))
        return SimpleNamespace(input_ids=torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows]),
                               attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]))


class FakeSmolLM3(nn.Module):
    def __init__(self, dim=TEXT_DIM):
        super().__init__()
        self.embed_tokens = nn.Embedding(max(VOCAB, 128001), dim)  # (the pipeline's empty prompt: token 128000)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    dtype = property(lambda self: self.embed_tokens.weight.dtype)
    device = property(lambda self: self.embed_tokens.weight.device)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True):
        h = self.embed_tokens(input_ids)
        m = (torch.ones_like(input_ids) if attention_mask is None else attention_mask)[..., None].to(h.dtype)
        states = [h]
        for layer in self.layers:
            h = torch.tanh(layer(h + (h * m).cumsum(1) / m.cumsum(1).clamp(min=1)))  # causal context
            states.append(h)
        return SimpleNamespace(hidden_states=tuple(states), last_hidden_state=h)


def tiny_fibo_pipeline(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=16, decoder_base_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        z_dim=LATENT_CHANNELS, is_residual=True, latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS, dropout=0.0).eval()
    transformer = BriaFiboTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=2 * TEXT_DIM, text_encoder_dim=TEXT_DIM,
        axes_dims_rope=AXES).eval()
    pipe = BriaFiboEditPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                text_encoder=FakeSmolLM3().eval(), tokenizer=FakeTokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(size=(64, 64), seed=0):
    """A random RGB image of ``size`` (width, height)."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def tokens(size=(64, 64)):
    """Latent tokens of an image of ``size`` (width, height), a multiple of 16 pixels."""
    return (size[0] // PX_PER_TOKEN) * (size[1] // PX_PER_TOKEN)


def edit(instruction="make it blue"):
    return json.dumps({"edit_instruction": instruction})


def run(pipe, image=None, prompt=None, num_inference_steps=2, guidance_scale=5.0, negative_prompt="bad",
        generator_seed=0, **kwargs):
    """One pipeline call without snapping to the model's resolutions; returns the packed output latents
    [B, target tokens, 16]."""
    with torch.no_grad():
        return pipe(image=reference_image() if image is None else image, prompt=edit() if prompt is None else prompt,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(generator_seed),
                    output_type="latent", _auto_resize=False, **kwargs).images
