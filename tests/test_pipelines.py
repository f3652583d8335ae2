"""Whole-pipeline calls of FluxKontextPipeline and QwenImageEditPlusPipeline under sparsectx.enable: tiny random-weight
components built from configs (fp32, CPU, offline). No text encoder, tokenizer or Qwen2.5-VL processor is built: the
prompts come as ``prompt_embeds`` (+ ``pooled_prompt_embeds`` for Flux, ``prompt_embeds_mask`` for Qwen), which
makes both pipelines skip them, so they are passed as None."""
import copy
import functools
import inspect
import math
import sys
import threading
import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # without it the Flux / Qwen pipelines are import placeholders
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_edit_plus  # noqa: E402

import sparsectx  # noqa: E402
from sparsectx import integration  # noqa: E402

HEADS, HEAD_DIM = 2, 16
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 6, 32, 16
PADDED_TEXT_TOKENS = 2  # Qwen prompts: the last tokens of the mask are padding
STEPS = 2
FP32_ATOL = 2e-5  # fp32 rounding of a different summation order
SEED = 0
REFERENCE_SEED = 2  # pixels of the reference images
CFG_SCALE = 2.0

# FLUX.1 Kontext: 4-level AutoencoderKL (8x) and 2x2 packing -> 16 pixels per token
KONTEXT = "kontext"
KONTEXT_PX_PER_TOKEN = 16
KONTEXT_LATENT_CHANNELS = 2
KONTEXT_TARGET_PX = 64  # 4x4 target tokens
KONTEXT_REF_SIZE = (96, 48)  # (width, height): 6x3 reference tokens (kept as given: _auto_resize=False)
KONTEXT_BUDGET = 0.5

# Qwen-Image-Edit-Plus: 3-level AutoencoderKLQwenImage (4x) and 2x2 packing -> 8 pixels per token
QWEN, QWEN_ZERO_COND = "qwen-edit-plus", "qwen-edit-plus-zero-cond-t"  # zero_cond_t: Qwen-Image-Edit-2511 style
QWEN_PX_PER_TOKEN = 8
QWEN_Z_DIM = 4
QWEN_TARGET_PX = 32  # 4x4 target tokens
QWEN_REF_SIZES = ((64, 64), (128, 64))  # (width, height): two references of different aspect ratios
# The pipeline resizes every reference to VAE_IMAGE_SIZE pixels of area (1024², 16k tokens each here); the tests
# shrink that module constant so that the two references stay small and of different sizes
QWEN_VAE_AREA = 64 * 64
QWEN_BUDGET = [0.25, 0.5]  # one ratio per reference image

FAMILIES = (KONTEXT, QWEN, QWEN_ZERO_COND)
PLAIN, CFG_BATCH = "plain", "cfg+2-images"  # one image without guidance; true CFG with num_images_per_prompt=2
MODES = (PLAIN, CFG_BATCH)


# ----------------------------------------------------------------------------------------------------------------
# tiny pipelines
# ----------------------------------------------------------------------------------------------------------------
def _kontext_pipeline():
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=KONTEXT_LATENT_CHANNELS, norm_num_groups=4, sample_size=KONTEXT_TARGET_PX,
        shift_factor=0.0, scaling_factor=1.0, mid_block_add_attention=False).eval()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * KONTEXT_LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    return diffusers.FluxKontextPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _qwen_pipeline(zero_cond_t):
    torch.manual_seed(SEED)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=QWEN_Z_DIM, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * QWEN_Z_DIM, latents_std=[1.0] * QWEN_Z_DIM).eval()
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * QWEN_Z_DIM, out_channels=QWEN_Z_DIM, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t).eval()
    return diffusers.QwenImageEditPlusPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        processor=None, transformer=transformer)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _pipeline(family):
    """A fresh tiny pipeline of ``family`` (Qwen's: with the ``pipe`` fixture's smaller reference area in effect)."""
    return _kontext_pipeline() if family == KONTEXT else _qwen_pipeline(zero_cond_t=family == QWEN_ZERO_COND)


@pytest.fixture
def pipe(family, monkeypatch):
    if family != KONTEXT:
        monkeypatch.setattr(qwen_edit_plus, "VAE_IMAGE_SIZE", QWEN_VAE_AREA)
    pipeline = _pipeline(family)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    sparsectx.disable(pipeline)


# ----------------------------------------------------------------------------------------------------------------
# inputs and expected token counts
# ----------------------------------------------------------------------------------------------------------------
def _images(sizes, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for w, h in sizes]


def _call_kwargs(family, mode):
    """Pipeline arguments: fixed noise, prompt embeddings instead of a text encoder, latents out."""
    g = torch.Generator().manual_seed(SEED + 1)
    kwargs = dict(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(SEED))
    embeds, negative = (torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g) for _ in range(2))
    if family == KONTEXT:
        kwargs.update(image=_images([KONTEXT_REF_SIZE], seed=REFERENCE_SEED)[0], prompt_embeds=embeds,
                      pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g), height=KONTEXT_TARGET_PX,
                      width=KONTEXT_TARGET_PX, max_area=KONTEXT_TARGET_PX ** 2, _auto_resize=False)
        negative_kwargs = dict(negative_prompt_embeds=negative,
                               negative_pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g))
    else:
        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        mask[:, -PADDED_TEXT_TOKENS:] = 0
        kwargs.update(image=_images(QWEN_REF_SIZES, seed=REFERENCE_SEED), prompt_embeds=embeds,
                      prompt_embeds_mask=mask, height=QWEN_TARGET_PX, width=QWEN_TARGET_PX)
        negative_kwargs = dict(negative_prompt_embeds=negative, negative_prompt_embeds_mask=mask.clone())
    if mode == CFG_BATCH:
        kwargs.update(negative_kwargs, true_cfg_scale=CFG_SCALE, num_images_per_prompt=2)
    else:
        kwargs.update(true_cfg_scale=1.0)  # Qwen's default (4.0) would warn without a negative prompt
    return kwargs


@pytest.mark.parametrize("mode", MODES)
def test_a_kontext_budget_of_zero_equals_the_call_without_the_reference(mode):
    """(docs/drop-in.md: a budget of 0 is the call without references where they reach the target through attention
    alone, bit for bit with native attention; Qwen-Image-Edit-Plus, whose text positions start past the largest grid,
    references included, is the documented exception.)"""
    pipeline = _pipeline(KONTEXT)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = _call_kwargs(KONTEXT, mode)
    with torch.no_grad():
        without = pipeline(**{k: v for k, v in kwargs.items() if k != "image"}).images
        assert not torch.equal(without, pipeline(**_call_kwargs(KONTEXT, mode)).images)  # (the reference matters)
        sparsectx.enable(pipeline, budget=0, selector="uniform")
        try:
            assert torch.equal(pipeline(**_call_kwargs(KONTEXT, mode)).images, without)
        finally:
            sparsectx.disable(pipeline)


def _target_tokens(family):
    px, per_token = (KONTEXT_TARGET_PX, KONTEXT_PX_PER_TOKEN) if family == KONTEXT else \
        (QWEN_TARGET_PX, QWEN_PX_PER_TOKEN)
    return (px // per_token) ** 2


def _reference_tokens(family):
    """Tokens per reference image as each pipeline resizes it: Kontext keeps the size (rounded down to whole
    tokens), Qwen-Image-Edit-Plus resizes every reference to a fixed area at its aspect ratio."""
    if family == KONTEXT:
        w, h = KONTEXT_REF_SIZE
        return [(w // KONTEXT_PX_PER_TOKEN) * (h // KONTEXT_PX_PER_TOKEN)]
    sizes = [qwen_edit_plus.calculate_dimensions(QWEN_VAE_AREA, w / h) for w, h in QWEN_REF_SIZES]
    return [(w // QWEN_PX_PER_TOKEN) * (h // QWEN_PX_PER_TOKEN) for w, h in sizes]


def _budget(family):
    return KONTEXT_BUDGET if family == KONTEXT else QWEN_BUDGET


def _kept_tokens(family):
    ratios = [KONTEXT_BUDGET] if family == KONTEXT else QWEN_BUDGET
    counts = [ratio * n for ratio, n in zip(ratios, _reference_tokens(family))]
    assert all(c == int(c) for c in counts), "choose budgets that keep whole tokens (no rounding rule involved)"
    return [int(c) for c in counts]


def _image_embedder(transformer):
    """The transformer's first layer on the image sequence: it sees the sequence the blocks run on."""
    return transformer.x_embedder if hasattr(transformer, "x_embedder") else transformer.img_in


def _run(pipe, family, mode):
    with torch.no_grad():
        return pipe(**_call_kwargs(family, mode)).images


# ----------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_keep_all_equals_unpatched_pipeline(pipe, family, mode):
    expected = _run(pipe, family, mode)
    sparsectx.enable(pipe, budget=1.0, selector="random", seed=SEED)
    torch.testing.assert_close(_run(pipe, family, mode), expected, rtol=0, atol=FP32_ATOL)


def _sparsectx_warnings(monkeypatch) -> list:
    """Every warning sparsectx gives from now on (each goes through sparsectx._warn, which names the user's line:
    its file does not tell sparsectx's warnings from diffusers')."""
    import types

    from sparsectx import _warn

    given = []
    monkeypatch.setattr(_warn, "warnings", types.SimpleNamespace(warn=lambda message, *args, **kw: given.append(
        message)))
    return given


@pytest.mark.parametrize("attention", ["native", "sparsectx"])
def test_a_normal_call_warns_nothing(pipe, family, attention, monkeypatch):
    """An enabled pipeline's call with classifier-free guidance, keeping all tokens and keeping some, gives no
    warning of sparsectx's (a warning on the normal path would repeat in every user's log)."""
    given = _sparsectx_warnings(monkeypatch)
    for budget in (1.0, _budget(family)):
        sparsectx.enable(pipe, budget=budget, selector="random", seed=SEED, attention=attention)
        _run(pipe, family, CFG_BATCH)
    sparsectx.disable(pipe)
    assert given == []


@pytest.mark.parametrize("mode", MODES)
def test_disable_restores_bit_exact(pipe, family, mode):
    original_class = type(pipe)
    expected = _run(pipe, family, mode)
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    sparse = _run(pipe, family, mode)
    assert sparse.shape == expected.shape
    assert not torch.allclose(sparse, expected, rtol=0, atol=FP32_ATOL)  # the dropped tokens did matter
    sparsectx.disable(pipe)
    assert type(pipe) is original_class and "forward" not in pipe.transformer.__dict__
    assert torch.equal(_run(pipe, family, mode), expected)


def test_context_on_a_pipeline_whose_transformer_was_enabled_alone(pipe, family):
    """The pipeline's class is swapped for the block only: after it, the transformer runs with its own settings
    again, and the pipeline is the plain class it was (selection per prompt tensor, as before the block)."""
    original_class = type(pipe)
    sparsectx.enable(pipe.transformer, budget=_budget(family), selector="uniform")
    settings = pipe.transformer._sparsectx_patch.settings
    with sparsectx.sparse_context(pipe, budget=1.0, selector="random", seed=SEED):
        assert type(pipe) is not original_class
    assert type(pipe) is original_class and pipe.transformer._sparsectx_patch.settings is settings
    sparsectx.disable(pipe.transformer)


@pytest.mark.parametrize("then", ["disable", "enable"])
def test_transformer_replaced_after_enable(pipe, family, then):
    """``pipe.transformer = other`` after ``enable(pipe)``: the call warns that it runs every token (the new
    transformer is not enabled); disabling or enabling the pipeline again restores the replaced transformer (its
    forward and processors), and enabling makes the new one sparse."""
    new_transformer = (_kontext_pipeline() if family == KONTEXT else
                       _qwen_pipeline(zero_cond_t=family == QWEN_ZERO_COND)).transformer  # the same weights
    expected = _run(pipe, family, PLAIN)
    old = pipe.transformer
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED, attention="sparsectx")
    sparse = _run(pipe, family, PLAIN)
    pipe.transformer = new_transformer
    with pytest.warns(RuntimeWarning, match="transformer was replaced since sparsectx.enable"):
        assert torch.equal(_run(pipe, family, PLAIN), expected)
    if then == "disable":
        sparsectx.disable(pipe)
    else:
        sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED, attention="sparsectx")
        torch.testing.assert_close(_run(pipe, family, PLAIN), sparse, rtol=0, atol=FP32_ATOL)
    assert not sparsectx.integration.is_enabled(old) and "forward" not in old.__dict__
    assert not any(isinstance(m.processor, sparsectx.processors.SPARSECTX_PROCESSORS) for m in old.modules()
                   if hasattr(m, "set_processor"))
    sparsectx.disable(pipe)
    assert torch.equal(_run(pipe, family, PLAIN), expected)


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
@pytest.mark.parametrize("held", [None, "a module"])
def test_disable_of_a_pipeline_whose_transformer_is_gone(pipe, family, held):
    """``pipe.transformer = None`` (or something no transformer) after ``enable(pipe)``: disable(pipe) raised the
    unsupported-class TypeError and left the pipeline's class and the patched transformer as they were. It now
    undoes both; a pipeline enable never touched still gets the TypeError."""
    old, original_class = pipe.transformer, type(pipe)
    sparsectx.enable(pipe, budget=_budget(family), attention="sparsectx")
    pipe.transformer = None if held is None else torch.nn.Linear(2, 2)
    sparsectx.disable(pipe)
    assert type(pipe) is original_class and not sparsectx.integration.is_enabled(old)
    assert "forward" not in old.__dict__
    with pytest.raises(TypeError, match="sparsectx supports the pipelines"):
        sparsectx.disable(pipe)  # (nothing of enable's left)
    pipe.transformer = old


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sparse_context_restores_the_replaced_transformers_patch(pipe, family):
    """``enable(pipe)``, then ``pipe.transformer = other``: a ``sparse_context(pipe)`` block (its enable undoes the
    replaced transformer's patch) left it disabled and the pipeline's class the original; the state of the block's
    start now comes back, the replaced transformer's settings and processor objects included."""
    new_transformer = _kontext_pipeline().transformer
    old = pipe.transformer
    sparsectx.enable(pipe, budget=_budget(family), selector="uniform", attention="sparsectx")
    settings = old._sparsectx_patch.settings
    processors = [m.processor for m in old.modules() if hasattr(m, "set_processor")]
    sparse_class = type(pipe)
    pipe.transformer = new_transformer
    with sparsectx.sparse_context(pipe, budget=0.5):
        assert not sparsectx.integration.is_enabled(old) and sparsectx.integration.is_enabled(new_transformer)
    assert sparsectx.integration.is_enabled(old) and old._sparsectx_patch.settings is settings
    assert [m.processor for m in old.modules() if hasattr(m, "set_processor")] == processors
    assert not sparsectx.integration.is_enabled(new_transformer) and type(pipe) is sparse_class
    pipe.transformer = old
    sparsectx.disable(pipe)
    assert not sparsectx.integration.is_enabled(old)


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sparse_context_disables_a_transformer_put_in_and_enabled_inside_the_block(pipe, family):
    """A pipeline not enabled; inside a restored_state block its transformer is replaced and the pipeline enabled:
    on exit the new transformer is disabled again (the block's state at its start), while a transformer enabled
    before the block and put in inside it keeps its patch."""
    old = pipe.transformer
    for enabled_before in (False, True):
        other = _kontext_pipeline().transformer
        if enabled_before:
            sparsectx.enable(other, budget=0.25)
        with sparsectx.integration.restored_state(pipe):
            pipe.transformer = other
            if not enabled_before:
                sparsectx.enable(pipe, budget=0.5)
        assert sparsectx.integration.is_enabled(other) == enabled_before, enabled_before
        assert ("forward" in other.__dict__) == enabled_before
        sparsectx.disable(other)
        pipe.transformer = old
    assert not hasattr(type(pipe), "_sparsectx_base")


def test_disable_of_a_pipeline_forgets_its_transformer(pipe, family):
    """After enable(pipe) and disable(pipe) (or a sparse_context(pipe) block), the transformer enabled directly and
    then replaced in the pipeline is not the pipeline's to disable (before, disable(pipe) uninstalled it); a
    pipeline still enabled whose transformer was disabled (e.g. through another pipeline sharing it) warns that it
    runs every reference token."""
    old = pipe.transformer
    new_transformer = (_kontext_pipeline() if family == KONTEXT else
                       _qwen_pipeline(zero_cond_t=family == QWEN_ZERO_COND)).transformer
    for forget in ("disable", "sparse_context"):
        if forget == "disable":
            sparsectx.enable(pipe, budget=_budget(family))
            sparsectx.disable(pipe)
        else:
            with sparsectx.sparse_context(pipe, budget=_budget(family)):
                pass
        sparsectx.enable(old, budget=_budget(family))
        pipe.transformer = new_transformer
        sparsectx.disable(pipe)
        assert sparsectx.integration.is_enabled(old), forget
        sparsectx.disable(old)
        pipe.transformer = old
    sparsectx.enable(pipe, budget=_budget(family))
    sparsectx.disable(pipe.transformer)
    with pytest.warns(RuntimeWarning, match="its transformer no longer is"):
        _run(pipe, family, PLAIN)
    sparsectx.disable(pipe)


def test_seedless_random_selection_follows_the_call_generator(pipe, family):
    """enable(selector="random") without a seed: a call given a generator selects with that generator's initial
    seed, so the same generator seed gives the same selection and images, another seed another selection, and the
    global RNG is not drawn from (before, the selection drew from it and the generator did not reproduce the call)."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random")
    runs = []
    for seed in (SEED, SEED, SEED + 7):
        kwargs = {**_call_kwargs(family, PLAIN), "generator": torch.Generator().manual_seed(seed)}
        torch.manual_seed(123)
        with torch.no_grad():
            images = pipe(**kwargs).images
        global_draw = torch.rand(1)  # what the global RNG gives next: unchanged when the call drew nothing from it
        runs.append((images, sparsectx.last_selection(pipe).keep.clone(), global_draw))
    torch.manual_seed(123)
    untouched = torch.rand(1)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert all(torch.equal(draw, untouched) for _, _, draw in runs)


def test_calls_from_two_threads_on_one_transformer_run_one_after_the_other(pipe, family):
    """Two threads, each with its own pipeline sharing the enabled transformer (``from_pipe`` with its own
    scheduler: diffusers' pattern for concurrent requests), call at once with other generator seeds: the second call
    starts once the first has ended, and each call's latents equal its call alone (before: their steps
    interleaved, each call's start dropped the other's selection, and a call selected with the other's seed:
    latents off by 2e-3 without an error)."""
    import copy
    import threading

    sparsectx.enable(pipe, budget=_budget(family), selector="random")  # no seed: each call's generator's

    def call(p, seed, **extra):
        with torch.no_grad():
            return p(**{**_call_kwargs(family, PLAIN), "generator": torch.Generator().manual_seed(seed)},
                     **extra).images

    alone = {seed: call(pipe, seed) for seed in (1, 2)}
    first_stepping, second_started, overlapped, results = threading.Event(), threading.Event(), [], {}

    def wait_at_first_step(p, step, timestep, tensors):
        if step == 0:
            first_stepping.set()
            overlapped.append(second_started.wait(2.0))  # the second call would have started by now
        return tensors

    def run(seed, first):
        p = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
        if not first:  # (check_inputs: the first thing a call does)
            check = p.check_inputs
            p.check_inputs = lambda *args, **kwargs: (second_started.set(), check(*args, **kwargs))[1]
        results[seed] = call(p, seed, **({"callback_on_step_end": wait_at_first_step} if first else {}))

    threads = [threading.Thread(target=run, args=(1, True)), threading.Thread(target=run, args=(2, False))]
    threads[0].start()
    assert first_stepping.wait(60)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert overlapped == [False]
    for seed in (1, 2):
        assert torch.equal(results[seed], alone[seed]), seed


def test_a_threads_sparse_context_block_disable_and_last_selection_keep_to_its_own_calls(pipe, family):
    """A server with a default (enable) whose threads each wrap their calls in sparse_context, on pipelines sharing
    the transformer: thread B entering its block (or disabling) while A's call runs waits for A's block to exit
    (before: A's call switched to B's budget halfway, B's ran with the default, and after both blocks the
    transformer stayed on A's budget; a disable mid-call left a call that matched neither); last_selection of A's
    pipeline is A's call's after B's call (before: B's)."""
    import copy
    import threading

    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    pa, pb = (type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler)) for _ in range(2))

    def call(p, **extra):
        with torch.no_grad():
            return p(**_call_kwargs(family, PLAIN), **extra).images

    with sparsectx.sparse_context(pipe, budget=0.25, selector="uniform"):
        alone_a = call(pipe)
        kept_a = int(sparsectx.last_selection(pipe).keep.sum())
    with sparsectx.sparse_context(pipe, budget=1.0, selector="uniform"):
        alone_b = call(pipe)
    default = call(pipe)
    entered, kept, results = threading.Event(), [], {}

    def b_block():
        with sparsectx.sparse_context(pb, budget=1.0, selector="uniform"):
            entered.set()
            results["b"] = call(pb)

    thread = threading.Thread(target=b_block)

    def at_each_step(p, step, timestep, tensors):
        if step == 0:
            thread.start()
            kept.append(entered.wait(1.0))  # B's block would have begun by now
        kept.append(int(sparsectx.last_selection(p).keep.sum()))
        return tensors

    with sparsectx.sparse_context(pa, budget=0.25, selector="uniform"):
        results["a"] = call(pa, callback_on_step_end=at_each_step)
    thread.join()
    assert kept[0] is False and set(kept[1:]) == {kept_a}
    assert torch.equal(results["a"], alone_a) and torch.equal(results["b"], alone_b)
    assert int(sparsectx.last_selection(pa).keep.sum()) == kept_a  # (B's call, keeping every token, came after)
    assert int(sparsectx.last_selection(pb).keep.sum()) > kept_a
    assert torch.equal(call(pipe), default)  # the default is back
    # a disable from another thread while a call runs: it waits, and the call ends as it started (sparse)
    disabled = threading.Event()
    stopper = threading.Thread(target=lambda: (sparsectx.disable(pipe), disabled.set()))

    def disable_at_first_step(p, step, timestep, tensors):
        if step == 0:
            stopper.start()
            kept.append(disabled.wait(1.0))
        return tensors

    assert torch.equal(call(pa, callback_on_step_end=disable_at_first_step), default)
    stopper.join()
    assert kept[-1] is False and not sparsectx.integration.is_enabled(pipe)


def test_last_selection_of_a_pipeline_is_its_own_calls(pipe, family):
    """last_selection(pipe) of an enabled pipeline: its own call's, also after a call of another pipeline sharing
    the transformer ran inside its step callback (it was that call's); None after enabling again, before a call;
    a pipeline back in the plain class reads the transformer's latest call (it kept its old record)."""
    import copy

    sparsectx.enable(pipe, budget=0.25, selector="uniform")
    pristine = copy.deepcopy(pipe.scheduler)
    other = None

    def call(p, **extra):
        with torch.no_grad():
            p(**_call_kwargs(family, PLAIN), **extra)

    call(pipe)
    own = int(sparsectx.last_selection(pipe).keep.sum())

    def nested(p, step, timestep, tensors):  # (at every step: the last one's nested call ends after its forwards)
        nonlocal other
        other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pristine))
        name = "joint_attention_kwargs" if family == KONTEXT else "attention_kwargs"
        call(other, **{name: {"sparsectx": {"budget": 1.0}}})
        return tensors

    call(pipe, callback_on_step_end=nested)
    everything = int(sparsectx.last_selection(other).keep.sum())
    assert everything > own and int(sparsectx.last_selection(pipe).keep.sum()) == own
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    assert sparsectx.last_selection(pipe) is None
    sparsectx.disable(pipe)
    sparsectx.enable(pipe.transformer, budget=1.0, selector="uniform")
    call(pipe)
    assert int(sparsectx.last_selection(pipe).keep.sum()) == everything
    sparsectx.disable(pipe.transformer)


def test_per_image_generators_select_each_image_as_it_would_alone(pipe, family):
    """A call given one generator per image (diffusers' per-image seeds) selects each image's reference tokens with
    its own generator's seed: image b of the batch keeps, and makes, what a call of that image alone with generator
    b keeps and makes (before, every image of the batch was selected with the first generator's seed)."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random")
    seeds = (SEED, SEED + 7)
    kwargs = {**_call_kwargs(family, PLAIN), "num_images_per_prompt": 2,
              "generator": [torch.Generator().manual_seed(s) for s in seeds]}
    with torch.no_grad():
        batched = pipe(**kwargs).images
    keep = sparsectx.last_selection(pipe).keep.clone()
    assert keep.shape[0] == 2 and not torch.equal(keep[0], keep[1])
    for b, seed in enumerate(seeds):
        with torch.no_grad():
            alone = pipe(**{**_call_kwargs(family, PLAIN), "generator": torch.Generator().manual_seed(seed)}).images
        assert torch.equal(sparsectx.last_selection(pipe).keep[0], keep[b])
        torch.testing.assert_close(alone[0], batched[b])


def test_pipeline_pickles_after_its_transformer_is_disabled_alone(pipe, family):
    """enable(pipe) then disable(pipe.transformer): the pipeline (its class still sparsectx's subclass, which now
    runs the plain call) pickles and unpickles; with the transformer enabled, pickling raises the documented
    TypeError; a deep copy stays enabled and distinct."""
    import copy
    import pickle

    sparsectx.enable(pipe, budget=_budget(family), selector="uniform")
    with pytest.raises(TypeError, match="disable"):
        pickle.dumps(pipe)
    clone = copy.deepcopy(pipe)
    assert sparsectx.integration.is_enabled(clone) and clone.transformer is not pipe.transformer
    sparsectx.disable(clone)
    assert sparsectx.integration.is_enabled(pipe)
    sparsectx.disable(pipe.transformer)
    restored = pickle.loads(pickle.dumps(pipe))
    assert type(restored).__name__ == type(pipe).__name__ and not sparsectx.integration.is_enabled(restored)
    assert torch.equal(_run(restored, family, PLAIN), _run(pipe, family, PLAIN))
    sparsectx.disable(pipe)


def test_a_pickled_pipeline_loads_in_a_process_that_never_enabled_one(tmp_path):
    """A pipeline pickled in its sparsectx class (its transformer disabled alone) loads in a fresh process, where
    sparsectx.integration has no attribute of that class's name (before: AttributeError "Can't get attribute
    '_Sparse_..._FluxKontextPipeline'"); it loads in that class, its transformer not enabled."""
    import pickle
    import subprocess
    import sys

    pipe = _kontext_pipeline()
    sparsectx.enable(pipe, budget=0.5, selector="uniform")
    sparsectx.disable(pipe.transformer)
    try:
        (tmp_path / "pipe.pkl").write_bytes(pickle.dumps(pipe))
    finally:
        sparsectx.disable(pipe)
    load = ("import pickle, sys; pipe = pickle.load(open(sys.argv[1], 'rb')); import sparsectx; "
            "print(type(pipe).__module__, type(pipe).__name__, type(pipe)._sparsectx_base.__name__, "
            "sparsectx.integration.is_enabled(pipe.transformer))")
    run = subprocess.run([sys.executable, "-c", load, str(tmp_path / "pipe.pkl")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["sparsectx.integration", "FluxKontextPipeline", "FluxKontextPipeline", "False"]


class _KeyMaskedNative:
    """Test-only: diffusers' native attention backend with the dropped reference tokens masked out as keys. The
    joint sequence is [text, image] in both families; ``image_keep`` (bool [1, S_image]) is shared by the batch."""

    def __init__(self, image_keep):
        self.image_keep = image_keep
        self.native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        batch, n_keys = key.shape[:2]
        n_text = n_keys - self.image_keep.shape[1]
        text = torch.ones(1, n_text, dtype=torch.bool, device=key.device)
        key_mask = torch.cat([text, self.image_keep.to(key.device)], 1).expand(batch, -1)[:, None, None, :]
        if attn_mask is not None:  # the padded prompt tokens stay masked too
            key_mask = key_mask & attn_mask.bool()
        return self.native(query, key, value, attn_mask=key_mask, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_pipeline_equals_masking_dropped_keys(pipe, family, mode, monkeypatch):
    """Dropping the unselected reference rows (sparsectx) == keeping them and masking them as keys in every
    attention layer, over the whole denoising loop (positions, RoPE and modulation of the kept tokens are right)."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    sparse = _run(pipe, family, mode)
    keep = pipe.transformer._sparsectx_patch.cache.keep  # the same seeded selection at every call
    assert torch.equal(keep, keep[:1].expand_as(keep))  # shared by the images of the batch
    assert not bool(keep.all())  # reference tokens were dropped
    sparsectx.disable(pipe)

    image_keep = torch.cat([torch.ones(1, _target_tokens(family), dtype=torch.bool), keep[:1]], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE,
                        _KeyMaskedNative(image_keep))
    torch.testing.assert_close(sparse, _run(pipe, family, mode), rtol=0, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------------------------------
# what reaches the transformer
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_transformer_sees_target_plus_kept_tokens(pipe, family, mode):
    selections = []

    def counting_random(latents, context):
        selections.append((tuple(latents.shape[:2]), list(context.ref_lengths)))
        return torch.rand(latents.shape[:2], generator=context.generator)

    calls = 2  # a second call with the same references must select again
    branches = 2 if mode == CFG_BATCH else 1  # cond (+ uncond) forward per step
    images = 2 if mode == CFG_BATCH else 1
    full, compacted = [], []
    handles = [
        # the transformer's own pre-hook sees the pipeline's input: target + every reference token
        pipe.transformer.register_forward_pre_hook(
            lambda mod, args, kwargs: full.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True),
        # inside the transformer, the blocks' input: target + kept tokens
        _image_embedder(pipe.transformer).register_forward_pre_hook(
            lambda mod, args: compacted.append(tuple(args[0].shape[:2]))),
    ]
    sparsectx.enable(pipe, budget=_budget(family), selector=counting_random, seed=SEED)
    try:
        for _ in range(calls):
            latents = _run(pipe, family, mode)
    finally:
        for handle in handles:
            handle.remove()

    n_target, n_refs, n_kept = _target_tokens(family), _reference_tokens(family), _kept_tokens(family)
    if family != KONTEXT:  # Qwen: two references of different token counts, each keeping its own budget
        assert len(set(n_refs)) == len(n_refs) == 2 and all(0 < k < n for k, n in zip(n_kept, n_refs))
    forwards = calls * STEPS * branches
    assert full == [(images, n_target + sum(n_refs))] * forwards
    assert compacted == [(images, n_target + sum(n_kept))] * forwards  # the batch runs as one group
    # one selection per pipeline call, on one copy of the references shared by the images and the CFG branch
    assert selections == [((1, sum(n_refs)), n_refs)] * calls
    assert latents.shape[:2] == (images, n_target)


def _runs_and_image_tokens(pipe, family, mode, calls):
    """The outputs of ``calls`` pipeline calls and the image token count of every transformer forward."""
    seen = []
    handle = _image_embedder(pipe.transformer).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[1]))
    try:
        return [_run(pipe, family, mode) for _ in range(calls)], seen
    finally:
        handle.remove()


@pytest.mark.parametrize("offload_first", [True, False], ids=["offload_then_enable", "enable_then_offload"])
def test_model_cpu_offload_in_either_order_compacts_every_call(pipe, family, offload_first):
    """enable_model_cpu_offload (accelerate hooks, removed and added anew by the pipeline after each call) before
    or after enable: every call compacts (before: with offload first, only the first call did, then sparsectx was
    silently gone and disable raised), and disable gives the offloaded original back, bit-exact."""
    pytest.importorskip("accelerate")
    mode = MODES[0]
    expected = _run(pipe, family, mode)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    sparse, compacted = _runs_and_image_tokens(pipe, family, mode, 3)
    n_kept = _target_tokens(family) + sum(_kept_tokens(family))
    assert set(compacted) == {n_kept} and len(compacted) % 3 == 0
    assert torch.equal(sparse[0], sparse[2]) and not torch.allclose(sparse[0], expected, rtol=0, atol=FP32_ATOL)
    sparsectx.disable(pipe)
    assert not sparsectx.integration.is_enabled(pipe)
    assert torch.equal(_run(pipe, family, mode), expected)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("offload_first", [True, False], ids=["offload_then_enable", "enable_then_offload"])
def test_group_offloading_in_either_order(pipe, family, offload_type, offload_first):
    """diffusers' group offloading of the transformer (its hooks on the blocks or the leaf modules), before or after
    enable: keeping every token equals the unpatched pipeline, every call compacts, and disable gives the offloaded
    original back, bit-exact (the README's claim, untested before)."""
    mode = MODES[0]
    expected = _run(pipe, family, mode)

    def offload():
        cpu = torch.device("cpu")
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                                              **({"num_blocks_per_group": 1} if offload_type == "block_level" else {}))

    if offload_first:
        offload()
    sparsectx.enable(pipe, budget=1.0)
    if not offload_first:
        offload()
    torch.testing.assert_close(_run(pipe, family, mode), expected, rtol=0, atol=FP32_ATOL)
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    sparse, compacted = _runs_and_image_tokens(pipe, family, mode, 2)
    assert set(compacted) == {_target_tokens(family) + sum(_kept_tokens(family))}
    assert torch.equal(sparse[0], sparse[1]) and not torch.allclose(sparse[0], expected, rtol=0, atol=FP32_ATOL)
    sparsectx.disable(pipe)
    assert torch.equal(_run(pipe, family, mode), expected)


@pytest.mark.parametrize("cast_first, attention", [(True, "native"), (False, "sparsectx")],
                         ids=["cast_then_enable-native", "enable_then_cast-sparsectx"])
def test_layerwise_casting_in_either_order(pipe, family, cast_first, attention):
    """diffusers' layerwise casting (weights stored in fp8, each layer's cast to the compute dtype by a hook as it
    runs), before or after enable: keeping every token equals the cast, unpatched pipeline; random and
    attention-probe selections compact (the probe's projections run through the casting hooks: a processor reading
    fp8 weights itself would fail or differ); disable gives the cast original back, bit-exact."""
    mode = MODES[0]

    def cast():
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

    if cast_first:
        cast()
        sparsectx.enable(pipe, budget=1.0, attention=attention)
    else:
        sparsectx.enable(pipe, budget=1.0, attention=attention)
        cast()
    kept_all = _run(pipe, family, mode)
    sparsectx.disable(pipe)
    expected = _run(pipe, family, mode)
    assert not torch.allclose(expected, _run(_pipeline(family), family, mode), rtol=0, atol=FP32_ATOL)  # cast weights
    torch.testing.assert_close(kept_all, expected, rtol=0, atol=FP32_ATOL)
    n_kept = _target_tokens(family) + sum(_kept_tokens(family))
    for selector in ("random", "attention"):
        sparsectx.enable(pipe, budget=_budget(family), selector=selector, seed=SEED, attention=attention)
        sparse, compacted = _runs_and_image_tokens(pipe, family, mode, 2)
        # (the attention probe's stopped forward sees every token)
        probe_tokens = {_target_tokens(family) + sum(_reference_tokens(family))} if selector == "attention" else set()
        assert set(compacted) == {n_kept} | probe_tokens and compacted[-1] == n_kept
        assert torch.equal(sparse[0], sparse[1]) and not torch.allclose(sparse[0], expected, rtol=0, atol=FP32_ATOL)
        sparsectx.disable(pipe)
    assert torch.equal(_run(pipe, family, mode), expected)


def test_per_call_settings_through_the_pipelines_own_attention_kwargs(pipe, family):
    """The per-call form goes through each pipeline's own keyword (FluxKontextPipeline: joint_attention_kwargs,
    Qwen-Image-Edit-Plus and FLUX.2: attention_kwargs) and overrides enable's settings for that call only."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    seen = []
    handle = _image_embedder(pipe.transformer).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[1]))
    name = "joint_attention_kwargs" if family == KONTEXT else "attention_kwargs"
    try:
        with torch.no_grad():
            pipe(**_call_kwargs(family, PLAIN), **{name: {"sparsectx": {"budget": 1.0}}})
            per_call = list(seen)
            seen.clear()
            pipe(**_call_kwargs(family, PLAIN))
    finally:
        handle.remove()
    n_target = _target_tokens(family)
    assert per_call == [n_target + sum(_reference_tokens(family))] * STEPS
    assert seen == [n_target + sum(_kept_tokens(family))] * STEPS  # enable's budget again on the next call


def test_a_pipeline_not_enabled_called_inside_a_call_with_per_call_settings_keeps_enables(pipe, family):
    """A pipeline sharing the enabled transformer but not enabled itself (``from_pipe``), called from a step
    callback of an enabled pipeline's call given per-call settings: its forwards run enable's settings, the outer
    call's steps its own."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    other = type(pipe)._sparsectx_base.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    other.set_progress_bar_config(disable=True)
    seen, inner = [], []
    handle = _image_embedder(pipe.transformer).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[1]))
    name = "joint_attention_kwargs" if family == KONTEXT else "attention_kwargs"

    def nested(pipeline, step, timestep, outputs):
        if step == 0:
            start = len(seen)
            other(**_call_kwargs(family, PLAIN))
            inner.extend(seen[start:])
            del seen[start:]
        return outputs

    try:
        with torch.no_grad():
            pipe(**_call_kwargs(family, PLAIN), **{name: {"sparsectx": {"budget": 1.0}}},
                 callback_on_step_end=nested)
    finally:
        handle.remove()
    n_target = _target_tokens(family)
    assert inner == [n_target + sum(_kept_tokens(family))] * STEPS
    assert seen == [n_target + sum(_reference_tokens(family))] * STEPS


def _counting_attention(selections: list):
    """The ``attention`` selector, recording each selection it makes."""
    def selector(latents, context):
        selections.append(tuple(latents.shape))
        return sparsectx.selection.attention_scores(latents, context)

    return selector


def test_an_enabled_pipeline_called_inside_an_enabled_call_leaves_the_outer_selection(pipe, family):
    """Two enabled pipelines sharing the transformer, the second called from a step callback of the first's call
    (another prompt, another seed): the outer call's later steps keep its own selection (before: the inner call
    dropped the outer's plans, and the outer selected again, on a later step's latents), so the two calls select
    once each and the outer's output and last_selection equal those of the outer call alone."""
    other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    other.set_progress_bar_config(disable=True)
    selections = []
    sparsectx.enable(other, budget=_budget(family), selector=_counting_attention(selections))
    sparsectx.enable(pipe, budget=_budget(family), selector=_counting_attention(selections))
    with torch.no_grad():
        alone = pipe(**_call_kwargs(family, CFG_BATCH)).images
    alone_keep = sparsectx.last_selection(pipe).keep.clone()
    assert len(selections) == 1

    def inner():  # (a fresh generator at each call)
        kwargs = {**_call_kwargs(family, PLAIN), "generator": torch.Generator().manual_seed(SEED + 5)}
        return {**kwargs, "prompt_embeds": kwargs["prompt_embeds"] + 1.0}

    with torch.no_grad():
        inner_alone = other(**inner()).images
    inner_keep = sparsectx.last_selection(other).keep.clone()
    selections.clear()
    seen_inside = []

    def nested(pipeline, step, timestep, outputs):
        if step == 0:
            seen_inside.append(torch.equal(other(**inner()).images, inner_alone))
            seen_inside.append(torch.equal(sparsectx.last_selection(other).keep, inner_keep))  # the inner call's
        return outputs

    with torch.no_grad():
        outer = pipe(**_call_kwargs(family, CFG_BATCH), callback_on_step_end=nested).images
    assert len(selections) == 2  # the outer call's and the inner call's
    assert seen_inside == [True, True]
    assert torch.equal(sparsectx.last_selection(pipe).keep, alone_keep)
    assert torch.equal(outer, alone)


def test_a_pipeline_not_enabled_called_inside_an_enabled_call_selects_on_its_own_prompt(pipe, family):
    """A pipeline sharing the enabled transformer, not enabled, called inside an enabled call with inputs of the
    same shapes and another prompt: its forwards select as a bare transformer's (on their own prompt tensors), so it
    equals its call alone, and the outer call equals its own (before: it reused the outer call's selection, made on
    the outer prompt's probe)."""
    other = type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))
    other.set_progress_bar_config(disable=True)
    sparsectx.enable(pipe, budget=_budget(family), selector="attention")

    def inner():  # (a fresh generator at each call)
        kwargs = {**_call_kwargs(family, CFG_BATCH), "generator": torch.Generator().manual_seed(SEED + 5)}
        return {**kwargs, "prompt_embeds": 3.0 * kwargs["prompt_embeds"] + 1.0}

    with torch.no_grad():
        outer_alone = pipe(**_call_kwargs(family, CFG_BATCH)).images
        inner_alone = other(**inner()).images
    inside = []

    def nested(pipeline, step, timestep, outputs):
        if step == 0:
            inside.append(other(**inner()).images)
        return outputs

    with torch.no_grad():
        outer = pipe(**_call_kwargs(family, CFG_BATCH), callback_on_step_end=nested).images
    assert torch.equal(inside[0], inner_alone)
    assert torch.equal(outer, outer_alone)


def test_a_copy_of_the_transformer_taken_during_a_call_is_outside_it(pipe, family):
    """``copy.deepcopy`` of the enabled transformer in a step callback of a call with per-call settings (e.g. an EMA
    snapshot): the copy runs enable's settings in later calls, not that call's, and is not inside a pipeline call."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    copies = []
    name = "joint_attention_kwargs" if family == KONTEXT else "attention_kwargs"

    def snapshot(pipeline, step, timestep, outputs):
        if step == 0:
            copies.append(copy.deepcopy(pipeline.transformer))
        return outputs

    with torch.no_grad():
        pipe(**_call_kwargs(family, PLAIN), **{name: {"sparsectx": {"budget": 1.0}}}, callback_on_step_end=snapshot)
    patch = copies[0]._sparsectx_patch
    assert (patch.pipeline_calls, patch.call_overrides, patch.call_seed) == (0, None, None)
    other = type(pipe)._sparsectx_base.from_pipe(pipe, transformer=copies[0],
                                                 scheduler=copy.deepcopy(pipe.scheduler))
    other.set_progress_bar_config(disable=True)
    seen = []
    _image_embedder(copies[0]).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        other(**_call_kwargs(family, PLAIN))
    assert seen == [_target_tokens(family) + sum(_kept_tokens(family))] * STEPS


@pytest.mark.parametrize("settings, error, words", [({"budget": 2.0}, ValueError, r"budget ratio must be in \[0, 1\]"),
                                                   ({"selector": "nope"}, ValueError, "nope")])
def test_bad_per_call_settings_fail_before_the_pipelines_own_work(pipe, family, settings, error, words):
    """A bad per-call setting fails at the start of the pipeline call, before its encoders run, naming the keyword
    it came through (before: after the VAE and text encoders, which on real models take seconds, in enable's words)."""
    sparsectx.enable(pipe, budget=_budget(family), selector="random", seed=SEED)
    name = "joint_attention_kwargs" if family == KONTEXT else "attention_kwargs"
    ran = []
    handles = [module.register_forward_pre_hook(lambda *_: ran.append(1)) for module in pipe.vae.modules()]
    try:
        with pytest.raises(error, match=rf"^{name}\['sparsectx'\].*: .*{words}"):
            pipe(**_call_kwargs(family, PLAIN), **{name: {"sparsectx": settings}})
    finally:
        for handle in handles:
            handle.remove()
    assert ran == []


# ----------------------------------------------------------------------------------------------------------------
# inpainting pipelines: their reference images ride in the sequence as in the edit pipelines
# ----------------------------------------------------------------------------------------------------------------
INPAINT_PX = 64  # the image to inpaint (and the target), square
INPAINT_BUDGET = 0.25  # of each reference (Kontext: KONTEXT_BUDGET), chosen to keep whole tokens
KLEIN_PX_PER_TOKEN = 16  # tests/test_integration.py's tiny FLUX.2 klein VAE: 3 levels and 2x2 packing
INPAINT_PIPELINES = ("FluxKontextInpaintPipeline", "Flux2KleinInpaintPipeline", "QwenImageEditInpaintPipeline")


def _klein_helpers():
    """tests/test_integration.py, where the tiny FLUX.2 klein pipeline and its reference images are defined."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_integration_helpers",
                                                  Path(__file__).with_name("test_integration.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inpaint_mask():
    from PIL import Image

    return Image.fromarray(((torch.arange(INPAINT_PX) > INPAINT_PX // 2).to(torch.uint8) * 255)
                           .expand(INPAINT_PX, INPAINT_PX).contiguous().numpy())


def _inpaint_case(name, monkeypatch):
    """(pipeline, call arguments, target tokens, tokens per reference image, budget) of a tiny inpainting
    pipeline, or of FLUX.2 [dev]'s or Qwen-Image-Edit's pipeline."""
    g = torch.Generator().manual_seed(SEED + 1)
    image = _images([(INPAINT_PX, INPAINT_PX)], seed=REFERENCE_SEED + 1)[0]
    kwargs = dict(image=image, mask_image=_inpaint_mask(), strength=1.0, num_inference_steps=STEPS,
                  output_type="latent", height=INPAINT_PX, width=INPAINT_PX)
    if name == "FluxKontextInpaintPipeline":
        base = _kontext_pipeline()
        pipe = diffusers.FluxKontextInpaintPipeline(**base.components)
        kwargs.update(image_reference=_images([KONTEXT_REF_SIZE], seed=REFERENCE_SEED)[0], _auto_resize=False,
                      prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
                      pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g))
        return pipe, kwargs, (INPAINT_PX // KONTEXT_PX_PER_TOKEN) ** 2, _reference_tokens(KONTEXT), KONTEXT_BUDGET
    if name == "Flux2KleinInpaintPipeline":
        klein = _klein_helpers()
        pipe = klein._tiny_pipeline(diffusers.Flux2KleinInpaintPipeline)
        embeds = torch.randn(1, klein.TEXT_TOKENS, klein.TEXT_DIM, generator=g)
        kwargs.update(image_reference=klein._reference_images(), prompt_embeds=embeds,
                      negative_prompt_embeds=torch.zeros_like(embeds), guidance_scale=CFG_SCALE)
        # the references: the source image (the target's size) first, then image_reference's, each resized to the
        # first one's size
        n_target = (INPAINT_PX // KLEIN_PX_PER_TOKEN) ** 2
        first_w, first_h = klein.REF_SIZES[0]
        refs = [n_target] + [(first_w // KLEIN_PX_PER_TOKEN) * (first_h // KLEIN_PX_PER_TOKEN)] * len(klein.REF_SIZES)
        return pipe, kwargs, n_target, refs, INPAINT_BUDGET
    if name == "Flux2Pipeline":  # FLUX.2 [dev]: guidance embedded, references as for klein
        klein = _klein_helpers()
        torch.manual_seed(0)
        transformer = diffusers.Flux2Transformer2DModel.from_config(
            {**klein._build_model("flux2").config, "guidance_embeds": True}).eval()
        pipe = diffusers.Flux2Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                       vae=klein._tiny_pipeline(diffusers.Flux2KleinPipeline).vae, text_encoder=None,
                                       tokenizer=None, transformer=transformer)
        kwargs = dict(image=klein._reference_images(), num_inference_steps=STEPS, output_type="latent",
                      height=INPAINT_PX, width=INPAINT_PX, guidance_scale=CFG_SCALE,
                      prompt_embeds=torch.randn(1, klein.TEXT_TOKENS, klein.TEXT_DIM, generator=g))
        refs = [(w // KLEIN_PX_PER_TOKEN) * (h // KLEIN_PX_PER_TOKEN) for w, h in klein.REF_SIZES]
        return pipe, kwargs, (INPAINT_PX // KLEIN_PX_PER_TOKEN) ** 2, refs, INPAINT_BUDGET
    # Qwen-Image-Edit (inpainting or not): the image is the reference too, resized to a fixed area (shrunk here, as
    # VAE_IMAGE_SIZE for the edit-plus tests), and the target takes the reference's size
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as qwen_edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as qwen_inpaint

    module = qwen_inpaint if name == "QwenImageEditInpaintPipeline" else qwen_edit
    full_size = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: full_size(QWEN_VAE_AREA, ratio))
    pipe = getattr(diffusers, name)(**_qwen_pipeline(zero_cond_t=name == "QwenImageEditPipeline").components)
    if name == "QwenImageEditPipeline":  # (with zero_cond_t: its modulate_index is truncated too)
        kwargs = dict(image=image, num_inference_steps=STEPS, output_type="latent", height=INPAINT_PX,
                      width=INPAINT_PX)
    kwargs.update(prompt_embeds=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g),
                  prompt_embeds_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long), true_cfg_scale=1.0)
    width, height, _ = full_size(QWEN_VAE_AREA, 1.0)
    n_tokens = (width // QWEN_PX_PER_TOKEN) * (height // QWEN_PX_PER_TOKEN)
    return pipe, kwargs, n_tokens, [n_tokens], INPAINT_BUDGET


@pytest.mark.parametrize("name", INPAINT_PIPELINES + ("Flux2Pipeline", "QwenImageEditPipeline"))
def test_inpainting_and_other_pipelines(name, monkeypatch):
    """The inpainting variants of the three families (each also given a reference image), FLUX.2 [dev]'s pipeline
    and Qwen-Image-Edit's (one reference): keeping every token equals the unpatched pipeline, a budget sends
    target + kept tokens to the transformer and equals masking the dropped tokens as keys, disable is bit-exact."""
    pipe, kwargs, n_target, n_refs, budget = _inpaint_case(name, monkeypatch)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    _image_embedder(pipe.transformer).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))

    def run():
        seen.clear()
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(SEED)).images

    expected = run()
    forwards = len(seen)
    assert forwards >= STEPS and seen == [n_target + sum(n_refs)] * forwards
    sparsectx.enable(pipe, budget=1.0)
    torch.testing.assert_close(run(), expected, rtol=0, atol=FP32_ATOL)
    sparsectx.enable(pipe, budget=budget, selector="random", seed=SEED)
    sparse = run()
    assert sparsectx.last_selection(pipe).ref_lengths == n_refs  # each reference image as the pipeline lays it out
    kept = [round(budget * n) for n in n_refs]
    assert all(k == budget * n for k, n in zip(kept, n_refs))  # budgets that keep whole tokens
    assert seen == [n_target + sum(kept)] * forwards
    assert sparse.shape == expected.shape and torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, expected, rtol=0, atol=FP32_ATOL)
    keep = pipe.transformer._sparsectx_patch.cache.keep  # the same seeded selection at every call
    assert torch.equal(keep, keep[:1].expand_as(keep)) and not bool(keep.all())
    sparsectx.disable(pipe)
    assert torch.equal(run(), expected)
    # dropping the rows == keeping them and masking them as keys in every attention layer (positions, RoPE and
    # modulation of the kept tokens are right in the inpainting layouts too)
    image_keep = torch.cat([torch.ones(1, n_target, dtype=torch.bool), keep[:1]], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(image_keep))
    torch.testing.assert_close(run(), sparse, rtol=0, atol=FP32_ATOL)


# ----------------------------------------------------------------------------------------------------------------
# modular pipelines (diffusers.modular_pipelines): the same components run by blocks
# ----------------------------------------------------------------------------------------------------------------
MODULAR_BLOCKS = ("FluxKontextAutoBlocks", "Flux2KleinBaseAutoBlocks", "QwenImageEditPlusAutoBlocks")
MODULAR_KLEIN_BUDGET = 0.25  # of each reference, chosen to keep whole tokens


def _modular_case(blocks_name, monkeypatch):
    """(pipeline built from the blocks without their text encoder, call arguments, target tokens, tokens per
    reference image, budget, transformer forwards per step)."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    if not hasattr(modular, blocks_name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {blocks_name}")
    g = torch.Generator().manual_seed(SEED + 1)
    embeds, negative = (torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g) for _ in range(2))
    kwargs = dict(prompt_embeds=embeds, num_inference_steps=STEPS, output="latents")
    if blocks_name == "FluxKontextAutoBlocks":
        components = _kontext_pipeline().components
        kwargs.update(image=_images([KONTEXT_REF_SIZE], seed=REFERENCE_SEED)[0], height=KONTEXT_TARGET_PX,
                      width=KONTEXT_TARGET_PX, max_area=KONTEXT_TARGET_PX ** 2, _auto_resize=False,
                      pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=g))
        case = (_target_tokens(KONTEXT), _reference_tokens(KONTEXT), KONTEXT_BUDGET, 1)
    elif blocks_name == "Flux2KleinBaseAutoBlocks":  # with a negative prompt: the guider runs two forwards a step
        klein = _klein_helpers()
        components = klein._tiny_pipeline(diffusers.Flux2KleinPipeline).components
        kwargs.update(image=klein._reference_images(), negative_prompt_embeds=negative, height=klein.IMAGE_PX,
                      width=klein.IMAGE_PX)
        refs = [(w // KLEIN_PX_PER_TOKEN) * (h // KLEIN_PX_PER_TOKEN) for w, h in klein.REF_SIZES]
        case = ((klein.IMAGE_PX // KLEIN_PX_PER_TOKEN) ** 2, refs, MODULAR_KLEIN_BUDGET, 2)
    else:  # the blocks resize every reference to a fixed area: shrunk as VAE_IMAGE_SIZE for the pipeline tests
        from diffusers.modular_pipelines.qwenimage import encoders

        full_size = encoders.calculate_dimensions
        monkeypatch.setattr(encoders, "calculate_dimensions", lambda area, ratio: full_size(QWEN_VAE_AREA, ratio))
        components = _qwen_pipeline(zero_cond_t=True).components
        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        mask[:, -PADDED_TEXT_TOKENS:] = 0
        kwargs.update(image=_images(QWEN_REF_SIZES, seed=REFERENCE_SEED), prompt_embeds_mask=mask,
                      negative_prompt_embeds=negative, negative_prompt_embeds_mask=mask.clone(),
                      height=QWEN_TARGET_PX, width=QWEN_TARGET_PX)
        case = (_target_tokens(QWEN), _reference_tokens(QWEN), QWEN_BUDGET, 2)
    blocks = getattr(modular, blocks_name)()
    blocks.sub_blocks.pop("text_encoder")  # the prompts come as embeddings
    pipe = blocks.init_pipeline()
    pipe.update_components(**{name: components[name] for name in ("vae", "transformer", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return (pipe, kwargs, *case)


def _counting_selector(selections: list):
    """A selector of seeded random scores that appends each selection's reference lengths to ``selections``."""
    def counting(latents, context):
        selections.append(list(context.ref_lengths))
        return torch.rand(latents.shape[:2], generator=context.generator)

    return counting


@pytest.mark.parametrize("enabled", ["pipeline", "transformer"])
@pytest.mark.parametrize("blocks_name", MODULAR_BLOCKS)
def test_modular_pipelines(blocks_name, enabled, monkeypatch):
    """diffusers' modular pipelines of the three families, enabled as a pipeline or through their transformer:
    keeping every token equals the unpatched pipeline, a budget sends target + kept tokens to the transformer (a
    pipeline selects once per call, its guidance branches sharing the selection; a transformer once per prompt
    tensor) and equals masking the dropped tokens as keys, disable is bit-exact and restores the pipeline's class."""
    pipe, kwargs, n_target, n_refs, budget, per_step = _modular_case(blocks_name, monkeypatch)
    ratios = budget if isinstance(budget, list) else [budget] * len(n_refs)
    kept = [round(ratio * n) for ratio, n in zip(ratios, n_refs)]
    assert all(k == ratio * n for k, ratio, n in zip(kept, ratios, n_refs))  # budgets that keep whole tokens
    seen, selections = [], []
    counting = _counting_selector(selections)
    _image_embedder(pipe.transformer).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))

    def run():
        seen.clear()
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(SEED))

    original_class = type(pipe)
    expected = run()
    assert seen == [n_target + sum(n_refs)] * (STEPS * per_step)
    target = pipe if enabled == "pipeline" else pipe.transformer
    sparsectx.enable(target, budget=1.0)
    torch.testing.assert_close(run(), expected, rtol=0, atol=FP32_ATOL)
    sparsectx.enable(target, budget=budget, selector=counting, seed=SEED)
    try:
        sparse = run()
        keep = pipe.transformer._sparsectx_patch.cache.keep
    finally:
        sparsectx.disable(target)
    assert seen == [n_target + sum(kept)] * (STEPS * per_step)
    assert selections == [n_refs] * (1 if enabled == "pipeline" else per_step)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, expected, rtol=0, atol=FP32_ATOL)
    assert type(pipe) is original_class and "forward" not in pipe.transformer.__dict__
    assert torch.equal(run(), expected)
    # dropping the rows == masking them as keys (every selection of the call drew the same seeded scores)
    assert torch.equal(keep, keep[:1].expand_as(keep)) and not bool(keep.all())
    image_keep = torch.cat([torch.ones(1, n_target, dtype=torch.bool), keep[:1]], 1)
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, _KeyMaskedNative(image_keep))
    torch.testing.assert_close(run(), sparse, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("blocks_name", MODULAR_BLOCKS)
def test_per_call_settings_replace_the_keyword_in_a_given_pipeline_state(blocks_name, monkeypatch):
    """A modular pipeline called with a ``PipelineState`` that holds attention kwargs (e.g. a LoRA scale) and the
    keyword with per-call settings: the keyword replaces the state's value, as diffusers does with any keyword
    (before the fix of this session's first version: the keyword was dropped and the state's stale value won)."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    pipe, kwargs, *_ = _modular_case(blocks_name, monkeypatch)
    name = integration._ATTN_KWARGS_ARG[integration._family_of(pipe.transformer)]
    got = []
    pipe.transformer.register_forward_pre_hook(lambda mod, args, kw: got.append(kw.get(name)), with_kwargs=True)
    sparsectx.enable(pipe, budget=0.5, seed=SEED)
    state = modular.PipelineState()
    state.set(name, {"scale": 0.5})
    with torch.no_grad():
        pipe(state=state, **kwargs, **{name: {"sparsectx": {"budget": 1.0}}},
             generator=torch.Generator().manual_seed(SEED))
    assert got and all(value == {"sparsectx": {"budget": 1.0}} for value in got)


@pytest.mark.parametrize("blocks_name", MODULAR_BLOCKS)
def test_modular_pipelines_take_per_call_settings_under_the_transformers_keyword(blocks_name, monkeypatch):
    """Modular pipelines hand their blocks' joint_attention_kwargs / attention_kwargs to the transformer under its
    own keyword (FLUX.2's is joint_attention_kwargs, where FLUX.2's pipelines take attention_kwargs): sparsectx
    checked the FLUX.2 pipelines' keyword, which the modular blocks ignore, and a bad value under the one they
    use failed mid-loop, after the encoders, naming a keyword the caller had not used."""
    pipe, kwargs, n_target, n_refs, budget, per_step = _modular_case(blocks_name, monkeypatch)
    name = "attention_kwargs" if blocks_name.startswith("Qwen") else "joint_attention_kwargs"
    seen = []
    _image_embedder(pipe.transformer).register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    sparsectx.enable(pipe, budget=budget, seed=SEED)
    try:
        with torch.no_grad():
            pipe(**kwargs, **{name: {"sparsectx": {"budget": 1.0}}}, generator=torch.Generator().manual_seed(SEED))
        assert seen == [n_target + sum(n_refs)] * (STEPS * per_step)  # the per-call budget, not enable's
        seen.clear()
        with pytest.raises(ValueError, match=rf"^{name}\['sparsectx'\]: budget ratio"):
            pipe(**kwargs, **{name: {"sparsectx": {"budget": 2.0}}}, generator=torch.Generator().manual_seed(SEED))
        assert seen == []  # refused before the pipeline's own work
    finally:
        sparsectx.disable(pipe)


def test_a_pipeline_subclass_handing_kwargs_on_takes_its_bases_keyword():
    """A subclass whose __call__ takes **kwargs and calls its base's: the base's keyword (FLUX.2's attention_kwargs),
    not the transformer's, which such a __call__ does not name."""
    class MyKlein(diffusers.Flux2KleinPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    assert integration._pipeline_attn_kwarg(MyKlein, integration.FLUX2) == "attention_kwargs"
    assert integration._pipeline_attn_kwarg(diffusers.FluxKontextPipeline, integration.FLUX) == "joint_attention_kwargs"
    modular = pytest.importorskip("diffusers.modular_pipelines")
    assert integration._pipeline_attn_kwarg(modular.ModularPipeline, integration.FLUX2) == "joint_attention_kwargs"
    assert integration._pipeline_attn_kwarg(modular.ModularPipeline, integration.QWEN) == "attention_kwargs"


@pytest.mark.parametrize("blocks_name", MODULAR_BLOCKS)
def test_a_components_manager_sub_pipeline_sharing_an_enabled_transformer(blocks_name, monkeypatch):
    """A second pipeline of the same blocks sharing the enabled pipeline's transformer through a ComponentsManager:
    not enabled itself, it selects as a bare transformer does (once per prompt tensor: its guider's two branches
    twice) and makes the enabled pipeline's output; enabled itself, once per call; disabling it disables the shared
    transformer, and the first pipeline then warns that it runs every token and equals the unpatched pipeline."""
    modular = pytest.importorskip("diffusers.modular_pipelines")
    pipe, kwargs, n_target, n_refs, budget, per_step = _modular_case(blocks_name, monkeypatch)
    manager = modular.ComponentsManager()
    manager.add("transformer", pipe.transformer)
    blocks = getattr(modular, blocks_name)()
    blocks.sub_blocks.pop("text_encoder")
    sub = blocks.init_pipeline(components_manager=manager)
    sub.update_components(transformer=manager.get_one(name="transformer"), vae=pipe.vae, scheduler=pipe.scheduler)
    sub.set_progress_bar_config(disable=True)
    assert sub.transformer is pipe.transformer
    selections = []
    counting = _counting_selector(selections)

    def run(which):
        with torch.no_grad():
            return which(**kwargs, generator=torch.Generator().manual_seed(SEED))

    expected = run(pipe)
    sparsectx.enable(pipe, budget=budget, selector=counting, seed=SEED)
    try:
        sparse = run(pipe)
        assert selections == [n_refs] and not torch.allclose(sparse, expected, rtol=0, atol=FP32_ATOL)
        selections.clear()
        assert torch.equal(run(sub), sparse) and selections == [n_refs] * per_step  # as a bare transformer
        selections.clear()
        sparsectx.enable(sub, budget=budget, selector=counting, seed=SEED)
        assert torch.equal(run(sub), sparse) and selections == [n_refs]
        sparsectx.disable(sub)
        with pytest.warns(RuntimeWarning, match="its transformer no longer is"):
            assert torch.equal(run(pipe), expected)
    finally:
        sparsectx.disable(pipe)
        sparsectx.disable(sub)
    assert torch.equal(run(pipe), expected) and torch.equal(run(sub), expected)


# ----------------------------------------------------------------------------------------------------------------
# budget sweep (sparsectx.sweep)
# ----------------------------------------------------------------------------------------------------------------
def _sweep_kwargs(family, output_type="pt"):
    """One plain call's arguments without the generator (the sweep seeds every call with SEED itself)."""
    kwargs = _call_kwargs(family, PLAIN)
    del kwargs["generator"]
    kwargs["output_type"] = output_type
    return kwargs


def _seeded_call(pipe, kwargs):
    """The call's images (or what a modular pipeline returns for its ``output``), seeded as the sweep seeds it."""
    with torch.no_grad():
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(SEED))
    return getattr(out, "images", out)


def _transformer_forwards(pipe) -> list:
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_sweep_compares_each_setting_with_the_unpatched_call(pipe, family, output_type):
    """Row 0 is the unpatched call, each other row the call under sparse_context with that setting (the same
    outputs, bit for bit), and the metrics are those of the outputs against row 0's."""
    kwargs = _sweep_kwargs(family, output_type)
    unpatched = _seeded_call(pipe, kwargs)
    with sparsectx.sparse_context(pipe, budget=_budget(family), selector="uniform"):
        sparse = _seeded_call(pipe, kwargs)
        selection = sparsectx.last_selection(pipe)
    result = sparsectx.sweep(pipe, [{"budget": 1.0}, {"budget": _budget(family), "selector": "uniform"}],
                             seed=SEED, warmup=0, keep_outputs=True, progress=False, **kwargs)
    off, keep_all, dropped = result.rows
    assert [row.label for row in result.rows] == ["sparsectx off", "budget=1.0",
                                                   f"budget={_budget(family)}, selector=uniform"]
    assert off.settings is None and dropped.settings == {"budget": _budget(family), "selector": "uniform"}
    assert torch.equal(result.outputs[0], unpatched.float()) and torch.equal(result.outputs[2], sparse.float())
    assert result.selections[0] is None and result.selections[1].keep.all()
    assert torch.equal(result.selections[2].keep, selection.keep) and not selection.keep.all()
    torch.testing.assert_close(result.outputs[1], result.outputs[0], rtol=0, atol=FP32_ATOL)
    assert off.kept == keep_all.kept == 1.0
    assert dropped.kept == pytest.approx(sum(_kept_tokens(family)) / sum(_reference_tokens(family)))
    baseline, output = unpatched.double(), sparse.double()
    mse = (output - baseline).pow(2).mean().item()
    assert mse > 0  # the dropped tokens mattered
    assert dropped.rel_rmse == pytest.approx((mse / baseline.pow(2).mean().item()) ** 0.5, rel=1e-9)
    assert dropped.max_abs_diff == pytest.approx((output - baseline).abs().max().item(), rel=1e-9)
    assert off.rel_rmse == 0 and off.max_abs_diff == 0
    if output_type == "pt":
        assert dropped.psnr == pytest.approx(10 * torch.log10(torch.tensor(1.0 / mse, dtype=torch.float64)).item())
        assert off.psnr == float("inf")
    else:
        assert off.psnr is None and dropped.psnr is None  # latents: no PSNR
    assert all(row.seconds > 0 for row in result.rows)


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sweep_times_the_repeats_and_not_the_warmup(pipe, family, monkeypatch):
    """warmup + repeats calls per row; the time reported is the median of the repeats. A fake clock makes each
    forward of a row's warm-up call last 50 s and those of its timed calls 1, 2, 3 s: the median call, 2 s per step."""
    from sparsectx import budget_sweep

    clock, forwards = [0.0], []
    per_forward = [50.0, 1.0, 2.0, 3.0]  # a row's calls: 1 warm-up, then 3 timed

    def tick(module, args):
        clock[0] += per_forward[(len(forwards) // STEPS) % len(per_forward)]
        forwards.append(1)

    pipe.transformer.register_forward_pre_hook(tick)
    monkeypatch.setattr(budget_sweep, "perf_counter", lambda: clock[0])
    result = sparsectx.sweep(pipe, [{"budget": _budget(family), "selector": "uniform"}], seed=SEED, warmup=1,
                             repeats=3, progress=False, **_sweep_kwargs(family, "latent"))
    assert len(result.rows) == 2 and result.outputs is None and result.selections is None
    assert len(forwards) == 2 * (1 + 3) * STEPS  # 2 rows x (1 warm-up + 3 timed calls) x steps
    assert [row.seconds for row in result.rows] == [2.0 * STEPS] * 2


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
@pytest.mark.parametrize("before", ["off", "enabled", "transformer enabled"])
@pytest.mark.parametrize("fails", [False, True])
def test_sweep_restores_the_pipelines_state(pipe, family, before, fails):
    """After the sweep (or a call failing inside it) the pipeline has the Sparse Context state, class, attention
    processors and progress-bar settings it had before."""
    if before == "enabled":
        sparsectx.enable(pipe, budget=_budget(family), selector="uniform", attention="sparsectx")
    elif before == "transformer enabled":
        sparsectx.enable(pipe.transformer, budget=_budget(family), selector="uniform")
    pipe.set_progress_bar_config(desc="mine", leave=False)
    patch = getattr(pipe.transformer, "_sparsectx_patch", None)
    settings = None if patch is None else patch.settings
    pipe_class = type(pipe)
    processors = dict(pipe.transformer.attn_processors)

    def failing(latents, context):
        raise RuntimeError("selector failed")

    settings_list = [{"budget": _budget(family), "selector": failing if fails else "random", "seed": SEED,
                      "attention": "sparsectx"}]
    if fails:
        with pytest.raises(RuntimeError, match="selector failed"):
            sparsectx.sweep(pipe, settings_list, warmup=0, progress=False, **_sweep_kwargs(family, "latent"))
    else:
        sparsectx.sweep(pipe, settings_list, warmup=0, progress=False, **_sweep_kwargs(family, "latent"))
    assert type(pipe) is pipe_class
    now_patch = getattr(pipe.transformer, "_sparsectx_patch", None)  # (reinstalled after the baseline's disable)
    assert (now_patch is None) == (patch is None) and (patch is None or now_patch.settings is settings)
    now = pipe.transformer.attn_processors
    assert now.keys() == processors.keys() and all(now[name] is processors[name] for name in processors)
    assert pipe._progress_bar_config == {"desc": "mine", "leave": False}


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
@pytest.mark.parametrize("args, error, words", [
    (dict(settings=[]), ValueError, "settings is empty"),
    (dict(settings={"budget": 0.1}), TypeError, "settings must be a list"),
    (dict(settings=[0.1]), TypeError, "settings[0] must be a dict"),
    (dict(settings=[{"budget": 0.1}, {"budjet": 0.1}]), ValueError, "settings[1] has unknown keys ['budjet']"),
    (dict(settings=[{"budget": 1.5}]), ValueError, "settings[0]: budget"),
    (dict(settings=[{"selector": "nope"}]), ValueError, "settings[0]: "),
    (dict(settings=[{"attention": "flash"}]), ValueError, "settings[0]: attention"),
    (dict(settings=[{"budget": 0.1}], repeats=0), ValueError, "repeats must be at least 1"),
    (dict(settings=[{"budget": 0.1}], warmup=-1), ValueError, "warmup must be at least 0"),
    (dict(settings=[{"budget": 0.1}], seed=1.5), TypeError, "seed must be an int"),
    (dict(settings=[{"budget": 0.1}], seed=2 ** 64), ValueError, "seed 18446744073709551616 is out of range"),
    (dict(settings=[{"budget": 0.1}], keep_outputs=1), TypeError, "keep_outputs must be a bool"),
    (dict(settings=[{"budget": 0.1}], generator=torch.Generator()), ValueError, "pass no generator"),
    (dict(settings=[{"budget": 0.1}], output_type="png"), ValueError, "output_type must be one of"),
    (dict(settings=[{"budget": 0.1, "label": None}]), TypeError, "settings[0]['label'] must be a str, got NoneType"),
    (dict(settings=[{"budget": 0.1}, {"budget": 0.2, "label": ["x"]}]), TypeError,
     "settings[1]['label'] must be a str, got list"),
    (dict(settings=[{"budget": 0.1, "label": " "}]), ValueError, "settings[0]['label'] is empty"),
    (dict(settings=[{"budget": 0.1}], joint_attention_kwargs={"sparsectx": {"budget": 1.0}}), ValueError,
     "joint_attention_kwargs['sparsectx'] would override every row's settings"),
])
def test_bad_sweep_arguments_fail_before_any_call(pipe, family, args, error, words):
    forwards = _transformer_forwards(pipe)
    kwargs = _sweep_kwargs(family, "latent")
    kwargs.update(args)
    settings = kwargs.pop("settings")
    with pytest.raises(error) as raised:
        sparsectx.sweep(pipe, settings, progress=False, **kwargs)
    assert words in str(raised.value)
    assert forwards == [] and not sparsectx.integration.is_enabled(pipe)


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
@pytest.mark.parametrize("target", ["transformer", "compiled transformer", "function"])
def test_sweep_of_anything_but_a_pipeline_is_refused(pipe, family, target):
    forwards = _transformer_forwards(pipe)
    not_a_pipeline = {"transformer": lambda: pipe.transformer,
                      "compiled transformer": lambda: torch.compile(pipe.transformer),
                      "function": lambda: lambda **kwargs: pipe(**kwargs)}[target]()
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        sparsectx.sweep(not_a_pipeline, [{"budget": 0.1}], progress=False, **_sweep_kwargs(family))
    assert forwards == []


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sweep_table_and_plot(pipe, family, tmp_path):
    pytest.importorskip("matplotlib")
    n_tokens = sum(_reference_tokens(family))
    user_mask = torch.arange(n_tokens)[None] < n_tokens // 2
    settings = [{"budget": 1.0}, {"budget": _budget(family), "selector": "uniform", "label": "uniform"},
                {"budget": 0.25, "selector": "edit", "signals": {"user_mask": user_mask}}]
    result = sparsectx.sweep(pipe, settings, seed=SEED, warmup=0, progress=False, **_sweep_kwargs(family))
    lines = result.table().splitlines()
    assert str(result) == result.table() and len(lines) == 2 + 4  # a tensor setting is labelled on one line
    off, keep_all, dropped, edit = result.rows
    cells = [line.split(" | ") for line in lines[2:]]
    edit_label = f"budget=0.25, selector=edit, signals={{user_mask: tensor[1, {n_tokens}]}}"
    assert [c[0].lstrip("| ") for c in cells] == ["sparsectx off", "budget=1.0", "uniform", edit_label]
    assert cells[2][1] == f"{100 * dropped.kept:.1f}%" and cells[2][3] == f"{off.seconds / dropped.seconds:.2f}x"
    assert cells[2][4] == f"{dropped.psnr:.2f} dB" and cells[0][4] == "inf"
    path = tmp_path / "sweep.png"
    fig = result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fidelity, timing = fig.axes
    # the fidelity panel shows the finite PSNRs only (keep-all equals the baseline here: infinite), the timing panel
    # every setting, against the kept share in percent
    # (flat lists of x and y: pytest 9.2's approx refuses nested ones)
    fidelity_points = [(line.get_xdata()[0], line.get_ydata()[0]) for line in fidelity.get_lines()]
    expected = [(100 * row.kept, row.psnr) for row in (keep_all, dropped, edit) if row.psnr != float("inf")]
    assert len(fidelity_points) == len(expected)
    for axis in (0, 1):
        assert [p[axis] for p in fidelity_points] == pytest.approx([p[axis] for p in expected])
    timing_points = [(line.get_xdata()[0], line.get_ydata()[0]) for line in timing.get_lines()[:3]]
    expected = [(100 * row.kept, row.seconds) for row in (keep_all, dropped, edit)]
    for axis in (0, 1):
        assert [p[axis] for p in timing_points] == pytest.approx([p[axis] for p in expected])
    # a label holding "$" is drawn as text (before: matplotlib read "$...$" as a formula, and one it could not
    # parse failed the plot)
    dollars = "cost: $0.02/img at 10%, $0.05/img at 25%"
    rows = [off, dropped._replace(label=dollars)]
    fig = type(result)(rows).plot(tmp_path / "dollars.png")
    texts = [text.get_text() for axis in fig.axes for text in axis.texts]
    assert texts.count(dollars) == 2 and (tmp_path / "dollars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("output", ["latents", "images"])
def test_sweep_of_a_modular_pipeline(output, monkeypatch):
    """A modular pipeline returns what its ``output`` argument names: the latents (no PSNR) or its decoded images
    (PIL by default, read as 8-bit values / 255); its blocks' progress-bar settings come back after the sweep."""
    import numpy as np

    pipe, kwargs, n_target, n_refs, budget, per_step = _modular_case("FluxKontextAutoBlocks", monkeypatch)
    kwargs["output"] = output
    bar_blocks = _blocks_with_progress_bars(pipe)
    assert bar_blocks  # (the denoising loop's, a few levels down)
    for block in bar_blocks:
        block.set_progress_bar_config(desc="mine")
    during = []  # the blocks' settings while the sweep's calls run: bars off
    pipe.transformer.register_forward_pre_hook(
        lambda module, args: during.append([block._progress_bar_config for block in bar_blocks]))
    unpatched = _seeded_call(pipe, kwargs)
    with sparsectx.sparse_context(pipe, budget=budget, selector="uniform"):
        sparse = _seeded_call(pipe, kwargs)
    during.clear()
    result = sparsectx.sweep(pipe, [{"budget": budget, "selector": "uniform"}], seed=SEED, warmup=0,
                             keep_outputs=True, progress=False, **kwargs)
    assert during and all(config == {"disable": True} for configs in during for config in configs)
    if output == "images":  # PIL images
        unpatched, sparse = (torch.from_numpy(np.stack([np.asarray(image) for image in images]) / 255.0)
                             for images in (unpatched, sparse))
    assert torch.equal(result.outputs[0], unpatched.float()) and torch.equal(result.outputs[1], sparse.float())
    mse = (sparse.double() - unpatched.double()).pow(2).mean().item()
    assert mse > 0
    off, dropped = result.rows
    if output == "images":
        assert dropped.psnr == pytest.approx(10 * np.log10(1.0 / mse)) and off.psnr == float("inf")
    else:
        assert dropped.psnr is None and off.psnr is None
    assert dropped.kept == pytest.approx(sum(round(budget * n) for n in n_refs) / sum(n_refs))
    assert all(block._progress_bar_config == {"desc": "mine"} for block in bar_blocks)


def _blocks_with_progress_bars(pipe) -> list:
    found, blocks = [], list(pipe._blocks.sub_blocks.values())
    while blocks:
        block = blocks.pop()
        found += [block] if hasattr(block, "set_progress_bar_config") else []
        blocks += list((getattr(block, "sub_blocks", None) or {}).values())
    return found


def test_sweep_of_a_modular_pipeline_needs_its_output_named(monkeypatch):
    pipe, kwargs, *_ = _modular_case("FluxKontextAutoBlocks", monkeypatch)
    del kwargs["output"]
    with pytest.raises(ValueError, match="output must be one of"):
        sparsectx.sweep(pipe, [{"budget": 0.5}], progress=False, **kwargs)


def test_sweep_labels_tell_every_setting_apart():
    """Values are labelled on one line by what tells them apart (an adaptive budget by its settings, a callable by
    its name, a tensor by its shape); settings that still read alike get their index."""
    from sparsectx import budget_sweep, selection

    def mine(latents, context):
        return torch.rand(latents.shape[:2])

    labels = budget_sweep._labels([
        {"budget": selection.adaptive(0.9, cap=0.5)}, {"budget": selection.adaptive(0.9, cap=0.25)},
        {"selector": functools.partial(mine)}, {"selector": mine, "signals": {"user_mask": torch.ones(1, 7)}},
        {"budget": 0.1}, {"budget": 0.1},
        {"budget": selection.fixed_ratio(torch.full((40, 1), 0.25))},  # per-request tensors: by shape too
        {"budget": selection.adaptive(coverage=torch.tensor([[0.5], [0.9]]))}])
    assert labels[0] == "sparsectx off" and len(set(labels)) == len(labels)
    assert "cap=0.5" in labels[1] and "cap=0.25" in labels[2] and "\n" not in "".join(labels)
    assert labels[3] == "selector=partial(mine)" and labels[4] == "selector=mine, signals={user_mask: tensor[1, 7]}"
    assert labels[5:7] == ["budget=0.1 (settings[4])", "budget=0.1 (settings[5])"]
    assert labels[7:] == ["budget=fixed_ratio(tensor[40, 1])",
                          "budget=adaptive(coverage=tensor[2, 1], floor=0, cap=1.0, mass='auto')"]
    # a setting labelled as the baseline reads apart from it
    assert budget_sweep._labels([{"label": "sparsectx off"}]) == ["sparsectx off", "sparsectx off (settings[0])"]
    # a given label reading like another's appended form: every label gets its index (before: two rows read
    # "a (settings[0])")
    labels = budget_sweep._labels([{"label": "a"}, {"label": "a"}, {"label": "a (settings[0])"}])
    assert labels == ["sparsectx off", "a (settings[0])", "a (settings[1])", "a (settings[0]) (settings[2])"]


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sweep_against_a_baseline_holding_nan_reads_nan_and_warns(pipe, family, monkeypatch):
    """An output holding NaN has no distance to report: every row's relative RMSE is NaN (before: inf, the baseline
    against itself included), and a warning says the baseline holds NaN."""
    from sparsectx import budget_sweep

    output_of, outputs = budget_sweep._output_of, []

    def baseline_with_nan(out):
        images = output_of(out)
        if not outputs:  # the baseline's row
            images = images.clone()
            images.view(-1)[0] = float("nan")
        outputs.append(images)
        return images

    monkeypatch.setattr(budget_sweep, "_output_of", baseline_with_nan)
    with pytest.warns(RuntimeWarning, match=r"baseline's output \(Sparse Context off\) holds NaN or inf"):
        result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform"}], warmup=0, progress=False,
                                 **_sweep_kwargs(family, "latent"))
    assert len(outputs) == 2
    for row in result.rows:
        assert math.isnan(row.rel_rmse) and math.isnan(row.max_abs_diff), row
    # an image baseline holding inf: an infinite error, -inf dB (before: math.log10(0) raised "math domain error")
    psnr, rel_rmse, max_abs_diff = budget_sweep._compare(torch.zeros(2, dtype=torch.float64),
                                                         torch.tensor([0.0, math.inf], dtype=torch.float64), True)
    assert psnr == -math.inf and math.isnan(rel_rmse) and max_abs_diff == math.inf


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_a_sweep_waits_for_another_threads_sparse_context_block(pipe, family):
    """A sweep's rows hold the transformer as sparse_context blocks do: a sweep started while another thread's block
    holds the pipeline waits for it (before: its first row read the block's settings as the state to restore, and
    put them back after the block had exited: the pipeline stayed enabled)."""
    entered = threading.Event()

    def block():
        with sparsectx.sparse_context(pipe, budget=1.0, selector="uniform"):
            entered.set()
            time.sleep(1.0)  # (the sweep starts meanwhile)

    thread = threading.Thread(target=block)
    thread.start()
    assert entered.wait(10)
    result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform"}], warmup=0, progress=False,
                             **_sweep_kwargs(family, "latent"))
    thread.join()
    assert not sparsectx.integration.is_enabled(pipe)
    assert result.rows[1].kept == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("family", [KONTEXT])  # not family-specific: one family
def test_sweep_rows_give_enables_arguments_and_the_table_escapes_labels(pipe, family):
    """A row's ``settings`` are ``enable``'s arguments (its label is ``row.label``: ``enable(pipe, **row.settings)``
    failed on the label key), and a label holding '|' stays one cell of the markdown table."""
    result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform", "label": "50% | uniform"}], warmup=0,
                             progress=False, **_sweep_kwargs(family, "latent"))
    row = result.rows[1]
    assert row.label == "50% | uniform" and row.settings == {"budget": 0.5, "selector": "uniform"}
    with sparsectx.sparse_context(pipe, **row.settings):
        assert sparsectx.integration.is_enabled(pipe)
    line = result.table().splitlines()[3]
    assert line.startswith("| 50% \\| uniform |") and line.replace("\\|", "").count("|") == 8, line


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_refuses_what_enable_would_refuse_before_any_call(pipe, family):
    """Refusals of the target that ``enable`` makes (here: drop training on the transformer) came only in the row's
    own call, after every earlier row's calls; they are now made for every setting before the first call."""
    forwards = _transformer_forwards(pipe)
    sparsectx.enable_drop_training(pipe.transformer, ratio_range=(0.5, 0.5))
    try:
        with pytest.raises(RuntimeError, match=r"drop training is enabled on this transformer"):
            sparsectx.sweep(pipe, [{"budget": 0.5}], warmup=0, progress=False, **_sweep_kwargs(family, "latent"))
    finally:
        sparsectx.disable_drop_training(pipe.transformer)
    assert forwards == []


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_names_the_failing_row_without_exception_notes(pipe, family, monkeypatch, capsys):
    """On Python 3.10 (no ``add_note``) the failing row is printed to stderr instead."""
    from sparsectx import budget_sweep

    monkeypatch.setattr(budget_sweep, "_ADD_NOTE", False)
    with pytest.raises(ValueError, match="budget has 2 entries") as raised:
        sparsectx.sweep(pipe, [{"budget": [0.1, 0.2]}], warmup=0, progress=False, **_sweep_kwargs(family, "latent"))
    assert not getattr(raised.value, "__notes__", None)
    assert "sparsectx.sweep: the error below came in sparsectx.sweep's row 'budget=[0.1, 0.2]' (settings[0])" in \
        capsys.readouterr().err


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_takes_a_numpy_seed_and_names_the_row_that_fails(pipe, family):
    import numpy as np

    kwargs = _sweep_kwargs(family, "latent")
    result = sparsectx.sweep(pipe, [{"budget": 1.0}], seed=np.int64(SEED), warmup=0, keep_outputs=True,
                             progress=False, **kwargs)
    assert torch.equal(result.outputs[0], _seeded_call(pipe, kwargs).float())
    # a budget of two images for a call of one reference is found once the call lays out its images
    with pytest.raises(ValueError, match="budget has 2 entries") as raised:
        sparsectx.sweep(pipe, [{"budget": 0.5}, {"budget": [0.1, 0.2]}], warmup=0, progress=False, **kwargs)
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["in sparsectx.sweep's row 'budget=[0.1, 0.2]' (settings[1])"]
    assert not sparsectx.integration.is_enabled(pipe)


def test_a_ref_shapes_signal_must_match_the_grids_qwen_gives(monkeypatch):
    """Qwen-Image's layout knows each reference's grid (``img_shapes``): a user's ``signals['ref_shapes']`` of the same
    token counts in (w, h) order replaced it silently, transposing the grid ``uniform`` and ``edit`` select on (a
    lattice became runs along the sequence); it is refused by name, and one equal to the layout's runs as without it."""
    monkeypatch.setattr(qwen_edit_plus, "VAE_IMAGE_SIZE", QWEN_VAE_AREA)
    pipe = _pipeline(QWEN)
    pipe.set_progress_bar_config(disable=True)
    try:
        sparsectx.enable(pipe, budget=0.25, selector="uniform")
        plain = _run(pipe, QWEN, PLAIN)
        shapes = sparsectx.last_selection(pipe).ref_shapes
        assert any(h != w for h, w in shapes)  # a transposed grid differs
        sparsectx.enable(pipe, budget=0.25, selector="uniform", signals={"ref_shapes": shapes})
        assert torch.equal(_run(pipe, QWEN, PLAIN), plain)
        sparsectx.enable(pipe, budget=0.25, selector="uniform", signals={"ref_shapes": [(w, h) for h, w in shapes]})
        with pytest.raises(ValueError, match=r"signals\['ref_shapes'\].*differs from the reference grids"):
            _run(pipe, QWEN, PLAIN)
    finally:
        sparsectx.disable(pipe)


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_seeds_every_call_of_a_row_anew(pipe, family):
    """With warm-up calls, the reported (last) call of a row starts from the same noise as one call with
    ``generator=torch.Generator().manual_seed(seed)``: each call of a row is seeded anew, not one generator per row."""
    kwargs = _sweep_kwargs(family, "latent")
    expected = _seeded_call(pipe, kwargs)
    result = sparsectx.sweep(pipe, [{"budget": 1.0}], seed=SEED, warmup=1, repeats=2, keep_outputs=True,
                             progress=False, **kwargs)
    assert torch.equal(result.outputs[0], expected.float())
    torch.testing.assert_close(result.outputs[1], expected.float(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_time_is_the_median_of_the_repeats(pipe, family, monkeypatch):
    """Timed calls of 1, 2 and 9 s per forward: a row's time is their median, 2 s per forward (the mean would be
    4)."""
    from sparsectx import budget_sweep

    clock, forwards = [0.0], []
    per_forward = [1.0, 2.0, 9.0]

    def tick(module, args):
        clock[0] += per_forward[(len(forwards) // STEPS) % len(per_forward)]
        forwards.append(1)

    pipe.transformer.register_forward_pre_hook(tick)
    monkeypatch.setattr(budget_sweep, "perf_counter", lambda: clock[0])
    result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform"}], seed=SEED, warmup=0, repeats=3,
                             progress=False, **_sweep_kwargs(family, "latent"))
    assert [row.seconds for row in result.rows] == [2.0 * STEPS] * 2


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_share_kept_is_over_the_whole_batch(pipe, family):
    """A batch of several images (true CFG, two images per prompt): ``kept`` is the share over the whole batch, as
    the call's own selection gives it, in (0, 1)."""
    kwargs = _call_kwargs(family, CFG_BATCH)
    del kwargs["generator"]
    result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform"}], seed=SEED, warmup=0,
                             keep_outputs=True, progress=False, **kwargs)
    keep = result.selections[1].keep
    assert keep.shape[0] > 1
    assert result.rows[1].kept == pytest.approx(keep.float().mean().item())
    assert 0 < result.rows[1].kept < 1


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_output_type_defaults_to_pt(pipe, family):
    """``output_type`` defaults to ``"pt"`` (the docstring's): without it the rows hold the "pt" images, and a
    PSNR."""
    kwargs = _sweep_kwargs(family, "pt")
    expected = _seeded_call(pipe, kwargs)
    del kwargs["output_type"]
    result = sparsectx.sweep(pipe, [{"budget": 0.5, "selector": "uniform"}], seed=SEED, warmup=0,
                             keep_outputs=True, progress=False, **kwargs)
    assert torch.equal(result.outputs[0], expected.float())
    assert result.rows[0].psnr == float("inf") and result.rows[1].psnr is not None


@pytest.mark.parametrize("family", [KONTEXT])
def test_sweep_baseline_is_unpatched_on_an_enabled_pipeline(pipe, family):
    """On a pipeline enabled before the sweep, row 0 is still the call with Sparse Context off, and the pipeline is
    enabled again afterwards."""
    kwargs = _sweep_kwargs(family, "latent")
    unpatched = _seeded_call(pipe, kwargs)
    sparsectx.enable(pipe, budget=_budget(family), selector="uniform")
    result = sparsectx.sweep(pipe, [{"budget": 1.0}], seed=SEED, warmup=0, keep_outputs=True, progress=False,
                             **kwargs)
    assert sparsectx.integration.is_enabled(pipe)
    assert torch.equal(result.outputs[0], unpatched.float())
    assert result.rows[0].kept == 1.0


def _positional(pipe, kwargs):
    """The call's arguments up to and including ``generator`` by position, the rest by keyword."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    names = list(parameters)[1:]
    upto = names.index("generator") + 1
    args = [kwargs.pop(name) if name in kwargs else parameters[name].default for name in names[:upto]]
    return args, kwargs


def test_a_generator_given_by_position_seeds_the_selection():
    """Without a seed, a pipeline call's generator seeds the selection whether given by keyword or by position
    (``integration._call_seed``)."""
    pipe = _kontext_pipeline()
    sparsectx.enable(pipe, budget=KONTEXT_BUDGET, selector="random")  # no seed: the call's generator decides
    try:
        keeps = []
        for by_position in (False, True, True):
            kwargs = _call_kwargs(KONTEXT, PLAIN)
            kwargs["generator"] = torch.Generator().manual_seed(123)
            with torch.no_grad():
                if by_position:
                    args, kwargs = _positional(pipe, kwargs)
                    pipe(*args, **kwargs)
                else:
                    pipe(**kwargs)
            keeps.append(sparsectx.last_selection(pipe).keep)
        assert torch.equal(keeps[0], keeps[1]) and torch.equal(keeps[1], keeps[2])
    finally:
        sparsectx.disable(pipe)
